"""The reference AP-S over real HTTP on 127.0.0.1, with a real SQLite file."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from appliance.aps.server import (
    DEFAULT_DUPLICATE_MESSAGE,
    STORE_KEY,
    build_app,
    mask_identity,
    parse_identity,
    serve,
)
from appliance.aps.store import Store

IDENTITY = "A123456789"


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
    runner = await serve("127.0.0.1", 0, db_path, **kwargs)
    host, port = runner.addresses[0][:2]
    return Aps(runner, aiohttp.ClientSession(), f"http://{host}:{port}")


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
    assert row["identity"] == IDENTITY and row["live"] == 1 and row["module"] == "User"


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
    assert (await aps.cdr(answer["roomkey"]))["identity"] == IDENTITY


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
