"""ApsClient against the real reference AP-S and against scripted misbehaving servers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from appliance.core.config import Config
from appliance.core.config import from_dict as config_from_dict
from appliance.edges.aps_client import (
    ApsClient,
    ApsConfigError,
    ApsError,
    ApsUnavailable,
    Notify,
    VerifyRejected,
    VerifyResult,
)
from reference_aps.server import DEFAULT_DUPLICATE_MESSAGE, STORE_KEY, serve

IDENTITY = "A123456789"
# Small numbers so that every failure path finishes well under a second.
FAST = {"timeout": 0.2, "attempts": 3, "backoff": 0.01}

Script = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


def call(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "channel": 4,
        "dialogid": 13290721,
        "ref": 2392510,
        "caller": 5678,
        "callee": 9333,
        "userdata": json.dumps({"id": IDENTITY}),
        "suid": None,
        "module": "User",
    }
    fields.update(overrides)
    return fields


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


class Scripted:
    """A fake AP-S whose answer to the n-th request (1-based) is decided by a script."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.hits: list[tuple[str, dict[str, Any]]] = []
        self.release = asyncio.Event()  # set at teardown to free hanging handlers
        self.base = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append((request.path, await request.json()))
        return await self.script(request, len(self.hits))


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[Scripted]]]:
    runners: list[tuple[web.AppRunner, Scripted]] = []

    async def make(script: Script) -> Scripted:
        fake = Scripted(script)
        app = web.Application()
        app.router.add_post("/{tail:.*}", fake.handle)
        runner, fake.base = await _start(app)
        runners.append((runner, fake))
        return fake

    yield make
    for runner, fake in runners:
        fake.release.set()
        await runner.cleanup()


@pytest.fixture
async def aps(tmp_path: Path) -> AsyncIterator[web.AppRunner]:
    runner = await serve("127.0.0.1", 0, tmp_path / "aps.sqlite3")
    yield runner
    await runner.cleanup()


