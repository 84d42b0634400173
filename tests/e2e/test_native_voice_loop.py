"""The native loop's voice routes (appliance/native/_packetloop.c) on real UDP sockets,
against the Python voice bridge's own pieces (rtp.TalkSpurts, RtpRewriter.rewrite and
stamp, conditions.pcmu_has_sound): the same packets in - talkspurts after silence, loss,
reordering, duplicates, a new SSRC, a hold, a key press - the same bytes out.

Run in the loopback-only namespace: tests/in-loopback-netns.sh .venv/bin/python -m pytest
tests/e2e/test_native_voice_loop.py
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pylibsrtp
import pytest

from appliance import native
from appliance.media import rtp
from appliance.media.conditions import pcmu_has_sound
from bench.native_path import srtp_session
from bench.system import loopback_only

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)]

PCMU, OUT_PT = 0, 0
OUR_SSRC, SEQ, FIRST_TS = 0x5EED, 65000, 4_000_000_000


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


class PythonVoice:
    """What VoiceBridge does with one direction's PCMU packet (from_phone/_to_browser_pcmu,
    from_browser/_to_phone): the reference."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rewriter = rtp.RtpRewriter(OUR_SSRC, 8000)
        self.rewriter._seq = SEQ
        monkeypatch.setattr(rtp.random, "getrandbits", lambda bits: FIRST_TS)
        self.spurts = rtp.TalkSpurts(8000)
        self.last_sound = 0.0

    def packet(self, data: bytes, now: float, pause: int) -> bytes | None:
        header = rtp.parse_header(data)
        assert header is not None
        payload = rtp.payload_of(data, header)
        if header.sequence % 10 == 0 and pcmu_has_sound(payload):
            self.last_sound = now
        if pause == 1:
            return None
        silence = self.spurts.starts(header.sequence, header.timestamp)
        if pause == 2:
            self.rewriter.stamp(header.ssrc, header.timestamp, now)
            return None
        return self.rewriter.rewrite(header.ssrc, OUT_PT, silence > 0, header.timestamp,
                                     payload, now)


@dataclass
class Rig:
    port: socket.socket  # the phone's RTP socket (the loop's)
    phone: socket.socket
    browser: socket.socket
    loop: Any
    flow: int
    rewriter: Any
    meter: Any
    browser_rx: pylibsrtp.Session | None

    def received(self) -> list[bytes]:
        got = []
        while True:
            try:
                data = self.browser.recv(4096)
            except BlockingIOError:
                return got
            got.append(self.browser_rx.unprotect(data) if self.browser_rx else data)


def make_rig(srtp: bool) -> Rig:
    m = native.module()
    port, phone, browser = udp(), udp(), udp()
    out = udp()  # the worker's media socket the browser's packets leave from
    loop = m.PortLoop(port.fileno())
    flow = loop.add_flow("127.0.0.1", phone.getsockname()[1], None)
    meter = m.Meter(8000, False)
    rewriter = m.Rewriter(OUR_SSRC, 8000, True, SEQ, FIRST_TS)
    key = os.urandom(30)
    tx = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, key, True) if srtp else None
    loop.add_route(flow, PCMU, meter, rewriter, OUT_PT, tx, "127.0.0.1",
                   browser.getsockname()[1], voice=True, sound_check=True, fd=out.fileno())
    rx = srtp_session(pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, key, False) \
        if srtp else None
    rig = Rig(port, phone, browser, loop, flow, rewriter, meter, rx)
    rig.out = out  # type: ignore[attr-defined]
    return rig


