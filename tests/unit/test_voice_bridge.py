"""The voice bridge against real loopback sockets: whose RTP it takes (finding 6), the
marker bit it sets (15c) and its sequence numbers across a hold (15d)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from aiortc.rtp import RtpPacket

from appliance.media import dtmf, rtp
from appliance.media.datagrams import DROPS
from appliance.media.sip_rtp import RtpSocketPair
from appliance.media.voice import BrowserAudio, VoiceBridge

PHONE = ("127.0.0.1", 0)  # the "desk phone": a socket of ours, port filled in below
TONE = bytes(range(0, 160))  # anything but silence


class Phone:
    """A real UDP socket standing in for the desk phone: what the bridge sends it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()

    async def received(self, settle: float = 0.05) -> list[RtpPacket]:
        await asyncio.sleep(settle)
        out = []
        while True:
            try:
                out.append(RtpPacket.parse(self.sock.recv(2048)))
            except BlockingIOError:
                return out


class Bridge:
    def __init__(self, bridge: VoiceBridge, to_browser: list[bytes], keys: list[str],
                 phone: Phone) -> None:
        self.bridge, self.to_browser, self.keys, self.phone = bridge, to_browser, keys, phone


async def make_bridge(latching: bool = False, codec: str = "PCMU") -> Bridge:
    sockets = await RtpSocketPair.open("127.0.0.1", 31000, 31999, lambda *a: None,
                                       lambda *a: None)
    to_browser: list[bytes] = []
    keys: list[str] = []
    pt = 0 if codec == "PCMU" else 111
    bridge = VoiceBridge(BrowserAudio(codec, pt, 1111, to_browser.append), sockets,
                         on_dtmf=keys.append, latching=latching, label="channel 7: ")
    return Bridge(bridge, to_browser, keys, Phone())


@pytest.fixture
async def pcmu() -> AsyncIterator[Bridge]:
    b = await make_bridge()
    yield b
    b.bridge.close()
    b.phone.sock.close()


def phone_packet(seq: int, pt: int = 0, payload: bytes = TONE, ts: int | None = None) -> bytes:
    return rtp.build(pt, False, seq, 160 * seq if ts is None else ts, 0xABC, payload)


def event_packets(key: str) -> list[bytes]:
    return [rtp.build(101, e.first, 900 + i, 4000, 0xABC, e.payload)
            for i, e in enumerate(dtmf.key_packets(key))]


# -- finding 6: RTP only from the address the phone's SDP gave ------------------------------


async def test_nothing_is_taken_before_the_phone_sdp(pcmu: Bridge) -> None:
    before = DROPS.refused_source
    pcmu.bridge.from_phone(phone_packet(1), ("127.0.0.1", 30000))
    for packet in event_packets("5"):
        pcmu.bridge.from_phone(packet, ("127.0.0.1", 30000))
    assert pcmu.to_browser == [] and pcmu.keys == []
    assert pcmu.bridge.refused_source == 1 + len(dtmf.key_packets("5"))
    assert DROPS.refused_source - before == pcmu.bridge.refused_source


async def test_only_the_sdp_address_and_port_reach_the_browser(pcmu: Bridge) -> None:
    pcmu.bridge.phone_sdp("127.0.0.1", 30000, 101)
    strangers = [("127.0.0.2", 30000), ("127.0.0.1", 30002), ("127.0.0.1", 30001)]
    for i, source in enumerate(strangers):
        pcmu.bridge.from_phone(phone_packet(i), source)
        for packet in event_packets("9"):
            pcmu.bridge.from_phone(packet, source)
        pcmu.bridge.from_phone_rtcp(rtp.receiver_report(1, []), ("127.0.0.2", 30001))
    assert pcmu.to_browser == [] and pcmu.keys == []
    assert not hasattr(pcmu.bridge, "last_phone_rtcp")
    pcmu.bridge.from_phone(phone_packet(10), ("127.0.0.1", 30000))
    for packet in event_packets("9"):
        pcmu.bridge.from_phone(packet, ("127.0.0.1", 30000))
    pcmu.bridge.from_phone_rtcp(rtp.receiver_report(1, []), ("127.0.0.1", 30001))
    assert len(pcmu.to_browser) == 1 and pcmu.keys == ["9"]
    assert pcmu.bridge.last_phone_rtcp
    assert pcmu.bridge.refused_source == 3 * (1 + len(dtmf.key_packets("9")) + 1)


