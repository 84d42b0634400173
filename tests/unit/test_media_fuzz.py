"""Hostile datagrams through every media entry point (finding 10): nothing may raise.

- the browser side: random and oversized datagrams into a real candidate socket and into
  the fast path (what aioice calls), and hostile *plaintext* protected with the peer's
  real SRTP keys (the caller is the one who may be hostile: it has the keys) into the
  relay's real handlers: voice bridge, video relay, RTCP feedback;
- the phone side: random datagrams into the RTP/RTCP sockets and the bridge's handlers.

Small in `make test`, 10^5 and more with `make fuzz`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.edges.rtc_adapter import (
    CandidatePolicy,
    SrtpFastPath,
    _dtls_transport,
    apply_candidate_policy,
    make_configuration,
)
from appliance.media import rtcp, rtp
from appliance.media.datagrams import DROPS, MAX_DATAGRAM
from appliance.media.quality import StreamMeter
from appliance.media.sip_rtp import RtpSocketPair
from appliance.media.video import VideoPath, VideoSink
from appliance.media.voice import BrowserAudio, VoiceBridge
from tests.fuzz_scale import scaled

pytestmark = pytest.mark.fuzz


@dataclass
class Relay:
    """A connected pair of real peer connections; `ours` has the fast path and the
    relay's handlers behind it, `theirs` is the (hostile) browser with its SRTP keys."""

    ours: RTCPeerConnection
    theirs: RTCPeerConnection
    fast: SrtpFastPath
    bridge: VoiceBridge
    video: VideoPath
    protect: Callable[[bytes], bytes]
    protect_rtcp: Callable[[bytes], bytes]
    port: int  # our candidate socket's port


async def _connected_pair() -> tuple[RTCPeerConnection, RTCPeerConnection]:
    policy = CandidatePolicy.from_strings(["127.0.0.1"])
    theirs, ours = RTCPeerConnection(make_configuration([])), RTCPeerConnection(
        make_configuration([]))
    theirs.addTransceiver("audio")
    theirs.addTransceiver("video")
    apply_candidate_policy(theirs, policy)
    await theirs.setLocalDescription(await theirs.createOffer())
    await ours.setRemoteDescription(theirs.localDescription)
    apply_candidate_policy(ours, policy)
    await ours.setLocalDescription(await ours.createAnswer())
    await theirs.setRemoteDescription(ours.localDescription)
    for _ in range(500):
        if ours.connectionState == theirs.connectionState == "connected":
            return theirs, ours
        await asyncio.sleep(0.01)
    raise AssertionError("the loopback peer connections did not connect")


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    theirs, ours = await _connected_pair()
    phone = await RtpSocketPair.open("127.0.0.1", 32000, 32999, lambda *a: None,
                                     lambda *a: None)
    sent: list[bytes] = []
    bridge = VoiceBridge(BrowserAudio("PCMU", 0, 1234, sent.append), phone,
                         on_dtmf=lambda key: None)
    bridge.phone_sdp("127.0.0.1", 9, 101)  # the discard port: what we send goes nowhere
    video = VideoPath(StreamMeter(90000, is_vp8=True), sent.append, 4321)
    video.connect(VideoSink(sent.append, 5678, 96, 3))

    def on_rtp(packet: bytes) -> None:  # what WebRtcLeg._on_rtp does with rtp_sinks
        {0: bridge.from_browser, 96: video.from_source}.get(packet[1] & 0x7F,
                                                            lambda p: None)(packet)

    def on_rtcp(packet: bytes) -> None:  # and _on_rtcp with its feedback sinks
        for item in rtcp.parse(packet):
            video.from_sink_feedback(item)

    fast = SrtpFastPath(ours, on_rtp, on_rtcp)
    tx = _dtls_transport(theirs)._tx_srtp  # type: ignore[union-attr]
    conn = fast._conn
    port = conn._protocols[0].transport.get_extra_info("sockname")[1]
    yield Relay(ours, theirs, fast, bridge, video, tx.protect, tx.protect_rtcp, port)
    fast.detach()
    bridge.close()
    await theirs.close()
    await ours.close()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b += rng.randbytes(rng.randint(1, 64))
        elif op == 3 and len(b) > 1:
            b[1] = rng.choice((0, 96, 200, 201, 205, 206, 0x80, 0xE0, rng.randrange(256)))
        elif op == 4 and b:
            b[0] = rng.choice((0x80, 0x90, 0xA0, 0xB0, 0x8F, 0xBF, rng.randrange(256)))
    return bytes(b)


def _seeds(rng: random.Random) -> list[bytes]:
    vp8_key = b"\x90\x80\x01" + b"\x10\x02\x00\x9d\x01\x2a\x80\x02\xe0\x01" + b"\x00" * 40
    return [
        rtp.build(0, True, rng.randrange(65536), rng.getrandbits(32), 7, b"\xff" * 160),
        rtp.build(96, True, rng.randrange(65536), rng.getrandbits(32), 8, vp8_key),
        rtp.build(96, False, rng.randrange(65536), 0, 8, b"\x10" + rng.randbytes(900)),
        rtp.sender_report(7, 0, 1, 2, [rtp.ReceiveStats(8000).report_block()], cname="x"),
        rtcp.pli(1, 5678),
        rtcp.remb(1, 300000, [5678]),
        struct.pack("!BBHII", 0x81, 205, 3, 1, 5678) + struct.pack("!HH", 5, 0xFFFF),
        struct.pack("!BBHII", 0x84, 206, 4, 1, 0) + struct.pack("!IBBH", 5678, 1, 0, 0),
    ]


