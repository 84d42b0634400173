"""Media from strangers, end to end (findings 6, 10, 15c, 15d): a real appliance, sipp as
the desk phone's signalling, and this test as the phone's media (its SDP names our socket,
`-key rtp_port`), so we see exactly what the appliance sends the phone and can tell the
phone's real packets from a stranger's."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiortc.rtp import RtpPacket

from appliance.media import dtmf, g711, rtp
from appliance_sdk import Call
from tests.e2e.audio_probe import TagReader
from tests.e2e.conftest import eventually, free_udp_ports
from tests.e2e.test_voice import place_call, sipp_ok
from tests.sipp_runner import Sipp, start_sipp

pytestmark = pytest.mark.e2e

# A loud 1 kHz tone, 20 ms of PCMU: unmistakable in the browser's decoded audio.
LOUD = g711.encode([int(20000 * math.sin(2 * math.pi * 1000 * i / 8000)) for i in range(160)])


@dataclass
class PhoneMedia:
    """The desk phone's RTP socket (what its SDP says), capturing what the appliance sends."""

    sock: socket.socket
    got: list[tuple[float, RtpPacket]] = field(default_factory=list)
    source: tuple[str, int] | None = None  # where the appliance's RTP comes from

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def drain(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            self.source = addr
            self.got.append((time.monotonic(), RtpPacket.parse(data)))


def udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


async def send_voice_and_key(sock: socket.socket, target: tuple[str, int], key: str,
                             ssrc: int, packets: int = 150, pace: float = 0.005) -> None:
    """`packets` loud PCMU packets then an RFC 4733 key press, as a phone would send."""
    for i in range(packets):
        sock.sendto(rtp.build(0, i == 0, 1000 + i, 160 * i, ssrc, LOUD), target)
        await asyncio.sleep(pace)
    for i, event in enumerate(dtmf.key_packets(key)):
        sock.sendto(rtp.build(101, event.first, 2000 + i, 160 * packets, ssrc, event.payload),
                    target)
        await asyncio.sleep(pace)


def appliance_rtp_port(appliance: Any) -> int:
    found = re.search(r"INVITE .* RTP 127\.0\.0\.1:(\d+)\)", appliance.log())
    assert found, appliance.log()[-3000:]
    return int(found.group(1))


def status(appliance: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{appliance.admin_url}/status", timeout=2) as answer:
        return dict(json.load(answer))


def refused_counted(appliance: Any, at_least: int) -> bool:
    """The refusals as counted: /status when it shows the worker's counter, else the
    bridge's rate-limited summary line ("(N since start)")."""
    with contextlib.suppress(OSError, ValueError):
        workers = status(appliance)["workers"]
        if workers and "rtp_refused_source" in workers[0]:
            return sum(w["rtp_refused_source"] for w in workers) >= at_least
    totals = re.findall(r"RTP/RTCP not from the phone's SDP address.*?\((\d+) since start",
                        appliance.log())
    return bool(totals) and max(int(t) for t in totals) >= at_least


@contextlib.asynccontextmanager
async def phone_call(
    tmp_path: Path, aps: Any, make_appliance: Any, scenario: str, **sip: Any,
) -> AsyncIterator[tuple[Any, Call, TagReader, Sipp, PhoneMedia]]:
    media = PhoneMedia(udp_socket("127.0.0.1"))
    sipp = await start_sipp(f"desk/{scenario}", tmp_path, "-key", "rtp_port", str(media.port),
                            "-mp", str(free_udp_ports(4)), timeout="40s")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address, **sip})
    client, call, _track, reader = await place_call(appliance)
    try:
        yield appliance, call, reader, sipp, media
    finally:
        await client.close()
        sipp.kill()
        media.sock.close()