def base_of(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting gets ECONNREFUSED."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def ok_json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


# -- against the reference AP-S -----------------------------------------------------------------


async def test_verify_success(aps: web.AppRunner) -> None:
    async with ApsClient(base_of(aps), "ms-1") as client:
        result = await client.verify(**call())
    assert isinstance(result, VerifyResult) and result.notify is None
    assert 10**11 <= result.roomkey < 10**12


async def test_verify_duplicate_login_notify(aps: web.AppRunner) -> None:
    async with ApsClient(base_of(aps), "ms-1") as ms1, ApsClient(base_of(aps), "ms-2") as ms2:
        first = await ms1.verify(**call(dialogid=1))
        second = await ms2.verify(**call(dialogid=2))
    expected = Notify(ms="ms-1", message=DEFAULT_DUPLICATE_MESSAGE, roomkey=first.roomkey)
    assert second.notify == expected


async def test_verify_rejected(aps: web.AppRunner) -> None:
    aps.app[STORE_KEY].block(IDENTITY)
    async with ApsClient(base_of(aps), "ms-1") as client:
        with pytest.raises(VerifyRejected) as info:
            await client.verify(**call())
        with pytest.raises(VerifyRejected, match="userdata has no id"):
            await client.verify(**call(userdata="name=x"))
    assert info.value.reason == "identity blocked"


async def test_reports_fill_the_call_record(aps: web.AppRunner) -> None:
    async with ApsClient(base_of(aps) + "/", "ms-1") as client:  # trailing slash tolerated
        roomkey = (await client.verify(**call())).roomkey
        assert await client.call_event(roomkey, "answered", 100.0)
        assert await client.record_file(roomkey, "audio/a_004.wav")
        assert await client.call_event(roomkey, "released", 160.0, 16, "normal release")
        assert await client.end_call(roomkey, "audio/a_004.wav")
        # Unknown roomkey: CallEvent's 404 is tolerated, the other reports are refusals.
        assert await client.call_event(5, "answered", 1.0) is False
        assert await client.end_call(5, "") is False
    row = aps.app[STORE_KEY].get_call(roomkey)
    assert row is not None
    assert (row["answered_at"], row["ended_at"], row["cause"]) == (100.0, 160.0, 16)
    assert (row["record_file"], row["live"]) == ("audio/a_004.wav", 0)
    assert row["endcall_at"] is not None


# -- unreachable and misbehaving AP-S -------------------------------------------------------------


async def test_unavailable_when_nothing_listens(refused_port: int) -> None:
    started = time.monotonic()
    async with ApsClient(f"http://127.0.0.1:{refused_port}", "ms-1", **FAST) as client:
        with pytest.raises(ApsUnavailable, match="after 3 attempts") as info:
            await client.verify(**call())
        with pytest.raises(ApsUnavailable):
            await client.end_call(1, "")
    assert time.monotonic() - started < 1.0
    assert isinstance(info.value, ApsError)


async def test_unavailable_when_server_hangs(scripted: Any) -> None:
    async def hang(request: web.Request, n: int) -> web.Response:
        await fake.release.wait()
        return ok_json({"result": "success", "roomkey": 1})

    fake = await scripted(hang)
    started = time.monotonic()
    client = ApsClient(fake.base, "ms-1", timeout=0.1, attempts=2, backoff=0.01)
    async with client:
        with pytest.raises(ApsUnavailable, match=r"no answer within 0\.1s"):
            await client.verify(**call())
    assert 0.2 <= time.monotonic() - started < 1.0
    assert len(fake.hits) == 2


async def test_retry_succeeds_after_transient_503(scripted: Any) -> None:
    async def flaky(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=503, text="busy")
        return ok_json({"result": "success", "roomkey": 123456789012})

    fake = await scripted(flaky)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        result = await client.verify(**call())
    assert result == VerifyResult(roomkey=123456789012)
    assert len(fake.hits) == 2
    assert fake.hits[0] == fake.hits[1]  # the retry is the same request (AP-S dedups it)
    path, body = fake.hits[0]
    assert path == "/verify"
    assert body == {"appliance_id": "ms-1", **call()}


async def test_persistent_5xx_is_unavailable(scripted: Any) -> None:
    async def broken(request: web.Request, n: int) -> web.Response:
        return web.Response(status=500, text="oops")

    fake = await scripted(broken)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        with pytest.raises(ApsUnavailable, match="HTTP 500"):
            await client.record_file(1, "x.wav")
    assert len(fake.hits) == 3


async def test_4xx_on_verify_is_final(scripted: Any) -> None:
    async def forbidden(request: web.Request, n: int) -> web.Response:
        return web.Response(status=403, text="go away")

    fake = await scripted(forbidden)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        with pytest.raises(VerifyRejected) as info:
            await client.verify(**call())
    assert (info.value.status, info.value.reason) == (403, "HTTP 403")
    assert len(fake.hits) == 1


@pytest.mark.parametrize(
    "answer",
    [
        lambda: web.Response(text="<html>proxy error</html>"),
        lambda: ok_json({"result": "success"}),
        lambda: ok_json({"result": "maybe", "roomkey": 1}),
        lambda: ok_json({"result": "success", "roomkey": -5}),
        lambda: web.json_response([1, 2]),
        # Out of range or not really digits: must not reach the bus (OverflowError) or
        # int() (ValueError) as a crash of the call.
        lambda: ok_json({"result": "success", "roomkey": 2**63}),
        lambda: ok_json({"result": "success", "roomkey": 2**64 + 5}),
        lambda: ok_json({"result": "success", "roomkey": "9" * 25}),
        lambda: ok_json({"result": "success", "roomkey": "²"}),
        lambda: ok_json({"result": "success", "roomkey": "١٢٣"}),
        # Far larger than any answer: not buffered (Content-Length, then chunked).
        lambda: ok_json({"result": "success", "roomkey": 1, "pad": "x" * 100_000}),
    ],
)
async def test_garbage_verify_answer_is_unavailable(
    scripted: Any, answer: Callable[[], web.Response]
) -> None:
    async def garbage(request: web.Request, n: int) -> web.Response:
        return answer()

    fake = await scripted(garbage)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        with pytest.raises(ApsUnavailable, match="unusable answer"):
            await client.verify(**call())
    assert len(fake.hits) == 1


async def test_lenient_verify_answer_parsing(scripted: Any) -> None:
    long_message = "重" * 50  # 150 bytes: over the protocol's 128-byte value limit

    async def lenient(request: web.Request, n: int) -> web.Response:
        notify: Any = {"ms": "ms-9", "message": long_message, "roomkey": "222222222222"}
        if n == 2:
            notify = {"ms": "ms-9"}  # malformed: ignored, the call still goes on
        return ok_json({"result": "success", "roomkey": "111111111111", "notify": notify})

    fake = await scripted(lenient)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        first = await client.verify(**call())
        second = await client.verify(**call())
    assert first.roomkey == 111111111111 and first.notify is not None
    assert first.notify.roomkey == 222222222222
    assert first.notify.message == "重" * 42  # cut at a character boundary, <= 128 bytes
    assert second.notify is None


async def test_customer_aps_plain_200_and_missing_call_event(scripted: Any) -> None:
    async def customer(request: web.Request, n: int) -> web.Response:
        if request.path == "/api/CallEvent":
            return web.Response(status=404, text="Not Found")
        return web.Response(text="200 OK")

    fake = await scripted(customer)
    async with ApsClient(fake.base + "/api", "ms-1", **FAST) as client:  # path prefix kept
        assert await client.call_event(7, "answered", 1.0) is False
        assert await client.record_file(7, "x.wav") is True
        assert await client.end_call(7, "") is True
    assert [path for path, _ in fake.hits] == ["/api/CallEvent", "/api/RecordFile", "/api/EndCall"]
    assert fake.hits[2][1] == {"appliance_id": "ms-1", "roomkey": 7, "record_file": ""}


async def test_report_refused_by_result_error(scripted: Any) -> None:
    async def refuse(request: web.Request, n: int) -> web.Response:
        return ok_json({"result": "error", "reason": "nope"})

    fake = await scripted(refuse)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        assert await client.end_call(1, "") is False
    assert len(fake.hits) == 1


async def test_chunked_flood_is_not_buffered(scripted: Any) -> None:
    async def flood(request: web.Request, n: int) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"result":"success","roomkey":1,"pad":"')
        for _ in range(100):
            await resp.write(b"x" * 4096)
        await resp.write(b'"}')
        return resp

    fake = await scripted(flood)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        with pytest.raises(ApsUnavailable, match="unusable answer"):
            await client.verify(**call())


async def test_overlong_notify_appliance_id_is_ignored(scripted: Any) -> None:
    async def answer(request: web.Request, n: int) -> web.Response:
        notify = {"ms": "m" * 129, "message": "x", "roomkey": 2}
        return ok_json({"result": "success", "roomkey": 1, "notify": notify})

    fake = await scripted(answer)
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        assert (await client.verify(**call())).notify is None


# -- the API token (finding 12) ------------------------------------------------------------------

TOKEN = "client-test-token-abcdef"


async def test_api_token_is_sent_on_every_request(scripted: Any) -> None:
    seen: list[str | None] = []

    async def record(request: web.Request, n: int) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return ok_json({"result": "success", "roomkey": 1} if n == 1 else {"result": "ok"})

    fake = await scripted(record)
    async with ApsClient(fake.base, "ms-1", api_token=TOKEN, **FAST) as client:
        await client.verify(**call())
        await client.call_event(1, "released", 1.0, 16, "normal release")
        await client.record_file(1, "x.wav")
        await client.end_call(1, "")
    async with ApsClient(fake.base, "ms-1", **FAST) as client:
        await client.end_call(1, "")
    assert seen == [f"Bearer {TOKEN}"] * 4 + [None]


async def test_reference_aps_with_a_token(tmp_path: Path) -> None:
    runner = await serve("127.0.0.1", 0, tmp_path / "aps.sqlite3", api_token=TOKEN)
    try:
        async with ApsClient(base_of(runner), "ms-1", api_token=TOKEN, **FAST) as client:
            roomkey = (await client.verify(**call())).roomkey
            assert await client.end_call(roomkey, "")
        for wrong in (None, "wrong"):
            async with ApsClient(base_of(runner), "ms-1", api_token=wrong, **FAST) as client:
                with pytest.raises(VerifyRejected) as info:
                    await client.verify(**call(dialogid=5))
                assert (info.value.status, info.value.reason) == (
                    401, "missing or wrong API token")
                assert await client.end_call(roomkey, "") is False
    finally:
        await runner.cleanup()


def _config(tmp_path: Path, **aps: Any) -> Config:
    return config_from_dict({"appliance": {"data_dir": str(tmp_path / "data")}, "aps": aps})


def _token_file(path: Path, text: str = TOKEN, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


async def test_from_config_reads_the_token_file(scripted: Any, tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def record(request: web.Request, n: int) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return ok_json({"result": "ok"})

    fake = await scripted(record)
    explicit = _token_file(tmp_path / "etc" / "aps-token", "explicit-token")
    default = tmp_path / "data" / "aps" / "api-token"
    cases = [
        (_config(tmp_path, url=fake.base), None),  # no file anywhere: no header
        (_config(tmp_path, url=fake.base, api_token_file=str(explicit)), "explicit-token"),
    ]
    for config, _ in cases:
        async with ApsClient.from_config(config) as client:
            await client.end_call(1, "")
    _token_file(default, "default-token")
    async with ApsClient.from_config(_config(tmp_path, url=fake.base)) as client:
        await client.end_call(1, "")
    assert seen == [None, "Bearer explicit-token", "Bearer default-token"]


def test_from_config_refuses_unusable_token_files(tmp_path: Path) -> None:
    readable = _token_file(tmp_path / "readable", mode=0o644)
    with pytest.raises(ApsConfigError, match="chmod 600"):
        ApsClient.from_config(_config(tmp_path, api_token_file=str(readable)))
    with pytest.raises(ApsConfigError, match="no token file"):
        ApsClient.from_config(_config(tmp_path, api_token_file=str(tmp_path / "absent")))


async def test_client_must_be_started() -> None:
    client = ApsClient("http://127.0.0.1:1", "ms-1")
    with pytest.raises(RuntimeError):
        await client.verify(**call())
    with pytest.raises(ValueError):
        ApsClient("http://127.0.0.1:1", "ms-1", attempts=0)
