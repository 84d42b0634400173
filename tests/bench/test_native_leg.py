"""The load generator on the native loop (bench/native_leg.py): a `Playout` sends the very
bytes the Python streams (bench.pacer) send, from the same random draws, on real sockets,
plain and SRTP; a sink route meters what comes back as `RxStream` does, and hands the rest
up."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable

import pytest

from appliance import native
from bench.media_cache import VideoFrame
from bench.native_leg import MeterStream, audio_playout, video_playout
from bench.pacer import TxAudio, TxVideo
from bench.rtp_stats import RxStream

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)

KEY = bytes(range(30))  # AES-128 key + salt


def frames() -> tuple[VideoFrame, ...]:
    out = []
    for i in range(12):
        parts = 3 if i % 5 == 0 else 1 + i % 2
        out.append(VideoFrame(tuple(bytes([i, k]) * (50 + 40 * k) for k in range(parts)),
                              keyframe=i % 5 == 0))
    return tuple(out)


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(2048))
        except BlockingIOError:
            return out


# Ticks of 10 ms, a stall the streams must skip (> 200 ms), and keyframe requests.
TIMES = [k * 0.01 for k in range(40)] + [0.9 + k * 0.01 for k in range(30)]
PLI_AT = {0.12, 0.13, 0.95, 1.1}


def run(emit: Callable[[float], object], pli: Callable[[float], object] | None) -> None:
    for now in TIMES:
        if pli is not None and round(now, 2) in PLI_AT:
            pli(now)
        emit(now)


@pytest.mark.parametrize("srtp", [False, True], ids=["plain", "srtp"])
def test_video_playout_sends_what_txvideo_sends(srtp: bool) -> None:
    m = native.module()
    clip = frames()
    python: list[bytes] = []
    reference = TxVideo(python.append, 0x1234, 96, clip, 30, 0.005, random.Random(7))
    run(reference.emit, reference.keyframe_request)

    sender, receiver = udp(), udp()
    tx = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, KEY, True) if srtp else None
    ours = video_playout(tx, sender, receiver.getsockname(), 0x1234, 96, clip, 30, 0.005,
                         random.Random(7))
    run(ours.emit, ours.keyframe_request)
    got = received(receiver)
    if srtp:
        rx = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, KEY, False)
        got = [rx.unprotect(p) for p in got]
    assert got == python
    assert (ours.sent, ours.skipped, ours.keyframe_jumps) == (
        reference.sent, reference.skipped, reference.keyframe_jumps)
    assert reference.skipped > 0 and reference.keyframe_jumps >= 2  # the test saw both
    assert (ours.seq, ours.ts) == (reference.seq, reference.ts)
    sender.close()
    receiver.close()


def test_audio_playout_marks_only_the_first_packet_as_txaudio_does() -> None:
    payloads = tuple(bytes([k]) * 160 for k in range(5))
    python: list[bytes] = []
    reference = TxAudio(python.append, 77, 0, payloads, 160, 0.003, random.Random(2))
    run(reference.emit, None)
    sender, receiver = udp(), udp()
    ours = audio_playout(None, sender, receiver.getsockname(), 77, 0, payloads, 160, 0.003,
                         random.Random(2))
    run(ours.emit, None)
    got = received(receiver)
    assert got == python
    assert [p[1] & 0x80 for p in got[:2]] == [0x80, 0]
    ours.keyframe_request(5.0)  # audio has no keyframes: nothing to jump to
    assert ours.keyframe_jumps == 0
    sender.close()
    receiver.close()


def test_emit_all_sends_every_playout_and_a_stopped_one_sends_nothing() -> None:
    m = native.module()
    sender, receiver = udp(), udp()
    payloads = (b"\x00" * 160,)
    streams = [audio_playout(None, sender, receiver.getsockname(), 10 + k, 0, payloads, 160,
                             0.0, random.Random(k)) for k in range(3)]
    streams[2].stop()
    assert m.emit_all(streams, 0.05) == 2 * 3  # 0.00, 0.02, 0.04 for the two running
    assert len(received(receiver)) == 6
    with pytest.raises(TypeError):
        m.emit_all([object()], 0.1)
    sender.close()
    receiver.close()


def test_playout_refuses_what_it_cannot_send() -> None:
    m = native.module()
    sock = udp()
    inbound = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, KEY, False)
    base = dict(fd=sock.fileno(), host="127.0.0.1", port=9, ssrc=1, payload_type=0,
                keyframes=(), period=0.02, ts_step=160, start=0.0, seq=0, ts=0)
    with pytest.raises(ValueError):
        m.Playout(inbound, frames=((b"x",),), **base)  # not an outbound session
    with pytest.raises(TypeError):
        m.Playout(None, frames=(), **base)
    with pytest.raises(ValueError):
        m.Playout(None, frames=((b"x" * 1500,),), **base)  # no room for the header
    with pytest.raises(ValueError):
        m.Playout(None, frames=((b"x",),), **{**base, "keyframes": (3,)})
    with pytest.raises(ValueError):
        m.Playout(None, frames=((b"x",),), **{**base, "period": 0.0})
    sock.close()


def rtp(seq: int, ts: int, ssrc: int = 5, pt: int = 96, marker: bool = False,
        payload: bytes = b"p" * 100) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def test_a_sink_meters_as_rxstream_and_hands_the_rest_up() -> None:
    m = native.module()
    appliance, caller = udp(), udp()
    loop = m.PortLoop(caller.fileno())
    host, port = appliance.getsockname()
    flow = loop.add_flow(host, port, None)
    metered = MeterStream(90000, is_vp8=True)
    loop.add_sink(flow, 96, metered.meter)
    reference = RxStream(90000)
    # Loss, reordering, a duplicate, a sequence wrap, a late packet (jitter).
    seqs = [65530, 65531, 65533, 65532, 65534, 65534, 65535, 0, 3, 4]
    now = 50.0
    for k, seq in enumerate(seqs):
        packet = rtp(seq, 3000 * k, marker=k % 3 == 0)
        appliance.sendto(packet, caller.getsockname())
        now += 1 / 30 + (0.004 if k == 6 else 0.0)
        assert loop.drain(now, 0.0) == []
        reference.packet(packet, now)
    assert metered.snapshot() == reference.snapshot()

    appliance.sendto(rtp(9, 0, pt=101), caller.getsockname())  # not a sink's type
    stranger = udp()
    stranger.sendto(rtp(5, 0), caller.getsockname())  # not the flow's address
    up = loop.drain(now, 0.0)
    assert [addr for _, addr in up] == [appliance.getsockname(), stranger.getsockname()]
    assert metered.snapshot() == reference.snapshot()
    for sock in (appliance, caller, stranger):
        sock.close()
