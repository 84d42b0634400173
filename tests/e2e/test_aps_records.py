"""Every call AP-S verified ends with exactly one release report and one EndCall (finding 11),
whatever ends it: the WebSocket closing while verify is in flight, the offer's SDP refused
after verify, a DTLS timeout, the appliance shutting down mid-verify.

The AP-S the appliance talks to is a slow one: a proxy in front of the reference AP-S that
forwards each /verify at once (so the roomkey is issued and recorded, live=1) and then sits
on the answer for a random while. That is the outside world the bug needs: the roomkey
exists at AP-S before the appliance hears of it. The proxy also counts the reports.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import stat
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection

from appliance.core import agent_token
from appliance.core import protocol as p
from appliance.core.token_file import load_or_create_token, read_token
from reference_aps.server import serve as serve_aps
from tests.e2e.conftest import ROOT, eventually, free_port, free_udp_ports, write_toml
from tests.fuzz_scale import scaled

pytestmark = pytest.mark.e2e


@dataclass
class SlowAps:
    """Forwards to the reference AP-S; /verify answers after `delay(dialogid)` seconds."""

    target: str
    delay: Any = lambda dialogid: 0.0
    url: str = ""
    issued: dict[int, int] = field(default_factory=dict)  # dialogid -> roomkey handed out
    answered_at: dict[int, float] = field(default_factory=dict)  # dialogid -> monotonic
    verifies: Counter[int] = field(default_factory=Counter)  # by dialogid
    releases: Counter[int] = field(default_factory=Counter)  # CallEvent released, by roomkey
    end_calls: Counter[int] = field(default_factory=Counter)  # by roomkey
    session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        assert self.session is not None
        body = await request.read()
        fields = json.loads(body)
        async with self.session.post(self.target + request.path, data=body,
                                     headers={"Content-Type": "application/json"}) as resp:
            status, answer = resp.status, await resp.read()
        if request.path == "/verify":
            dialogid = fields["dialogid"]
            self.verifies[dialogid] += 1
            roomkey = json.loads(answer).get("roomkey")
            if roomkey is not None:
                self.issued[dialogid] = roomkey
            await asyncio.sleep(self.delay(dialogid))
            self.answered_at[dialogid] = time.monotonic()
        elif request.path == "/CallEvent" and fields["event"] == "released":
            self.releases[fields["roomkey"]] += 1
        elif request.path == "/EndCall":
            self.end_calls[fields["roomkey"]] += 1
        return web.Response(status=status, body=answer, content_type="application/json")


@pytest.fixture
async def slow_aps(aps: Any) -> AsyncIterator[SlowAps]:
    proxy = SlowAps(aps.url)
    app = web.Application()
    app.router.add_post("/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    proxy.url = f"http://{host}:{port}"
    proxy.session = aiohttp.ClientSession()
    yield proxy
    await proxy.session.close()
    await runner.cleanup()


async def offer_sdp() -> str:
    """A real browser-like offer (audio + video), made once and reused by every call."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    pc.addTransceiver("video")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def offer_frame(dialogid: int, sdp: str) -> bytes:
    return p.encode(p.Offer(
        dialogid=dialogid, ref=dialogid, medium=2, caller=5678, callee=9333,
        userdata=json.dumps({"id": f"A{dialogid:09d}"}),
        offer=p.SessionDescription(type="offer", sdp=sdp),
    ))


