"""The native port loop (appliance/native/_packetloop.c `PortLoop`) on real UDP sockets:
a browser's SRTP video relayed to the other browser without Python seeing it, byte for
byte what the Python relay (rtp.parse_header, payload_of, RtpRewriter, abs-send-time)
makes of it; everything else handed up untouched.

Run in the loopback-only namespace: tests/in-loopback-netns.sh .venv/bin/python -m pytest
tests/e2e/test_native_loop.py
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pylibsrtp
import pytest

from appliance import native
from appliance.media import rtp
from bench.native_path import srtp_session
from bench.system import loopback_only
from tests.fuzz_scale import scaled
from tests.unit.test_native_rewrite import python_relay

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)]

PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
VIDEO_PT, OUT_PT, EXT_ID = 96, 100, 3


def session(key: bytes, outbound: bool) -> pylibsrtp.Session:
    return srtp_session(PROFILE, key, outbound)


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def keyframe(width: int = 640, height: int = 480) -> bytes:
    return b"\x10\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + os.urandom(80)


def delta() -> bytes:
    return b"\x10\x01" + os.urandom(100)


@dataclass
class Rig:
    port: socket.socket  # the worker's media socket
    a: socket.socket  # the customer's browser
    b: socket.socket  # the agent's browser
    a_tx: pylibsrtp.Session
    b_rx: pylibsrtp.Session
    loop: Any
    flow: int
    rewriter: Any
    meter: Any
    reference: rtp.RtpRewriter

    def send(self, data: bytes) -> None:
        self.a.sendto(data, self.port.getsockname())

    def drain(self, now: float, wall: float) -> list[tuple[bytes, tuple[str, int]]]:
        time.sleep(0.05)  # loopback delivers at once; let the datagrams land
        return self.loop.drain(now, wall)

    def received_by_b(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.b_rx.unprotect(self.b.recv(4096)))
            except BlockingIOError:
                return got


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    if not loopback_only():
        pytest.fail("run in the loopback-only namespace: tests/in-loopback-netns.sh ...")
    m = native.module()
    key_a, key_b = os.urandom(30), os.urandom(30)
    port, a, b = udp(), udp(), udp()
    loop = m.PortLoop(port.fileno())
    flow = loop.add_flow("127.0.0.1", a.getsockname()[1],
                         m.Srtp(m.PROFILE_AES128_CM_SHA1_80, key_a, False))
    meter = m.Meter(90000, True)
    rewriter = m.Rewriter(0xB0B, 90000, False, 40000, 123456)
    reference = rtp.RtpRewriter(0xB0B, 90000, mark_switches=False)
    reference._seq = 40000
    monkeypatch.setattr(rtp.random, "getrandbits", lambda bits: 123456)
    loop.add_route(flow, VIDEO_PT, meter, rewriter, OUT_PT,
                   m.Srtp(m.PROFILE_AES128_CM_SHA1_80, key_b, True), "127.0.0.1",
                   b.getsockname()[1], abs_send_time_id=EXT_ID)
    yield Rig(port, a, b, session(key_a, True), session(key_b, False), loop, flow, rewriter,
              meter, reference)
    for s in (port, a, b):
        s.close()


def test_video_is_relayed_from_a_keyframe_on_and_byte_for_byte_the_python_relays(
        rig: Rig) -> None:
    sent = [rtp.build(VIDEO_PT, False, 1, 9000, 0xA11CE, delta()),  # before any keyframe
            rtp.build(VIDEO_PT, False, 2, 12000, 0xA11CE, keyframe()),
            rtp.build(VIDEO_PT, True, 3, 12000, 0xA11CE, delta()),
            rtp.build(VIDEO_PT, False, 5, 15000, 0xA11CE, delta())]  # 4 lost
    for packet in sent:
        rig.send(rig.a_tx.protect(packet))
    now, wall = 50.0, 1.7e9
    assert rig.drain(now, wall) == []  # nothing for Python
    got = rig.received_by_b()
    expected = [python_relay(rig.reference, p, OUT_PT, now, EXT_ID, wall) for p in sent[1:]]
    assert got == expected
    assert rig.loop.route_stats(rig.flow, VIDEO_PT) == {
        "relayed": 3, "held": 1, "retransmitted": 0, "paused": 0, "await_keyframe": 0,
        "last_sound": 0.0}
    figures = rig.meter.figures()
    assert (figures["received"], figures["expected"], figures["keyframes"]) == (4, 5, 1)
    assert (figures["width"], figures["height"]) == (640, 480)
    stats = rig.loop.stats()
    assert stats["relayed"] == 3 and stats["handed_up"] == 0 and stats["send_errors"] == 0


def test_what_is_not_a_routed_srtp_packet_is_handed_up_untouched(rig: Rig) -> None:
    stranger = udp()
    try:
        audio = rig.a_tx.protect(rtp.build(0, False, 9, 160, 0xA0D10, b"\xff" * 160))
        rtcp = rig.a_tx.protect_rtcp(bytes([0x80, 201, 0, 1]) + (0xA11CE).to_bytes(4, "big"))
        stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
        dtls = bytes([22, 0xFE, 0xFD]) + os.urandom(40)
        for data in (audio, rtcp, stun, dtls):
            rig.send(data)
        spoofed = rig.a_tx.protect(rtp.build(VIDEO_PT, False, 7, 1, 0xA11CE, keyframe()))
        stranger.sendto(spoofed, rig.port.getsockname())  # right keys, wrong address
        up = rig.drain(1.0, 1.0)
        a_addr, stranger_addr = rig.a.getsockname(), stranger.getsockname()
        assert up == [(audio, a_addr), (rtcp, a_addr), (stun, a_addr), (dtls, a_addr),
                      (spoofed, stranger_addr)]
        assert rig.received_by_b() == []
        assert rig.loop.stats()["handed_up"] == 5
    finally:
        stranger.close()


def test_forged_and_replayed_video_is_dropped_and_counted(rig: Rig) -> None:
    good = rig.a_tx.protect(rtp.build(VIDEO_PT, False, 1, 0, 0xA11CE, keyframe()))
    forged = bytearray(rig.a_tx.protect(rtp.build(VIDEO_PT, False, 2, 0, 0xA11CE, delta())))
    forged[30] ^= 0x40
    for data in (good, good, bytes(forged), b"\x80\x60" + bytes(8)):  # replay, forgery, short
        rig.send(data)
    up = rig.drain(1.0, 1.0)
    assert up == [(b"\x80\x60" + bytes(8), rig.a.getsockname())]  # too short for RTP: Python's
    assert len(rig.received_by_b()) == 1
    assert rig.loop.stats()["unprotect_failed"] == 2


def test_a_paused_route_holds_and_resumes_from_the_next_keyframe(rig: Rig) -> None:
    seq = iter(range(1, 100))

    def send(payload: bytes) -> None:
        rig.send(rig.a_tx.protect(rtp.build(VIDEO_PT, False, next(seq), 0, 0xA11CE, payload)))

    send(keyframe())
    send(delta())
    rig.drain(1.0, 1.0)
    assert len(rig.received_by_b()) == 2
    rig.loop.set_paused(rig.flow, VIDEO_PT, True)
    send(keyframe())
    send(delta())
    rig.drain(2.0, 2.0)
    assert rig.received_by_b() == []
    rig.loop.set_paused(rig.flow, VIDEO_PT, False)
    send(delta())  # deltas after a resume are useless to the receiver
    send(keyframe(320, 240))
    rig.drain(3.0, 3.0)
    (relayed,) = rig.received_by_b()
    assert b"\x9d\x01\x2a" in relayed
    assert rig.loop.route_stats(rig.flow, VIDEO_PT)["held"] == 3
    assert rig.meter.figures()["width"] == 320  # the meter counts what is held, too


def test_flows_and_routes_are_bounded_and_checked(rig: Rig) -> None:
    m = native.module()
    rx = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, os.urandom(30), False)
    with pytest.raises(ValueError, match="exists"):
        rig.loop.add_flow("127.0.0.1", rig.a.getsockname()[1], rx)
    with pytest.raises(ValueError):
        rig.loop.add_flow("not an address", 5, rx)
    with pytest.raises(ValueError):
        rig.loop.add_flow("127.0.0.1", 0, rx)
    with pytest.raises(ValueError, match="routed already"):
        rig.loop.add_route(rig.flow, VIDEO_PT, rig.meter, rig.rewriter, OUT_PT,
                           m.Srtp(m.PROFILE_AES128_CM_SHA1_80, os.urandom(30), True),
                           "127.0.0.1", 9)
    with pytest.raises(KeyError):
        rig.loop.set_paused(999, VIDEO_PT, True)
    flow = rig.loop.add_flow("::1", 5004, rx)
    rig.loop.remove_flow(flow)
    with pytest.raises(KeyError):
        rig.loop.remove_flow(flow)
    assert rig.loop.stats()["flows"] == 1


def test_a_nack_is_answered_from_the_cache_with_the_same_bytes(rig: Rig) -> None:
    sent: dict[int, bytes] = {}
    for seq in range(1, 301):  # more than the cache holds: the oldest are gone
        payload = keyframe() if seq == 1 else delta()
        rig.send(rig.a_tx.protect(rtp.build(VIDEO_PT, False, seq, seq * 3000, 0xA11CE,
                                            payload)))
        if seq % 50 == 0:
            rig.drain(1.0, 1.0)
            while True:  # what B got, as sent (protected)
                try:
                    data = rig.b.recv(4096)
                except BlockingIOError:
                    break
                sent[int.from_bytes(data[2:4], "big")] = data
    assert len(sent) == 300
    newest = max(sent, key=lambda s: (s - 40000) & 0xFFFF)
    asked = [newest, (newest - 10) & 0xFFFF, (newest - 299) & 0xFFFF, 12345, -1, 70000]
    assert rig.loop.retransmit(rig.flow, VIDEO_PT, asked) == 2  # the rest: too old or never
    again = [rig.b.recv(4096) for _ in range(2)]
    assert again == [sent[newest], sent[(newest - 10) & 0xFFFF]]  # byte for byte
    assert rig.loop.route_stats(rig.flow, VIDEO_PT)["retransmitted"] == 2
    assert rig.loop.retransmit(rig.flow, VIDEO_PT, list(range(100_000))) <= 256  # bounded
    with pytest.raises(TypeError):
        rig.loop.retransmit(rig.flow, VIDEO_PT, 5)


@pytest.mark.fuzz
def test_hostile_datagrams_never_break_the_loop(rig: Rig) -> None:
    """Random datagrams from the flow's own address and from a stranger, some shaped like
    SRTP video: the loop never crashes, relays nothing that is not authentic, and every
    datagram is accounted for."""
    import random

    rng = random.Random(13)
    stranger = udp()
    firsts = [0x00, 0x01, 0x16, 0x17, 0x80, 0x90, 0xA0, 0xBF, 0xC0, 0xFF]
    total = 0
    try:
        for _round in range(scaled(20, 400)):
            for _ in range(50):
                size = rng.choice([0, 1, 11, 12, 13, 40, 200, 1200, 1500, 1501, 2000])
                data = bytes([rng.choice(firsts), rng.choice([VIDEO_PT, 0, 200, 0xE0])]) + \
                    rng.randbytes(max(0, size - 2))
                (rig.a if rng.random() < 0.7 else stranger).sendto(data[:size],
                                                                   rig.port.getsockname())
                total += 1
            rig.drain(1.0, 1.0)
        stats = rig.loop.stats()
        assert stats["datagrams"] == total
        assert stats["relayed"] == 0 and rig.received_by_b() == []
        routed = rig.loop.route_stats(rig.flow, VIDEO_PT)
        # Each datagram: too long, handed up, or taken by the route (forged: counted).
        assert stats["oversized"] + stats["handed_up"] + stats["unprotect_failed"] \
            + routed["held"] == total
    finally:
        stranger.close()


def test_a_browser_that_moves_is_followed_and_a_removed_route_comes_up_again(
        rig: Rig) -> None:
    moved_a, moved_b = udp(), udp()
    try:
        def from_(sock: socket.socket, seq: int, payload: bytes) -> bytes:
            data = rig.a_tx.protect(rtp.build(VIDEO_PT, False, seq, 0, 0xA11CE, payload))
            sock.sendto(data, rig.port.getsockname())
            return data

        from_(rig.a, 1, keyframe())
        rig.drain(1.0, 1.0)
        assert len(rig.received_by_b()) == 1
        # The customer's browser checks from a new address: its camera comes from there.
        rig.loop.move_flow(rig.flow, *moved_a.getsockname())
        stale = from_(rig.a, 2, delta())
        from_(moved_a, 3, delta())
        assert rig.drain(2.0, 2.0) == [(stale, rig.a.getsockname())]  # not the flow now
        assert len(rig.received_by_b()) == 1
        # The agent's browser moves: the route's packets follow it.
        rig.loop.set_route_dest(rig.flow, VIDEO_PT, *moved_b.getsockname())
        from_(moved_a, 4, delta())
        rig.drain(3.0, 3.0)
        assert rig.received_by_b() == [] and len(moved_b.recv(4096)) > 100
        with pytest.raises(ValueError, match="another flow"):
            other = rig.loop.add_flow("127.0.0.1", 9, native.module().Srtp(
                native.module().PROFILE_AES128_CM_SHA1_80, os.urandom(30), False))
            rig.loop.move_flow(other, *moved_a.getsockname())
        # No route for the payload type any more: its packets come up to Python again.
        rig.loop.remove_route(rig.flow, VIDEO_PT)
        up = from_(moved_a, 5, delta())
        assert rig.drain(4.0, 4.0) == [(up, moved_a.getsockname())]
        with pytest.raises(KeyError):
            rig.loop.remove_route(rig.flow, VIDEO_PT)
    finally:
        moved_a.close()
        moved_b.close()