async def capture(media: PhoneMedia, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        media.drain()
        await asyncio.sleep(0.01)


async def test_strangers_rtp_and_dtmf_never_reach_the_browser(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with phone_call(tmp_path, aps, make_appliance, "desk_media_at_key.xml") as (
        appliance, call, reader, sipp, media
    ):
        await call.wait_for("Join", timeout=15)
        await capture(media, 1.0)  # the caller's voice reaches the phone's socket
        assert media.got and media.source is not None
        target = ("127.0.0.1", appliance_rtp_port(appliance))
        assert media.source == target
        await asyncio.sleep(0.5)  # the ringback's last frames are in and decoded
        loud_before = reader.loud_frames
        # Strangers: another address, and the phone's address from another port.
        strangers = [udp_socket("127.0.0.2"), udp_socket("127.0.0.1")]
        await asyncio.gather(*(send_voice_and_key(s, target, "1", 0x5000 + i)
                               for i, s in enumerate(strangers)))
        await asyncio.sleep(1.0)
        assert reader.loud_frames == loud_before, "a stranger's RTP reached the browser"
        assert not [e for e in call.history if e.name == "DTMF"], "a stranger's key press"
        await eventually(lambda: refused_counted(appliance, 2 * 150), timeout=16)
        assert "RTP/RTCP not from the phone's SDP address from 127.0.0.2" in appliance.log()

        # Hostile datagrams at the browser side's port (the ICE host candidate of our
        # answer): empty, oversized, SRTP-looking garbage. No traceback, the call goes on.
        answer = (await call.wait_for("answer")).action.answer.sdp
        ice = re.search(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 (\d+) typ host", answer)
        assert ice, answer
        browser_side = ("127.0.0.1", int(ice.group(1)))
        for size in (0, 1, 12, 100, 1501, 2000, 9000, 60000) * 50:
            strangers[0].sendto(b"\x80\x00" + b"\xab" * max(0, size - 2) if size else b"",
                                browser_side)
        for s in strangers:
            s.close()

        # The phone itself, from its SDP's address and port: heard, and its key arrives.
        await send_voice_and_key(media.sock, target, "7", 0x7777, packets=100, pace=0.02)
        key = (await call.wait_for("DTMF", timeout=5)).action
        assert key.value == "7"
        assert reader.loud_frames - loud_before > 50, (loud_before, reader.loud_frames)
        await capture(media, 0.5)
        assert media.got[-1][0] > time.monotonic() - 0.3  # the caller's voice still flows
        log = appliance.log()
        assert "Traceback" not in log and "Exception in callback" not in log, log[-4000:]

        # 15c: the caller (aiortc) marks every packet; the phone sees M on the first only.
        packets = [p for _, p in media.got if p.payload_type == 0]
        assert len(packets) > 100
        assert packets[0].marker == 1 and not any(p.marker for p in packets[1:]), [
            i for i, p in enumerate(packets) if p.marker]
        await call.hangup()
        await sipp_ok(sipp)


async def test_latching_follows_a_phone_behind_a_port_rewriting_nat(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with phone_call(tmp_path, aps, make_appliance, "desk_media_at_key.xml",
                          rtp_latching=True) as (appliance, call, reader, sipp, media):
        await call.wait_for("Join", timeout=15)
        target = ("127.0.0.1", appliance_rtp_port(appliance))
        await asyncio.sleep(0.5)
        loud_before = reader.loud_frames
        # The phone's packets arrive from another port than its SDP's (a NAT): latched.
        natted = PhoneMedia(udp_socket("127.0.0.1"))
        stranger = udp_socket("127.0.0.2")
        await send_voice_and_key(natted.sock, target, "3", 0x3333, packets=60, pace=0.02)
        await send_voice_and_key(stranger, target, "9", 0x9999, packets=60, pace=0.005)
        key = (await call.wait_for("DTMF", timeout=5)).action
        assert key.value == "3"
        await asyncio.sleep(0.5)
        assert [e.action.value for e in call.history if e.name == "DTMF"] == ["3"]
        assert reader.loud_frames - loud_before > 30
        # Symmetric RTP: the caller's voice now goes where the phone's came from.
        media.drain()
        media.got.clear()
        await capture(natted, 0.5)
        await capture(media, 0.2)
        assert len(natted.got) > 10 and not media.got, (len(natted.got), len(media.got))
        stranger.close()
        natted.sock.close()
        await call.hangup()
        await sipp_ok(sipp)


async def test_no_sequence_gap_towards_the_phone_across_a_hold(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with phone_call(tmp_path, aps, make_appliance, "desk_hold_media_at_key.xml") as (
        _appliance, call, _reader, sipp, media
    ):
        await call.wait_for("Join", timeout=15)
        # 1.5 s talking, 1.5 s held (sendonly), 1.5 s after the resume, then BYE.
        ended = asyncio.ensure_future(call.wait_for("release", timeout=20))
        while not ended.done():
            media.drain()
            await asyncio.sleep(0.01)
        await sipp_ok(sipp)
    packets = [(at, p) for at, p in media.got if p.payload_type == 0]
    gaps = [(b[0] - a[0], a[1], b[1]) for a, b in itertools.pairwise(packets)]
    pause, before, after = max(gaps, key=lambda g: g[0])
    assert pause > 1.0, "no hold seen: the appliance kept sending"
    seqs = [p.sequence_number for _, p in packets]
    jumps = [(b - a) & 0xFFFF for a, b in itertools.pairwise(seqs)]
    assert set(jumps) == {1}, [j for j in jumps if j != 1]
    # The timestamps went on with the clock across the hold (within a few frames).
    ts_gap = ((after.timestamp - before.timestamp) & 0xFFFFFFFF) / 8000
    assert abs(ts_gap - pause) < 0.1, (ts_gap, pause)
    resumed = next(i for i, (_, p) in enumerate(packets) if p is after)
    markers = [i for i, (_, p) in enumerate(packets) if p.marker]
    assert markers == [0, resumed], markers  # the first packet, and the first after the hold