@pytest.fixture(params=[False, True], ids=["plain", "srtp"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    if not loopback_only():
        pytest.fail("run in the loopback-only namespace: tests/in-loopback-netns.sh ...")
    rig = make_rig(request.param)
    yield rig
    for s in (rig.port, rig.phone, rig.browser, rig.out):  # type: ignore[attr-defined]
        s.close()


def voice_stream(rnd: random.Random, count: int) -> list[tuple[bytes, int]]:
    """(packet, pause) pairs: 20 ms PCMU with silence gaps, loss, reordering, duplicates,
    an SSRC change, a hold (2) and a key press (1)."""
    ssrc, seq, ts = 0xCAFE, rnd.randrange(65536), rnd.randrange(1 << 32)
    out: list[tuple[bytes, int]] = []
    for i in range(count):
        roll = rnd.random()
        if roll < 0.05:
            ts += 160 * rnd.randrange(5, 50)  # the sender was silent (DTX): a talkspurt
        elif roll < 0.10:
            seq += 1
            ts += 160  # one lost
        elif roll < 0.12:
            ssrc = rnd.randrange(1 << 32)  # a new source (the phone re-INVITEd)
        seq, ts = (seq + 1) & 0xFFFF, (ts + 160) & 0xFFFFFFFF
        payload = bytes([0xFF]) * 160 if rnd.random() < 0.3 else os.urandom(160)
        pause = 2 if 100 <= i < 130 else 1 if 200 <= i < 210 else 0
        packet = rtp.build(PCMU, rnd.random() < 0.5, seq, ts, ssrc, payload)
        out.append((packet, pause))
        if rnd.random() < 0.03 and len(out) > 2:
            out[-1], out[-2] = out[-2], out[-1]  # reordered
        if rnd.random() < 0.02:
            out.append((packet, pause))  # duplicated
    return out


def test_voice_route_is_byte_for_byte_the_python_bridge(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = PythonVoice(monkeypatch)
    stream = voice_stream(random.Random(7), 300)
    now = 1000.0
    expected: list[bytes] = []
    got: list[bytes] = []
    for i in range(0, len(stream), 20):  # in batches, as the loop drains them
        batch = stream[i:i + 20]
        pause = batch[0][1]
        # One pause per batch (Python sets it between drains); the reference follows it.
        rig.loop.set_paused(rig.flow, PCMU, pause)
        for data, _ in batch:
            rig.phone.sendto(data, rig.port.getsockname())
        time.sleep(0.03)
        now += 0.4
        assert rig.loop.drain(now, time.time()) == []
        for data, _ in batch:
            out = reference.packet(data, now, pause)
            if out is not None:
                expected.append(out)
        time.sleep(0.01)
        got += rig.received()  # as it comes: the receive buffer holds ~250 datagrams
    time.sleep(0.03)
    got += rig.received()
    assert got == expected
    assert rig.rewriter.packets == reference.rewriter.packets
    assert rig.rewriter.last_timestamp == reference.rewriter.last_timestamp
    stats = rig.loop.route_stats(rig.flow, PCMU)
    assert stats["last_sound"] == reference.last_sound
    assert rig.meter.figures()["received"] == len(stream)
    loop_stats = rig.loop.stats()
    assert loop_stats["relayed_elsewhere"] == len(expected) and loop_stats["relayed"] == 0


def test_a_stranger_and_other_payload_types_go_up_to_python(rig: Rig) -> None:
    stranger = udp()
    try:
        packet = rtp.build(PCMU, False, 1, 160, 0xBAD, bytes(160))
        stranger.sendto(packet, rig.port.getsockname())
        event = rtp.build(101, True, 2, 320, 0xCAFE, b"\x05\x0a\x00\xa0")
        rig.phone.sendto(event, rig.port.getsockname())
        time.sleep(0.03)
        up = rig.loop.drain(1.0, time.time())
        assert sorted(d for d, _ in up) == sorted([packet, event])
        assert rig.received() == []
    finally:
        stranger.close()


def test_python_and_the_loop_take_turns_on_one_stream(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    # Python sends the ringback on the same native rewriter, then the loop relays the
    # phone: one sequence space, the marker on the switch.
    ringback = [rig.rewriter.rewrite(1 << 32, OUT_PT, False, 160 * i, bytes(160), 5.0)
                for i in range(3)]
    assert [rtp.parse_header(p).sequence for p in ringback] == [  # type: ignore[union-attr]
        (SEQ + i) & 0xFFFF for i in (1, 2, 3)]
    rig.phone.sendto(rtp.build(PCMU, False, 10, 80000, 0xCAFE, bytes(160)),
                     rig.port.getsockname())
    time.sleep(0.03)
    rig.loop.drain(5.02, time.time())
    (got,) = rig.received()
    header = rtp.parse_header(got)
    assert header is not None
    assert header.sequence == (SEQ + 4) & 0xFFFF and header.marker
    assert header.timestamp == (FIRST_TS + 2 * 160 + 160) & 0xFFFFFFFF  # 20 ms later