async def test_random_and_oversized_datagrams_from_anyone(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(1)
    n = scaled(3_000, 100_000)
    before = DROPS.oversized
    with caplog.at_level(logging.INFO):
        for _ in range(n):
            size = rng.choice((0, 1, 11, 12, 13, 100, 1200, 1500, 1501, 2000, 9000))
            data = bytearray(rng.randbytes(size))
            if data and rng.random() < 0.7:
                data[0] = rng.randrange(128, 192)  # looks like RTP/RTCP: the hot path
            relay.fast._data_received(bytes(data), 1)
        # And through the kernel and aioice, from a stranger: a burst of the same.
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.2", 0))
        for size in (0, 1, 12, 1501, 4000, 65000) * 20:
            stranger.sendto(b"\x80" * size, ("127.0.0.1", relay.port))
        stranger.close()
        await asyncio.sleep(0.3)
    assert DROPS.oversized > before
    print(f"{n} random datagrams: {DROPS}, unprotect failures {relay.fast.unprotect_errors}")
    assert relay.ours.connectionState == "connected"  # aiortc's DTLS did not fail
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    lines = [r for r in caplog.records if r.name == "appliance.rtc"]
    assert len(lines) <= 4, [r.getMessage() for r in lines]


async def test_hostile_plaintext_from_the_keyed_browser(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(2)
    seeds = _seeds(rng)
    n = scaled(3_000, 100_000)
    delivered = 0
    with caplog.at_level(logging.INFO):
        for i in range(n):
            plain = _mutate(rng, rng.choice(seeds))
            if len(plain) >= 8 and 192 <= plain[1] <= 223:
                protect = relay.protect_rtcp
            elif len(plain) >= 12:
                # A fresh sequence number and SSRC each: the SRTP replay check passes.
                plain = plain[:2] + struct.pack("!H", i & 0xFFFF) + plain[4:8] + struct.pack(
                    "!I", 1000 + i // 60000) + plain[12:]
                protect = relay.protect
            else:
                continue
            try:
                data = protect(plain)
            except Exception:
                continue  # libsrtp will not protect it: nor would it unprotect it
            before = relay.fast.unprotect_errors
            relay.fast._data_received(data, 1)
            delivered += relay.fast.unprotect_errors == before
    assert delivered > n // 2  # the handlers really saw most of it
    assert not [r for r in caplog.records if r.exc_info]
    # What the handlers could not use was caught, counted and logged once per interval.
    lines = [r for r in caplog.records if r.name == "appliance.rtc"]
    assert len(lines) <= 2, [r.getMessage() for r in lines]
    print(f"handled {delivered}, handler errors {relay.fast.handler_errors}")


async def test_oversized_plaintext_is_not_sent_and_does_not_raise(relay: Relay) -> None:
    # A near-MTU video packet plus our abs-send-time extension does not fit SRTP's buffer.
    big = rtp.build(96, True, 1, 0, 9, b"\x10" + b"\x00" * (MAX_DATAGRAM - 40))
    relay.fast.send_rtp(big)
    assert relay.fast.protect_errors >= 1


async def test_phone_side_datagrams_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    got: list[bytes] = []
    received = asyncio.Event()

    phone = await RtpSocketPair.open("127.0.0.1", 33000, 33999, lambda *a: None,
                                     lambda *a: None)
    bridge = VoiceBridge(BrowserAudio("OPUS", 111, 1, got.append), phone,
                         on_dtmf=lambda key: None)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    bridge.phone_sdp(*peer.getsockname(), 101)

    def rtp_in(data: bytes, addr: tuple[str, int]) -> None:
        bridge.from_phone(data, addr)
        received.set()

    phone._rtp.on_datagram = rtp_in
    phone._rtcp.on_datagram = bridge.from_phone_rtcp
    rng = random.Random(3)
    seeds = [rtp.build(0, False, 1, 160, 5, b"\x7f" * 160),
             rtp.build(101, True, 2, 160, 5, b"\x05\x8a\x03\x20")]
    source = peer.getsockname()
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(scaled(3_000, 100_000)):
                data = _mutate(rng, rng.choice(seeds))
                bridge.from_phone(data, source)
                bridge.from_phone_rtcp(data, (source[0], source[1] + 1))
            for size in (0, 1, 12, 1501, 9000, 200):
                peer.sendto(b"\x80" * size, ("127.0.0.1", phone.port))
                peer.sendto(b"\x80" * size, ("127.0.0.1", phone.port + 1))
            await asyncio.wait_for(received.wait(), 2)
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        peer.close()
        bridge.close()


@settings(max_examples=scaled(300, 5_000), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.integers(0, 255), second=st.integers(0, 255), rest=st.binary(max_size=1600))
def test_parsers_never_raise(first: int, second: int, rest: bytes) -> None:
    data = bytes([first, second]) + rest
    header = rtp.parse_header(data)
    if header is not None:
        rtp.payload_of(data, header)
    rtp.rtcp_packets(data)
    rtcp.parse(data)


def test_transcoders_survive_garbage() -> None:
    from appliance.media.transcode import OpusToPcmu, PcmuToOpus

    rng = random.Random(4)
    to_pcmu, to_opus = OpusToPcmu(), PcmuToOpus()
    for _ in range(scaled(500, 20_000)):
        payload = rng.randbytes(rng.choice((0, 1, 3, 40, 160, 1200)))
        to_pcmu.feed(payload)
        to_opus.feed(payload)
    # Still alive afterwards: a real frame comes out of each.
    tone = bytes([0x10, 0x90] * 80)
    assert [f for _ in range(50) for f in to_opus.feed(tone)]
    fresh = PcmuToOpus()
    opus = [f for _ in range(50) for f in fresh.feed(tone)]
    assert [f for o in opus for f in to_pcmu.feed(o)]