async def test_a_reinvite_of_the_dialog_moves_the_accepted_source(pcmu: Bridge) -> None:
    pcmu.bridge.phone_sdp("127.0.0.1", 30000, 101)
    pcmu.bridge.phone_sdp("127.0.0.3", 30010, 101)  # a transfer moved the media
    pcmu.bridge.from_phone(phone_packet(1), ("127.0.0.1", 30000))
    assert pcmu.to_browser == []
    pcmu.bridge.from_phone(phone_packet(2), ("127.0.0.3", 30010))
    assert len(pcmu.to_browser) == 1
    # Hold with c=0.0.0.0 says nothing about where the phone sends from: keep the source.
    pcmu.bridge.phone_sdp("0.0.0.0", 30010, 101, hold=True)
    pcmu.bridge.from_phone(phone_packet(3), ("127.0.0.3", 30010))
    assert len(pcmu.to_browser) == 2


async def test_latching_takes_the_first_port_of_the_sdp_ip_only() -> None:
    b = await make_bridge(latching=True)
    try:
        b.bridge.phone_sdp(*b.phone.address, 101)
        b.bridge.from_phone(phone_packet(1), ("127.0.0.2", b.phone.address[1]))  # other IP
        assert b.to_browser == []
        natted = ("127.0.0.1", b.phone.address[1] + 7)  # the NAT rewrote the port
        b.bridge.from_phone(phone_packet(2), natted)
        assert len(b.to_browser) == 1
        assert b.bridge.phone.remote_rtp == natted  # symmetric RTP: we answer there
        b.bridge.from_phone(phone_packet(3), ("127.0.0.1", b.phone.address[1]))
        assert len(b.to_browser) == 1 and b.bridge.refused_source == 2
        # A new SDP from the dialog starts a new latch.
        b.bridge.phone_sdp("127.0.0.1", 30500, 101)
        b.bridge.from_phone(phone_packet(4), ("127.0.0.1", 30600))
        assert len(b.to_browser) == 2 and b.bridge.phone.remote_rtp == ("127.0.0.1", 30600)
    finally:
        b.bridge.close()
        b.phone.sock.close()


async def test_refusals_are_logged_once_per_interval(pcmu: Bridge,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    pcmu.bridge.phone_sdp("127.0.0.1", 30000, 101)
    with caplog.at_level(logging.INFO, logger="appliance.voice"):
        for i in range(2000):
            pcmu.bridge.from_phone(phone_packet(i), ("127.0.0.2", 40000 + i % 50))
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.voice"]
    assert len(lines) == 1, lines
    assert "channel 7: " in lines[0] and "127.0.0.2" in lines[0] and "127.0.0.1:30000" in lines[0]
    assert pcmu.bridge.refused_source == 2000


async def test_a_stranger_on_the_real_socket_is_refused(pcmu: Bridge) -> None:
    """The same through the kernel: the socket pair's callbacks are the bridge's."""
    sockets = pcmu.bridge.phone
    sockets._rtp.on_datagram = pcmu.bridge.from_phone
    pcmu.bridge.phone_sdp(*pcmu.phone.address, 101)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.2", 0))
    for i in range(150):
        stranger.sendto(phone_packet(i), ("127.0.0.1", sockets.port))
    for packet in event_packets("1"):
        stranger.sendto(packet, ("127.0.0.1", sockets.port))
    stranger.sendto(b"\x80" * 3000, ("127.0.0.1", sockets.port))  # oversized: no traceback
    for i in range(5):
        pcmu.phone.sock.sendto(phone_packet(200 + i), ("127.0.0.1", sockets.port))
    stranger.close()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(pcmu.to_browser) == 5:
            break
    assert len(pcmu.to_browser) == 5 and pcmu.keys == []
    assert pcmu.bridge.refused_source == 150 + len(dtmf.key_packets("1"))


# -- finding 15c: the marker bit is ours -------------------------------------------------


def browser_packet(seq: int, ts: int, marker: bool = True) -> bytes:
    # aiortc callers set M on every packet; the bridge must not pass it on.
    return rtp.build(0, marker, seq, ts, 0x5555, TONE)


async def test_marker_only_at_start_talkspurt_and_after_dtmf(pcmu: Bridge) -> None:
    pcmu.bridge.phone_sdp(*pcmu.phone.address, 101)
    seq, ts = 100, 5000
    for _ in range(10):
        pcmu.bridge.from_browser(browser_packet(seq, ts))
        seq, ts = seq + 1, ts + 160
    seq, ts = seq + 1, ts + 160  # one lost packet: no talkspurt
    for _ in range(5):
        pcmu.bridge.from_browser(browser_packet(seq, ts))
        seq, ts = seq + 1, ts + 160
    ts += 8000  # one second of DTX: the next packet starts a talkspurt
    for _ in range(5):
        pcmu.bridge.from_browser(browser_packet(seq, ts))
        seq, ts = seq + 1, ts + 160
    got = await pcmu.phone.received()
    assert [p.marker for p in got] == [1] + [0] * 14 + [1] + [0] * 4
    # DTMF events take the stream's place; the voice after them starts a talkspurt.
    assert pcmu.bridge.send_dtmf("4", duration_ms=40)
    await asyncio.sleep(0.15)
    for _ in range(3):
        pcmu.bridge.from_browser(browser_packet(seq, ts))
        seq, ts = seq + 1, ts + 160
    got += await pcmu.phone.received()
    voice = [p for p in got[20:] if p.payload_type == 0]
    events = [p for p in got[20:] if p.payload_type == 101]
    assert events and [p.marker for p in voice] == [1, 0, 0]
    seqs = [p.sequence_number for p in got]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs)), seqs


