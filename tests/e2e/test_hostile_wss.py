"""The public WSS port against a hostile client (issue 10, findings 1, 2, 3), real processes.

Hostile frames get a release with a cause 95-100 and the connection stays up; offers that
overflow the bus leak no channel; a slowloris client, a silent TCP client and an idle
WebSocket are cut in the configured time; the per-address cap refuses with HTTP 503 and a
reason; and (`@pytest.mark.fuzz`) mutated frames at scale leave no traceback, no busy
channel and a supervisor whose memory levels off.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from typing import Any

import aiohttp
import psutil
import pytest

from appliance.core import protocol as p
from appliance_sdk import MediaServerClient
from supervisor.heap_trim import TRIM_DELAY_S as HEAP_TRIM_DELAY_S
from tests.e2e.conftest import eventually
from tests.fuzz_scale import scaled
from tests.unit.test_protocol import offer_frame
from tests.unit.test_protocol_fuzz import SEEDS, mutate

pytestmark = pytest.mark.e2e

ROUNDS = 6
USERDATA = json.dumps({"id": "A123456789"})
OVERFLOW = 2**64


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def status(appliance: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(appliance.admin_url + "/status") as r:
        return await r.json()


async def channels_busy(appliance: Any) -> int:
    return sum(w["channels_busy"] for w in (await status(appliance))["workers"])


def supervisor_rss(appliance: Any) -> int:
    return psutil.Process(appliance.process.pid).memory_info().rss


def hostile_frames() -> list[tuple[str, str | bytes]]:
    """Each case of findings 1 and 2, by name."""
    def offer(**extra: Any) -> str:
        return json.dumps(offer_frame(**extra))

    return [
        ("dialogid 2^64", offer(dialogid=OVERFLOW)),
        ("ref 2^64 as a string", offer(ref=str(OVERFLOW))),
        ("roomkey 2^64", offer(module="Agent", roomkey=OVERFLOW)),
        ("lifetime 2^64", offer(lifetime=OVERFLOW)),
        ("caller 2^64", offer(caller=OVERFLOW)),
        ("negative caller", offer(caller=-1)),
        ("negative lifetime", offer(lifetime=-1)),
        ("action {}", '{"action":{},"dialogid":1,"ref":2}'),
        ("invalid UTF-8 in a binary frame", b'{"action":"release","dialogid":"\xff\xfe"}'),
        ("nesting 1000", "[" * 1000 + "]" * 1000),
        ("nesting 5000 unclosed", '{"a":' * 5000),
        ('dialogid "²"', '{"action":"release","dialogid":"\u00b2","ref":2}'),
        ("release cause 2^64",
         f'{{"action":"release","dialogid":1,"ref":2,"cause":{OVERFLOW}}}'),
        ("number 1e400", '{"action":"release","dialogid":1,"ref":2,"cause":1e400}'),
        ("not an object", '"offer"'),
    ]


async def raw_ws(session: aiohttp.ClientSession, appliance: Any) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(appliance.url, ssl=no_verify())


async def next_release(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5) -> dict[str, Any]:
    while True:
        msg = await ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        frame = json.loads(msg.data)
        if frame["action"] == "release":
            return frame


async def test_hostile_frames_get_a_release_and_the_connection_stays(
        aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, appliance)
        for name, frame in hostile_frames():
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
            release = await next_release(ws)
            assert p.CAUSE_INVALID_MESSAGE <= release["cause"] <= p.CAUSE_INVALID_IE_CONTENTS, \
                (name, release)
            assert release["causestring"], name
            assert not ws.closed, name
        # Still the same connection, still answering.
        await ws.send_str('{"action":"release","dialogid":7,"ref":8}')
        release = await next_release(ws)
        assert release["cause"] == p.CAUSE_MESSAGE_NOT_COMPATIBLE_WITH_STATE
        assert (release["dialogid"], release["ref"]) == (7, 8)
        await ws.close()
    assert "Traceback" not in appliance.log()


async def test_hostile_offers_leak_no_channel(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, appliance)
        fields = ["dialogid", "ref", "roomkey", "lifetime", "caller", "callee"]
        for i in range(100):
            await ws.send_str(json.dumps(offer_frame(**{fields[i % len(fields)]: OVERFLOW})))
        for _ in range(100):
            assert (await next_release(ws))["cause"] == p.CAUSE_INVALID_IE_CONTENTS
        assert await channels_busy(appliance) == 0
        await ws.close()
    async with await MediaServerClient.connect(appliance.url) as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        alert = await call.wait_for("alert", timeout=10)
        assert alert.action.channel >= 1
        await call.hangup()
    assert "Traceback" not in appliance.log()


async def test_oversized_frame_closes_with_1009(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, appliance)
        await ws.send_str(json.dumps(offer_frame(nickname="x" * (p.MAX_FRAME_BYTES + 10))))
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg


async def test_slowloris_and_silent_clients_are_cut(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url, signalling={"header_timeout": 2.0,
                                                    "handshake_timeout": 2.0})

    async def dribble() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", appliance.port,
                                                       ssl=no_verify())
        started = time.monotonic()
        head = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-Slow: " + b"a" * 200
        for byte in head:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
                if await asyncio.wait_for(reader.read(1), 0.3) == b"":
                    break
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                break
        writer.close()
        return time.monotonic() - started

    async def silent_tcp() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", appliance.port)
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(), 10)  # no ClientHello: EOF
        writer.close()
        assert data == b""
        return time.monotonic() - started

    slow, silent = await asyncio.gather(dribble(), silent_tcp())
    print(f"slowloris cut after {slow:.1f} s, silent TCP after {silent:.1f} s")
    assert 1.5 <= slow <= 5, slow  # header_timeout 2 s (plus the TLS handshake)
    assert 1.5 <= silent <= 5, silent


async def test_idle_websocket_is_closed_but_not_one_with_a_call(
        aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url, signalling={"idle_timeout": 2.0})
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, appliance)
        started = time.monotonic()
        msg = await ws.receive(timeout=10)
        elapsed = time.monotonic() - started
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
        assert "idle" in msg.extra
        assert 1.8 <= elapsed <= 4, elapsed
    # A client with a live call may stay silent: the SDK sends nothing after its offer.
    async with await MediaServerClient.connect(appliance.url) as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        await call.wait_for("dtls_connect", timeout=15)
        await asyncio.sleep(5)
        assert not client.closed and call.channel
        await call.hangup()


async def test_connection_cap_per_address_refuses_with_a_reason(
        aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url, signalling={"max_connections_per_address": 3,
                                                    "max_connections": 5})
    async with aiohttp.ClientSession() as session:
        held = [await raw_ws(session, appliance) for _ in range(3)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await raw_ws(session, appliance)
        assert info.value.status == 503
        async with session.get(appliance.url.replace("wss:", "https:"), ssl=no_verify()) as r:
            assert r.status == 503
            assert "too many connections from your address" in await r.text()
        # Another address is not refused for this one's connections...
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), ssl=no_verify())
        async with aiohttp.ClientSession(connector=other) as session2:
            held2 = [await session2.ws_connect(appliance.url) for _ in range(2)]
            # ...until the box-wide cap is reached.
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session2.ws_connect(appliance.url)
            assert info.value.status == 503
            for ws in held2:
                await ws.close()
        # A closed connection frees its place at once.
        await held.pop().close()
        await eventually(lambda: True, 0.5)
        held.append(await raw_ws(session, appliance))
        for ws in held:
            await ws.close()
    assert appliance.count_in_log("refused a connection from 127.0.0.1: too many "
                                  "connections from your address") >= 1
    assert "Traceback" not in appliance.log()


# -- at scale ------------------------------------------------------------------------------------


async def _fuzz_connection(appliance: Any, frames: list[bytes]) -> int:
    """Send `frames` over one WebSocket while reading every answer; return answers read."""
    answers = 0
    async with aiohttp.ClientSession() as session:
        ws = await raw_ws(session, appliance)

        async def read() -> None:
            nonlocal answers
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    answers += 1

        reader = asyncio.create_task(read())
        for i, frame in enumerate(frames):
            if i % 3 == 0:
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame.decode(errors="replace"))
            if i % 200 == 199:
                await asyncio.sleep(0.01)  # let the answers drain: we are a fast reader
        await asyncio.sleep(1)
        assert not ws.closed, ws.close_code
        await ws.close()
        await reader
    return answers


@pytest.mark.fuzz
@pytest.mark.timeout(3000)
async def test_fuzzed_frames_at_scale(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url, workers={"count": 2, "channels_per_worker": 50})
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    total = scaled(10_000, 100_000)
    parallel = 4
    # A live call throughout: the fuzz must not disturb it.
    async with await MediaServerClient.connect(appliance.url) as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        await call.wait_for("dtls_connect", timeout=15)
        rss = [supervisor_rss(appliance)]
        rounds = 4
        for _ in range(rounds):
            per = total // rounds // parallel
            batches = [[mutate(rng, rng.choice(SEEDS)) for _ in range(per)]
                       for _ in range(parallel)]
            answers = await asyncio.gather(*(_fuzz_connection(appliance, b) for b in batches))
            # Most frames are refused with a release; valid ice/DTMF/peerdata for a call
            # a mutated offer placed go to its worker unanswered.
            assert sum(answers) >= per * parallel * 0.5
            rss.append(supervisor_rss(appliance))
        assert not client.closed and call.channel
        await call.hangup()
    mb = [round(r / 2**20, 1) for r in rss]
    print(f"{total} fuzzed frames (seed {seed}): supervisor RSS MB after each quarter {mb}")
    # Frames that stayed valid offers place calls that time out (no DTLS): all end free.
    await eventually(lambda: True, 0.1)
    deadline = time.monotonic() + 30
    while await channels_busy(appliance) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert await channels_busy(appliance) == 0
    assert "Traceback" not in appliance.log()
    # Levels off: the last half grows far less than the first quarter's warm-up allows.
    assert rss[-1] - rss[2] <= max(8 * 2**20, (rss[1] - rss[0])), mb


@pytest.mark.fuzz
@pytest.mark.timeout(3000)
async def test_idle_connections_give_their_memory_back(aps: Any, make_appliance: Any) -> None:
    count = scaled(200, 2000)
    appliance = make_appliance(aps.url, signalling={"max_connections": count + 10,
                                                    "max_connections_per_address": 0})
    rss = [supervisor_rss(appliance)]
    connector = aiohttp.TCPConnector(limit=0, ssl=no_verify())
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(ROUNDS):
            held: list[aiohttp.ClientWebSocketResponse] = []
            for start in range(0, count, 50):
                held += await asyncio.gather(*(session.ws_connect(appliance.url)
                                               for _ in range(min(50, count - start))))
            open_rss = supervisor_rss(appliance)
            await asyncio.gather(*(ws.close() for ws in held))
            await asyncio.sleep(HEAP_TRIM_DELAY_S + 1.5)  # the supervisor trims its heap
            rss.append(supervisor_rss(appliance))
            print(f"{count} open: {open_rss / 2**20:.1f} MB, closed: {rss[-1] / 2**20:.1f} MB")
    mb = [round(r / 2**20, 1) for r in rss]
    print(f"{count} idle connections x{ROUNDS}: supervisor RSS MB at start and after each "
          f"round {mb}")
    # Levels off: later rounds reuse what the first took (and the heap is trimmed), so the
    # end stays within a small multiple of the first round's growth. A leak of what one
    # connection holds (~50 KB) would grow by a full first round every round.
    first = rss[1] - rss[0]
    assert rss[-1] - rss[0] <= 2.5 * first + 8 * 2**20, mb
    assert "Traceback" not in appliance.log()
