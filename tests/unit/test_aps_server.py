"""The reference AP-S over real HTTP on 127.0.0.1, with a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appliance.core import agent_token
from reference_aps.server import (
    DEFAULT_AGENT_PAGE_URL,
    DEFAULT_DUPLICATE_MESSAGE,
    GUARD_KEY,
    STORE_KEY,
    AgentLinks,
    build_app,
    mask_identity,
    parse_identity,
    serve,
)
from reference_aps.store import Store

IDENTITY = "A123456789"
API_TOKEN = "test-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@dataclass
class Aps:
    runner: web.AppRunner
    session: aiohttp.ClientSession
    base: str

    @property
    def store(self) -> Store:
        return self.runner.app[STORE_KEY]

    async def post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with self.session.post(self.base + path, **kwargs) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.base + path) as resp:
            return resp.status, await resp.json()

    async def verify(self, **overrides: Any) -> dict[str, Any]:
        status, answer = await self.post("/verify", verify_body(**overrides))
        assert status == 200
        return answer

    async def cdr(self, roomkey: int) -> dict[str, Any]:
        status, answer = await self.get(f"/cdr?roomkey={roomkey}")
        assert status == 200 and len(answer["calls"]) == 1
        return answer["calls"][0]


def verify_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "appliance_id": "ms-1",
        "channel": 4,
        "dialogid": 13290721,
        "ref": 2392510,
        "caller": 5678,
        "callee": 9333,
        "userdata": json.dumps({"id": IDENTITY, "name": "王小明"}),
        "suid": None,
        "module": "User",
    }
    body.update(overrides)
    return body


async def start_aps(db_path: Path, **kwargs: Any) -> Aps:
    kwargs.setdefault("api_token", API_TOKEN)
    runner = await serve("127.0.0.1", 0, db_path, **kwargs)
    host, port = runner.addresses[0][:2]
    return Aps(runner, aiohttp.ClientSession(headers=AUTH), f"http://{host}:{port}")


@pytest.fixture
async def aps(tmp_path: Path) -> AsyncIterator[Aps]:
    server = await start_aps(tmp_path / "data" / "aps.sqlite3")
    yield server
    await server.session.close()
    await server.runner.cleanup()


# -- verify -----------------------------------------------------------------------------------


async def test_verify_success_with_json_userdata(aps: Aps) -> None:
    answer = await aps.verify()
    assert answer["result"] == "success"
    assert set(answer) == {"result", "roomkey"}  # no notify when there is no duplicate
    row = await aps.cdr(answer["roomkey"])
    assert row["identity"] == mask_identity(IDENTITY) and row["live"] == 1
    assert row["module"] == "User"
    assert aps.store.get_call(answer["roomkey"])["identity"] == IDENTITY  # type: ignore[index]


@pytest.mark.parametrize(
    "userdata",
    [
        f"id={IDENTITY}&x=y",
        f"x=y&id={IDENTITY}",
        "%7B%22id%22%3A%22A123456789%22%7D",
        f'  {{"id": " {IDENTITY} "}}  ',
    ],
)
async def test_verify_accepts_form_and_encoded_userdata(aps: Aps, userdata: str) -> None:
    answer = await aps.verify(userdata=userdata)
    assert answer["result"] == "success"
    assert aps.store.get_call(answer["roomkey"])["identity"] == IDENTITY  # type: ignore[index]


@pytest.mark.parametrize(
    "userdata", ["", "{}", '{"name":"x"}', "x=1", "{not json", "[1,2]", '{"id":""}', "id="]
)
async def test_verify_without_id_is_an_error(aps: Aps, userdata: str) -> None:
    answer = await aps.verify(userdata=userdata)
    assert answer == {"result": "error", "reason": "userdata has no id"}
    status, cdr = await aps.get("/cdr")
    assert status == 200 and cdr["calls"] == []


async def test_verify_blocked_identity_is_an_error(aps: Aps) -> None:
    aps.store.block(IDENTITY)
    assert await aps.verify() == {"result": "error", "reason": "identity blocked"}


async def test_two_hundred_roomkeys_unique_random_twelve_digits(aps: Aps) -> None:
    keys = [(await aps.verify(dialogid=i, ref=i))["roomkey"] for i in range(200)]
    assert len(set(keys)) == 200
    assert all(isinstance(k, int) and len(str(k)) == 12 for k in keys)
    assert keys != sorted(keys) and keys != sorted(keys, reverse=True)
    assert len({b - a for a, b in pairwise(keys)}) > 100


async def test_verify_is_idempotent(aps: Aps) -> None:
    first = await aps.verify()
    second = await aps.verify()
    assert second == first
    status, cdr = await aps.get("/cdr?limit=10")
    assert status == 200 and len(cdr["calls"]) == 1


# -- duplicate login (Flow 3) -------------------------------------------------------------------


async def test_duplicate_login_notifies_the_other_appliance(aps: Aps) -> None:
    old = (await aps.verify(appliance_id="ms-1", dialogid=1))["roomkey"]
    answer = await aps.verify(appliance_id="ms-2", dialogid=2)
    assert answer["result"] == "success" and answer["roomkey"] != old
    assert answer["notify"] == {"ms": "ms-1", "message": DEFAULT_DUPLICATE_MESSAGE, "roomkey": old}
    assert (await aps.cdr(answer["roomkey"]))["live"] == 1


async def test_duplicate_login_retry_repeats_the_notify(aps: Aps) -> None:
    await aps.verify(appliance_id="ms-1", dialogid=1)
    first = await aps.verify(appliance_id="ms-2", dialogid=2)
    assert await aps.verify(appliance_id="ms-2", dialogid=2) == first


async def test_no_notify_after_the_old_call_is_released(aps: Aps) -> None:
    old = (await aps.verify(appliance_id="ms-1", dialogid=1))["roomkey"]
    event = {"appliance_id": "ms-1", "roomkey": old, "event": "released", "at": 2.0}
    assert (await aps.post("/CallEvent", event))[0] == 200
    answer = await aps.verify(appliance_id="ms-2", dialogid=2)
    assert answer["result"] == "success" and "notify" not in answer


async def test_no_notify_after_the_old_call_ended(aps: Aps) -> None:
    old = (await aps.verify(appliance_id="ms-1", dialogid=1))["roomkey"]
    end = {"appliance_id": "ms-1", "roomkey": old, "record_file": ""}
    assert (await aps.post("/EndCall", end))[0] == 200
    assert "notify" not in await aps.verify(appliance_id="ms-2", dialogid=2)


async def test_no_notify_on_the_same_appliance(aps: Aps) -> None:
    await aps.verify(appliance_id="ms-1", dialogid=1)
    answer = await aps.verify(appliance_id="ms-1", dialogid=2)
    assert answer["result"] == "success" and "notify" not in answer


async def test_custom_duplicate_message(tmp_path: Path) -> None:
    server = await start_aps(tmp_path / "aps.sqlite3", duplicate_message="duplicate login")
    try:
        await server.verify(appliance_id="ms-1", dialogid=1)
        answer = await server.verify(appliance_id="ms-2", dialogid=2)
        assert answer["notify"]["message"] == "duplicate login"
    finally:
        await server.session.close()
        await server.runner.cleanup()


def test_duplicate_message_length_limit(tmp_path: Path) -> None:
    assert len(DEFAULT_DUPLICATE_MESSAGE.encode()) <= 128
    with pytest.raises(ValueError):
        build_app(tmp_path / "a.sqlite3", duplicate_message="重" * 43)  # 129 bytes
    with pytest.raises(ValueError):
        build_app(tmp_path / "a.sqlite3", duplicate_message="")


# -- call reports (Flow 2) ----------------------------------------------------------------------


async def test_call_detail_record_filled_by_reports(aps: Aps) -> None:
    roomkey = (await aps.verify())["roomkey"]
    answered = {"appliance_id": "ms-1", "roomkey": roomkey, "event": "answered", "at": 100.5}
    assert await aps.post("/CallEvent", answered) == (200, {"result": "ok"})
    record = {"appliance_id": "ms-1", "roomkey": roomkey, "record_file": "audio/a_004.wav"}
    assert await aps.post("/RecordFile", record) == (200, {"result": "ok"})
    released = {
        "appliance_id": "ms-1",
        "roomkey": roomkey,
        "event": "released",
        "at": 160,
        "cause": 16,
        "causestring": "normal release",
    }
    assert await aps.post("/CallEvent", released) == (200, {"result": "ok"})
    end = {"appliance_id": "ms-1", "roomkey": roomkey, "record_file": "audio/a_004.wav"}
    assert await aps.post("/EndCall", end) == (200, {"result": "ok"})

    row = await aps.cdr(roomkey)
    assert row["answered_at"] == 100.5
    assert (row["ended_at"], row["cause"], row["causestring"]) == (160.0, 16, "normal release")
    assert row["record_file"] == "audio/a_004.wav"
    assert row["endcall_at"] is not None and row["endcall_at"] >= row["verified_at"]
    assert row["live"] == 0
    assert (row["dialogid"], row["ref"], row["caller"], row["callee"]) == (
        13290721,
        2392510,
        5678,
        9333,
    )


async def test_unrecorded_end_call(aps: Aps) -> None:
    roomkey = (await aps.verify())["roomkey"]
    end = {"appliance_id": "ms-1", "roomkey": roomkey, "record_file": ""}
    assert await aps.post("/EndCall", end) == (200, {"result": "ok"})
    row = await aps.cdr(roomkey)
    assert row["record_file"] == "" and row["live"] == 0 and row["ended_at"] is not None


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/CallEvent", {"event": "answered", "at": 1.0}),
        ("/RecordFile", {"record_file": "x.wav"}),
        ("/EndCall", {"record_file": ""}),
    ],
)
async def test_unknown_roomkey_is_404(aps: Aps, path: str, body: dict[str, Any]) -> None:
    status, answer = await aps.post(path, {"appliance_id": "ms-1", "roomkey": 123, **body})
    assert (status, answer) == (404, {"result": "error", "reason": "unknown roomkey"})


# -- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/verify", b"{not json", "not valid JSON"),
        ("/verify", b"", "not valid JSON"),
        ("/verify", b"[1]", "Expected `object`"),
        ("/verify", {k: v for k, v in verify_body().items() if k != "userdata"}, "userdata"),
        ("/verify", verify_body(channel="4"), "$.channel"),
        ("/verify", verify_body(dialogid=-1), "$.dialogid"),
        ("/verify", verify_body(appliance_id=""), "$.appliance_id"),
        ("/verify", verify_body(caller=2**64), "$.caller"),
        ("/CallEvent", {"appliance_id": "ms-1", "roomkey": 1, "event": "x", "at": 1}, "$.event"),
        ("/CallEvent", {"appliance_id": "ms-1", "roomkey": 1, "event": "answered"}, "`at`"),
        ("/RecordFile", {"appliance_id": "ms-1", "roomkey": "1", "record_file": "f"}, "roomkey"),
        ("/RecordFile", {"appliance_id": "ms-1", "roomkey": 1, "record_file": ""}, "record_file"),
        ("/EndCall", {"roomkey": 1, "record_file": ""}, "appliance_id"),
    ],
)
async def test_bad_bodies_are_400(aps: Aps, path: str, body: Any, needle: str) -> None:
    status, answer = await aps.post(path, body)
    assert status == 400
    assert answer["result"] == "error" and needle in answer["reason"]


@pytest.mark.parametrize("query", ["roomkey=abc", "limit=0", "limit=x", "limit=100000"])
async def test_bad_cdr_queries_are_400(aps: Aps, query: str) -> None:
    status, answer = await aps.get(f"/cdr?{query}")
    assert status == 400 and answer["result"] == "error"


async def test_cdr_unknown_roomkey_is_empty(aps: Aps) -> None:
    assert await aps.get("/cdr?roomkey=5") == (200, {"calls": []})


# -- logging and helpers ------------------------------------------------------------------------


async def test_each_request_is_logged_without_the_full_identity(
    aps: Aps, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="appliance.aps"):
        roomkey = (await aps.verify())["roomkey"]
        await aps.post("/verify", b"garbage")
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.aps"]
    assert len(lines) == 2
    assert "POST /verify 200" in lines[0] and str(roomkey) in lines[0]
    assert IDENTITY not in lines[0] and mask_identity(IDENTITY) in lines[0]
    assert "POST /verify 400" in lines[1]


def test_parse_identity() -> None:
    assert parse_identity('{"id":"A123456789","name":"x"}') == "A123456789"
    assert parse_identity('{"id": 42}') == "42"
    assert parse_identity('{"id": true}') is None
    assert parse_identity("id=A1%202&x=y") == "A1 2"
    assert parse_identity("name=x") is None


def test_mask_identity() -> None:
    assert mask_identity("A123456789") == "A12*****89"
    assert mask_identity("abc") == "***"


# -- the API token (finding 12) -----------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/verify"),
    ("POST", "/CallEvent"),
    ("POST", "/RecordFile"),
    ("POST", "/EndCall"),
    ("GET", "/cdr"),
    ("GET", "/cdr?roomkey=1"),
    ("GET", "/agent-link?roomkey=1"),
    ("GET", "/no-such-path"),
]
WRONG_AUTH = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {API_TOKEN}x"},
    {"Authorization": f"Basic {API_TOKEN}"},
    {"Authorization": API_TOKEN},
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("headers", WRONG_AUTH)
async def test_every_endpoint_wants_the_api_token(
    aps: Aps, method: str, path: str, headers: dict[str, str]
) -> None:
    roomkey = (await aps.verify())["roomkey"]
    body = json.dumps(verify_body(dialogid=99) if path == "/verify" else {
        "appliance_id": "ms-1", "roomkey": roomkey, "record_file": "", "event": "released",
        "at": 1.0})
    async with aiohttp.ClientSession() as stranger, stranger.request(
        method, aps.base + path, data=body, headers=headers
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert await resp.json() == {"result": "error", "reason": "missing or wrong API token"}
    # Nothing was read or written for the stranger: the one call is still live, no other.
    assert [(c["roomkey"], c["live"]) for c in aps.store.recent_calls(10)] == [(roomkey, 1)]


async def test_scheme_is_case_insensitive(aps: Aps) -> None:
    async with aiohttp.ClientSession() as client, client.get(
        aps.base + "/cdr", headers={"Authorization": f"bearer {API_TOKEN}"}
    ) as resp:
        assert resp.status == 200


async def test_refusals_are_counted_and_logged_once_per_window(
    aps: Aps, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="appliance.aps"):
        async with aiohttp.ClientSession() as stranger:
            for _ in range(50):
                async with stranger.get(aps.base + "/cdr") as resp:
                    assert resp.status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.aps"]
    assert len(lines) == 1, lines
    assert "GET /cdr: refused, missing or wrong API token" in lines[0]
    assert aps.runner.app[GUARD_KEY].refused == 50


async def test_without_a_token_the_api_is_open(tmp_path: Path) -> None:
    server = await start_aps(tmp_path / "aps.sqlite3", api_token=None)
    try:
        async with aiohttp.ClientSession() as client, client.get(server.base + "/cdr") as resp:
            assert resp.status == 200
    finally:
        await server.session.close()
        await server.runner.cleanup()


def test_empty_api_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_app(tmp_path / "a.sqlite3", api_token="")


async def test_cdr_masks_national_ids(aps: Aps) -> None:
    roomkeys = [(await aps.verify(dialogid=i, userdata=json.dumps({"id": f"B12345678{i}"})))
                ["roomkey"] for i in range(3)]
    status, cdr = await aps.get("/cdr")
    assert status == 200
    assert [c["identity"] for c in cdr["calls"]] == ["B12*****82", "B12*****81", "B12*****80"]
    assert "B12345678" not in json.dumps(cdr)
    one = await aps.cdr(roomkeys[0])
    assert one["identity"] == "B12*****80"


# -- agent tokens and the agent link (finding 12) ---------------------------------------------

SECRET = b"shared-agent-secret"


@pytest.fixture
async def aps_with_agent_tokens(tmp_path: Path) -> AsyncIterator[Aps]:
    agent = AgentLinks(page_url="https://ms.example:4433/AgentVideo.html", secret=SECRET,
                       ttl=600)
    server = await start_aps(tmp_path / "aps.sqlite3", agent=agent)
    yield server
    await server.session.close()
    await server.runner.cleanup()


async def test_verify_answer_carries_an_agent_token(aps_with_agent_tokens: Aps) -> None:
    answer = await aps_with_agent_tokens.verify()
    roomkey, token = answer["roomkey"], answer["agent_token"]
    now = time.time()
    agent_token.check(SECRET, roomkey, token, now)  # admits this room's agent...
    with pytest.raises(agent_token.TokenRefused, match="does not match"):
        agent_token.check(SECRET, roomkey + 1, token, now)  # ...and no other room's
    with pytest.raises(agent_token.TokenRefused, match="does not match"):
        agent_token.check(b"another secret", roomkey, token, now)
    with pytest.raises(agent_token.TokenRefused, match="expired"):
        agent_token.check(SECRET, roomkey, token, now + 601)
    assert abs(int(token.split(".")[0]) - (now + 600)) <= 2


async def test_no_agent_token_without_a_secret(aps: Aps) -> None:
    assert "agent_token" not in await aps.verify()
    roomkey = (await aps.verify(dialogid=2))["roomkey"]
    status, link = await aps.get(f"/agent-link?roomkey={roomkey}")
    assert status == 200 and link["token"] is None
    assert link["url"] == f"{DEFAULT_AGENT_PAGE_URL}?roomkey={roomkey}"


async def test_agent_link_gives_the_page_with_a_fresh_token(aps_with_agent_tokens: Aps) -> None:
    aps = aps_with_agent_tokens
    roomkey = (await aps.verify())["roomkey"]
    status, link = await aps.get(f"/agent-link?roomkey={roomkey}")
    assert status == 200
    assert link["roomkey"] == roomkey
    assert link["url"] == (f"https://ms.example:4433/AgentVideo.html?roomkey={roomkey}"
                           f"&token={link['token']}")
    agent_token.check(SECRET, roomkey, link["token"], time.time())
    assert link["expires"] == int(link["token"].split(".")[0])


async def test_agent_link_only_for_live_calls(aps_with_agent_tokens: Aps) -> None:
    aps = aps_with_agent_tokens
    assert (await aps.get("/agent-link?roomkey=123456789012"))[0] == 404
    assert (await aps.get("/agent-link?roomkey=x"))[0] == 400
    assert (await aps.get("/agent-link"))[0] == 400
    roomkey = (await aps.verify())["roomkey"]
    await aps.post("/EndCall", {"appliance_id": "ms-1", "roomkey": roomkey, "record_file": ""})
    status, answer = await aps.get(f"/agent-link?roomkey={roomkey}")
    assert (status, answer["reason"]) == (410, "the call has ended")


async def test_on_verified_hears_each_new_call_once(tmp_path: Path) -> None:
    heard: list[tuple[int, str]] = []
    agent = AgentLinks(page_url="https://h/AgentVideo.html", secret=SECRET)
    server = await start_aps(tmp_path / "aps.sqlite3", agent=agent,
                             on_verified=lambda roomkey, url: heard.append((roomkey, url)))
    try:
        first = await server.verify()
        assert (await server.verify())["roomkey"] == first["roomkey"]  # a retry: not new
        second = await server.verify(dialogid=7)
        assert [k for k, _ in heard] == [first["roomkey"], second["roomkey"]]
        assert heard[0][1].startswith(f"https://h/AgentVideo.html?roomkey={first['roomkey']}"
                                      "&token=")
    finally:
        await server.session.close()
        await server.runner.cleanup()


# -- the command line: token file, loopback (findings 12, 13) ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_command_line_aps_creates_a_private_token_and_binds_loopback(
    tmp_path: Path,
) -> None:
    port = _free_port()
    db = tmp_path / "aps" / "aps.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "launcher.cli", "aps", "--port", str(port), "--db", str(db),
        stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stderr is not None
        line = b""
        while b"AP-S listening" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert line, "the AP-S exited"
        assert b"127.0.0.1" in line and b"API token required" in line
        token_file = db.parent / "api-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 40
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client:
            async with client.get(base + "/cdr") as resp:
                assert resp.status == 401
            async with client.get(base + "/cdr",
                                  headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
        for name in ("aps.sqlite3", "aps.sqlite3-wal", "aps.sqlite3-shm"):
            assert stat.S_IMODE((db.parent / name).stat().st_mode) == 0o600, name
    finally:
        proc.terminate()
        await proc.wait()