async def test_phone_to_browser_marker_at_switch_and_talkspurt_only(pcmu: Bridge) -> None:
    pcmu.bridge.phone_sdp("127.0.0.1", 30000, 101)
    pcmu.bridge.start_ringback()
    await asyncio.sleep(0.1)
    ringback = len(pcmu.to_browser)
    assert ringback >= 3
    for i in range(5):  # the phone sets M everywhere, as a hostile one might
        pcmu.bridge.from_phone(rtp.build(0, True, 10 + i, 160 * i, 0xABC, TONE),
                               ("127.0.0.1", 30000))
    pcmu.bridge.from_phone(rtp.build(0, True, 15, 160 * 5 + 4000, 0xABC, TONE),
                           ("127.0.0.1", 30000))
    parsed = [RtpPacket.parse(p) for p in pcmu.to_browser]
    assert [p.marker for p in parsed] == [1] + [0] * (ringback - 1) + [1, 0, 0, 0, 0, 1]
    seqs = [p.sequence_number for p in parsed]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs)), seqs


# -- finding 15d: no sequence gap across a hold ------------------------------------------


async def test_hold_keeps_sequence_numbers_and_moves_timestamps_by_the_clock(
    pcmu: Bridge,
) -> None:
    pcmu.bridge.phone_sdp(*pcmu.phone.address, 101)
    seq, ts = 1, 0

    async def talk(n: int) -> None:
        nonlocal seq, ts
        for _ in range(n):
            pcmu.bridge.from_browser(browser_packet(seq, ts))
            seq, ts = seq + 1, ts + 160
            await asyncio.sleep(0.02)

    await talk(10)
    pcmu.bridge.phone_sdp(*pcmu.phone.address, 101, hold=True)  # re-INVITE sendonly
    await talk(25)  # half a second on hold: nothing may be sent, no number used up
    pcmu.bridge.phone_sdp(*pcmu.phone.address, 101, hold=False)
    await talk(10)
    got = await pcmu.phone.received()
    assert len(got) == 20
    seqs = [p.sequence_number for p in got]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs)), seqs
    jump = (got[10].timestamp - got[9].timestamp) & 0xFFFFFFFF
    assert jump == 26 * 160  # the 25 held frames' time, then one frame
    assert [p.marker for p in got] == [1] + [0] * 9 + [1] + [0] * 9


async def test_opus_transcoded_path_has_no_gap_across_hold() -> None:
    from appliance.media.ringback import Ringback
    from appliance.media.transcode import PcmuToOpus

    b = await make_bridge(codec="OPUS")
    try:
        b.bridge.phone_sdp(*b.phone.address, 101)
        tone, enc = Ringback(), PcmuToOpus()
        opus = [f for _ in range(60) for f in enc.feed(tone.next_frame()[1])]
        for i, frame in enumerate(opus):
            if i == 20:
                b.bridge.phone_sdp(*b.phone.address, 101, hold=True)
            if i == 40:
                b.bridge.phone_sdp(*b.phone.address, 101, hold=False)
            b.bridge.from_browser(rtp.build(111, True, i, 960 * i, 0x77, frame))
        got = await b.phone.received()
        seqs = [p.sequence_number for p in got]
        assert len(got) >= 35 and all(
            (y - x) & 0xFFFF == 1 for x, y in itertools.pairwise(seqs)), seqs
        assert sum(p.marker for p in got) == 2
    finally:
        b.bridge.close()
        b.phone.sock.close()