async def offer_then_close(url: str, frame: bytes, close_after: float) -> float:
    """One browser: offer, then its WebSocket closes (tab closed); returns when it closed."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url, ssl=False) as ws:
        await ws.send_bytes(frame)
        try:  # read (and drop) whatever the appliance says until it is time to go
            async with asyncio.timeout(close_after):
                while not (await ws.receive()).type.name.startswith("CLOS"):
                    pass
        except TimeoutError:
            pass
        closed = time.monotonic()
    return closed


def cdr_rows(db_path: Any) -> dict[int, tuple[int, Any]]:
    with sqlite3.connect(db_path) as db:
        return {k: (live, endcall) for k, live, endcall in
                db.execute("SELECT roomkey, live, endcall_at FROM calls")}


def assert_each_ended_once(slow_aps: SlowAps, rows: dict[int, tuple[int, Any]]) -> None:
    issued = set(slow_aps.issued.values())
    assert issued <= set(rows)
    assert [k for k in issued if rows[k][0] != 0] == [], "AP-S records left live"
    assert {k: n for k, n in slow_aps.end_calls.items() if n != 1} == {}
    assert set(slow_aps.end_calls) == issued, "a roomkey without EndCall, or an unknown one"
    assert {k: n for k, n in slow_aps.releases.items() if n != 1} == {}
    assert set(slow_aps.releases) == issued


async def channels_busy(appliance: Any) -> int:
    async with aiohttp.ClientSession() as session, session.get(
        appliance.admin_url + "/status"
    ) as resp:
        status = await resp.json()
    return sum(w["channels_busy"] for w in status["workers"])


@pytest.mark.fuzz
async def test_websockets_closing_during_verify_leave_no_live_record(
    slow_aps: SlowAps, make_appliance: Any, aps: Any
) -> None:
    rng = random.Random(11)
    calls = scaled(50, 500)
    delays = {d: rng.uniform(0.2, 1.2) for d in range(1, calls + 1)}
    slow_aps.delay = delays.__getitem__
    appliance = make_appliance(slow_aps.url, workers={"count": 2, "channels_per_worker": 30},
                               media={"dtls_timeout": 1.0}, aps={"timeout": 3.0})
    sdp = await offer_sdp()
    closed_at: dict[int, float] = {}
    wave = 8  # under [admission] max_setup_per_address: all of them reach verify

    async def one(dialogid: int) -> None:
        # Every fifth offer has an SDP nobody can answer: "offer SDP refused" after verify.
        frame = offer_frame(dialogid, "v=0\r\n" if dialogid % 5 == 0 else sdp)
        # Half the tabs close while AP-S sits on the answer, the others at any time after
        # (answering, awaiting DTLS, or after the 1 s DTLS timeout).
        delay = delays[dialogid]
        close_after = rng.uniform(0.0, delay - 0.1) if dialogid % 2 else \
            rng.uniform(delay + 0.1, delay + 2.0)
        closed_at[dialogid] = await offer_then_close(appliance.url, frame, close_after)

    for start in range(1, calls + 1, wave):
        await asyncio.gather(*(one(d) for d in range(start, min(start + wave, calls + 1))))

    # Reproduces the finding only if many WebSockets closed while AP-S still held the answer.
    await eventually(lambda: len(slow_aps.answered_at) == len(slow_aps.verifies), 15)
    during_verify = [d for d, t in slow_aps.answered_at.items() if closed_at[d] < t]
    print(f"{calls} offers, {len(slow_aps.issued)} roomkeys issued, {len(during_verify)} "
          "WebSockets closed during verify")
    assert len(slow_aps.issued) >= calls * 0.9
    assert len(during_verify) >= calls // 3
    assert max(slow_aps.verifies.values()) == 1  # no retries muddle the counts
    await eventually(
        lambda: all(cdr_rows(aps.db_path)[k][0] == 0 for k in slow_aps.issued.values()), 20)
    await asyncio.sleep(1.0)  # a duplicate report would arrive now
    assert_each_ended_once(slow_aps, cdr_rows(aps.db_path))
    assert await channels_busy(appliance) == 0
    assert appliance.count_in_log("Traceback") == 0
    # The ends covered: tab closed (during verify or later), SDP refused, DTLS timeout.
    with sqlite3.connect(aps.db_path) as db:
        ends = Counter(c.split(":")[0] for (c,) in db.execute("SELECT causestring FROM calls"))
    print("ends:", dict(ends))
    assert {"normal release", "offer SDP refused", "Connect Timeout"} <= set(ends)


async def test_shutdown_during_verify_ends_every_record(
    slow_aps: SlowAps, make_appliance: Any, aps: Any
) -> None:
    slow_aps.delay = lambda dialogid: 1.5
    appliance = make_appliance(slow_aps.url, workers={"count": 2, "channels_per_worker": 4},
                               aps={"timeout": 3.0})
    sdp = await offer_sdp()
    tasks = [asyncio.create_task(offer_then_close(appliance.url, offer_frame(d, sdp), 30))
             for d in range(1, 7)]
    await eventually(lambda: len(slow_aps.issued) == 6, 10)  # all six roomkeys are issued
    assert not slow_aps.answered_at  # ... and none answered yet
    stop = asyncio.get_running_loop().run_in_executor(None, appliance.stop)
    assert await stop == 0
    await asyncio.gather(*tasks)
    assert_each_ended_once(slow_aps, cdr_rows(aps.db_path))
    causes = sqlite3.connect(aps.db_path).execute("SELECT DISTINCT cause FROM calls").fetchall()
    assert causes == [(41,)]  # "appliance shutting down"


async def test_appliance_sends_the_api_token(
    make_appliance: Any, tmp_path: Any
) -> None:
    """The real processes with an AP-S that wants its bearer token (finding 12)."""
    token_file = tmp_path / "aps-token"
    token = load_or_create_token(token_file)
    db = tmp_path / "locked-aps.sqlite3"
    runner = await serve_aps("127.0.0.1", 0, db, api_token=token)
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    try:
        sdp = await offer_sdp()
        with_token = make_appliance(url, aps={"api_token_file": str(token_file)})
        without = make_appliance(url)
        for appliance, dialogid in ((with_token, 1), (without, 2)):
            async with aiohttp.ClientSession() as session, session.ws_connect(
                appliance.url, ssl=False
            ) as ws:
                await ws.send_bytes(offer_frame(dialogid, sdp))
                first = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                if appliance is with_token:
                    assert first["action"] == "alert", first
                else:  # AP-S answers 401: a final refusal, the user gets "verify error"
                    assert (first["action"], first["cause"], first["causestring"]) == (
                        "release", 21, "verify error"), first
        await eventually(lambda: [r[0] for r in cdr_rows(db).values()] == [0], 10)
        assert without.count_in_log("missing or wrong API token") == 1
    finally:
        await runner.cleanup()


async def test_demo_locks_its_aps_and_prints_agent_links(tmp_path: Any) -> None:
    """`appliance demo`: AP-S wants its token, the appliance has it, and each new call's
    agent link carries an agent token the appliance's secret verifies (finding 12)."""
    port, aps_port, admin = free_port(), free_port(), free_port()
    secret_file = tmp_path / "agent-secret"
    config = tmp_path / "demo.toml"
    write_toml(config, {
        "appliance": {"data_dir": str(tmp_path / "data")},
        "signalling": {"listen": "127.0.0.1", "port": port},
        "workers": {"count": 1},
        "aps": {"url": f"http://127.0.0.1:{aps_port}",
                "agent_token_secret_file": str(secret_file), "require_agent_token": True},
        "sip": {"base_port": free_udp_ports(2), "proxy": f"127.0.0.1:{free_udp_ports(1)}"},
        "admin": {"port": admin},
    })
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "launcher.cli", "demo", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT)
    try:
        assert demo.stdout is not None
        async with asyncio.timeout(30):
            while not (line := await demo.stdout.readline()).startswith(b"READY"):
                assert line, "the demo exited"
        token_file = tmp_path / "data" / "aps" / "api-token"
        for private in (token_file, secret_file, tmp_path / "data" / "aps" / "aps.sqlite3"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{aps_port}/cdr") as resp:
                assert resp.status == 401
            sdp = await offer_sdp()
            async with session.ws_connect(f"wss://127.0.0.1:{port}/", ssl=False) as ws:
                await ws.send_bytes(offer_frame(1, sdp))
                first = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                assert first["action"] == "alert", first  # verified: the token was sent
                async with asyncio.timeout(10):
                    while b"agent page for call" not in (line := await demo.stdout.readline()):
                        assert line
                url = line.decode().split(": ", 1)[1].strip()
                query = parse_qs(urlsplit(url).query)
                roomkey, token = int(query["roomkey"][0]), query["token"][0]
                assert url.startswith(f"https://127.0.0.1:{port}/AgentVideo.html?roomkey=")
                agent_token.check(read_token(secret_file).encode(), roomkey, token, time.time())
                # The appliance, locked, admits the agent with that token and no one without.
                for dialogid, with_token in ((2, False), (3, True)):
                    agent = p.Offer(dialogid=dialogid, ref=dialogid, medium=2, module="Agent",
                                    roomkey=roomkey,
                                    offer=p.SessionDescription(type="offer", sdp=sdp))
                    if with_token:
                        agent.token = token
                    async with session.ws_connect(f"wss://127.0.0.1:{port}/",
                                                  ssl=False) as agent_ws:
                        await agent_ws.send_bytes(p.encode(agent))
                        first = json.loads((await asyncio.wait_for(agent_ws.receive(), 10)).data)
                    if with_token:
                        assert first["action"] == "alert", first
                    else:
                        assert (first["action"], first["cause"]) == ("release", 21), first
    finally:
        demo.terminate()
        await demo.wait()


async def test_channel_stays_booked_until_its_verify_settles(
    slow_aps: SlowAps, make_appliance: Any
) -> None:
    """A tab closed mid-verify frees its channel (and setup slot) only once AP-S answered:
    otherwise offer-and-close in a loop would pile up verify requests without bound."""
    slow_aps.delay = lambda dialogid: 2.0
    appliance = make_appliance(slow_aps.url, aps={"timeout": 3.0})
    await offer_then_close(appliance.url, offer_frame(1, await offer_sdp()), 0.2)
    await eventually(lambda: appliance.count_in_log("released while AP-S verifies") == 1, 5)
    assert await channels_busy(appliance) == 1
    await eventually(lambda: 1 in slow_aps.answered_at, 5)
    for _ in range(50):
        if await channels_busy(appliance) == 0:
            break
        await asyncio.sleep(0.1)
    assert await channels_busy(appliance) == 0
    await eventually(lambda: sum(slow_aps.end_calls.values()) == 1, 5)
