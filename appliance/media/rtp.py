"""RTP and RTCP at the byte level, for relaying packets without decoding them.

Everything here is pure and on the per-packet path: keep it allocation-light.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass

RTP_VERSION_BITS = 0x80
_HEADER = struct.Struct("!BBHII")
_U16 = struct.Struct("!H")
NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)

RTCP_SR = 200
RTCP_RR = 201
RTCP_SDES = 202
RTCP_BYE = 203


def is_rtp_or_rtcp(data: bytes) -> bool:
    """RFC 7983 demultiplexing: the first byte of RTP/RTCP is 128..191."""
    return len(data) >= 12 and 127 < data[0] < 192


def is_rtcp(data: bytes) -> bool:
    """RFC 5761: RTCP packet types 192..223 sit where RTP's marker+payload type are."""
    return len(data) >= 8 and 192 <= data[1] <= 223


@dataclass(slots=True)
class RtpHeader:
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload_offset: int


def parse_header(data: bytes) -> RtpHeader | None:
    """The fixed header and where the payload starts (after CSRCs, extension and before
    padding is not stripped: payload = data[offset:len-padding])."""
    if len(data) < 12 or data[0] & 0xC0 != RTP_VERSION_BITS:
        return None
    b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
    offset = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:  # header extension: 4-byte header, then length in 32-bit words
        if len(data) < offset + 4:
            return None
        offset += 4 + 4 * _U16.unpack_from(data, offset + 2)[0]
    if offset > len(data):
        return None
    return RtpHeader(b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, offset)


def payload_of(data: bytes, header: RtpHeader) -> bytes:
    end = len(data)
    if data[0] & 0x20:  # padding: the last byte says how much
        end -= data[-1]
    return data[header.payload_offset : max(end, header.payload_offset)]


def build(payload_type: int, marker: bool, sequence: int, timestamp: int, ssrc: int,
          payload: bytes) -> bytes:
    return _HEADER.pack(
        RTP_VERSION_BITS,
        (0x80 if marker else 0) | payload_type,
        sequence & 0xFFFF,
        timestamp & 0xFFFFFFFF,
        ssrc,
    ) + payload


ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


def abs_send_time_extension(ext_id: int, now: float | None = None) -> bytes:
    """A one-byte-header extension block carrying abs-send-time (6.18 fixed-point seconds).

    The receiving browser estimates bandwidth from it and answers with REMB; without it
    Chrome sends no REMB and its sender cannot adapt to the receiver's network.
    """
    t = time.time() if now is None else now
    value = int(t * (1 << 18)) & 0xFFFFFF
    return b"\xbe\xde\x00\x01" + bytes([(ext_id << 4) | 2]) + value.to_bytes(3, "big")


class RtpRewriter:
    """One outgoing stream fed by successive sources (ringback, early media, the answered
    call, a transcoder): new SSRC and payload type, sequence numbers and timestamps
    continuous across source switches, marker bit on the first packet after a switch.

    Sequence numbers count packets really sent (RFC 3550 5.1: +1 per packet), so a packet
    that is not sent (the phone holds the call) is `stamp`ed, never `rewrite`n: the
    timestamps go on with the wall clock, the sequence numbers do not jump."""

    __slots__ = ("_last_out_ts", "_last_wall", "_mark_next", "_seq", "_source",
                 "_ts_offset", "clock_rate", "mark_switches", "octets", "packets", "ssrc")

    def __init__(self, ssrc: int | None = None, clock_rate: int = 8000,
                 mark_switches: bool = True) -> None:
        # Audio marks the first packet after a switch (RFC 3551: start of a talkspurt); for
        # video the marker means "last packet of a frame" and must be left as it came.
        self.mark_switches = mark_switches
        self.ssrc = ssrc if ssrc is not None else random.getrandbits(32)
        self.clock_rate = clock_rate
        self._seq = random.getrandbits(16)
        self._source: object = None
        self._ts_offset = 0
        self._last_out_ts: int | None = None
        self._last_wall = 0.0
        self._mark_next = False
        self.packets = 0
        self.octets = 0

    @property
    def last_timestamp(self) -> int:
        return self._last_out_ts or 0

    def mark_next(self) -> None:
        """The next packet sent starts a talkspurt for the receiver (audio only): after a
        hold, after DTMF events took the stream's place."""
        if self.mark_switches:
            self._mark_next = True

    def stamp(self, source: object, timestamp: int, now: float | None = None) -> int:
        """Our timestamp for `source`'s `timestamp`; the timeline moves on, nothing is sent."""
        if now is None:
            now = time.monotonic()
        if source != self._source:  # sources are SSRCs (ints) or marker objects
            # Continue our timeline from where it was, advanced by the wall-clock gap.
            if self._last_out_ts is None:
                target = random.getrandbits(32)
            else:
                gap = max(1, round((now - self._last_wall) * self.clock_rate))
                target = self._last_out_ts + gap
            self._ts_offset = (target - timestamp) & 0xFFFFFFFF
            self._source = source
            self.mark_next()
        out_ts = (timestamp + self._ts_offset) & 0xFFFFFFFF
        self._last_out_ts = out_ts
        self._last_wall = now
        return out_ts

    def rewrite(self, source: object, payload_type: int, marker: bool, timestamp: int,
                payload: bytes, now: float | None = None, extension: bytes = b"") -> bytes:
        """The packet to send for `payload` stamped `timestamp` by `source`."""
        out_ts = self.stamp(source, timestamp, now)
        if self._mark_next:
            marker = True
            self._mark_next = False
        self._seq = (self._seq + 1) & 0xFFFF
        self.packets += 1
        self.octets += len(payload)
        if extension:
            return _HEADER.pack(RTP_VERSION_BITS | 0x10, (0x80 if marker else 0) | payload_type,
                                self._seq, out_ts, self.ssrc) + extension + payload
        return build(payload_type, marker, self._seq, out_ts, self.ssrc, payload)

    def inject(self, payload_type: int, marker: bool, timestamp: int, payload: bytes) -> bytes:
        """A packet on our own timeline (DTMF events) in the same sequence space; the
        stream's next packet starts a new talkspurt."""
        self._seq = (self._seq + 1) & 0xFFFF
        self.packets += 1
        self.octets += len(payload)
        self.mark_next()
        return build(payload_type, marker, self._seq, timestamp, self.ssrc, payload)


class TalkSpurts:
    """Where a sender's talkspurts start (RFC 3551 4.1: the marker bit's meaning for
    audio), from its sequence numbers and timestamps. The sender's own marker bit is not
    trusted: aiortc sets it on every packet, and a phone's jitter buffer re-syncs on each.

    A talkspurt starts where the timestamps jump further than the sequence numbers account
    for: the sender sent nothing for a while (DTX, silence suppression), so the receiver
    may adjust its playout there. Lost packets move both together and mark nothing."""

    __slots__ = ("_max_step", "_seq", "_step", "_ts")

    def __init__(self, clock_rate: int) -> None:
        self._max_step = clock_rate * 120 // 1000  # longest frame: 120 ms (Opus's maximum)
        self._seq: int | None = None
        self._ts = 0
        self._step = 0  # the sender's timestamp step per packet, once seen

    def starts(self, sequence: int, timestamp: int) -> int:
        """0 if this packet continues the talkspurt, else the timestamp units of silence
        before it (a talkspurt starts here). The stream's first packet is 0: the switch to
        a new source marks it already."""
        if self._seq is None:
            self._seq, self._ts = sequence, timestamp
            return 0
        dseq = (sequence - self._seq) & 0xFFFF
        if dseq == 0 or dseq >= 0x8000:
            return 0  # a duplicate or a late packet: neither starts anything
        dts = (timestamp - self._ts) & 0xFFFFFFFF
        self._seq, self._ts = sequence, timestamp
        if dts >= 0x80000000:
            return 0  # timestamps went back: a new timeline, not silence
        silence = 0
        if self._step and 2 * dts > (2 * dseq + 1) * self._step:
            silence = dts - dseq * self._step
        if dseq == 1 and 0 < dts <= self._max_step:
            self._step = dts
        return silence


class ReceiveStats:
    """RFC 3550 A.1/A.8 receiver statistics for one incoming stream: loss from sequence
    numbers, interarrival jitter, counts. Feeds RTCP receiver reports and quality stats."""

    __slots__ = ("_base_seq", "_cycles", "_expected_prior", "_max_seq", "_received_prior",
                 "_transit", "clock_rate", "jitter", "octets", "received", "ssrc")

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.ssrc = 0
        self._base_seq: int | None = None
        self._max_seq = 0
        self._cycles = 0
        self.received = 0
        self.octets = 0
        self.jitter = 0.0  # in timestamp units
        self._transit: float | None = None
        self._expected_prior = 0
        self._received_prior = 0

    def update(self, header: RtpHeader, size: int, arrival: float) -> None:
        seq = header.sequence
        if self._base_seq is None:
            self._base_seq = seq
            self._max_seq = seq
            self.ssrc = header.ssrc
        else:
            delta = (seq - self._max_seq) & 0xFFFF
            if 0 < delta < 0x8000:
                if seq < self._max_seq:
                    self._cycles += 0x10000
                self._max_seq = seq
        self.received += 1
        self.octets += size
        transit = arrival * self.clock_rate - header.timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            if d < self.clock_rate * 10:  # ignore timestamp jumps (source switches)
                self.jitter += (d - self.jitter) / 16
        self._transit = transit

    @property
    def extended_max(self) -> int:
        return self._cycles + self._max_seq

    @property
    def expected(self) -> int:
        return 0 if self._base_seq is None else self.extended_max - self._base_seq + 1

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000 / self.clock_rate

    def report_block(self) -> bytes:
        """A 24-byte RTCP report block; advances the 'since last report' counters."""
        expected_interval = self.expected - self._expected_prior
        received_interval = self.received - self._received_prior
        self._expected_prior = self.expected
        self._received_prior = self.received
        lost_interval = expected_interval - received_interval
        fraction = 0 if expected_interval <= 0 or lost_interval <= 0 else (
            (lost_interval << 8) // expected_interval
        )
        cumulative = min(self.lost, 0x7FFFFF)
        return struct.pack(
            "!IB3sIIII",
            self.ssrc,
            min(fraction, 255),
            cumulative.to_bytes(3, "big"),
            self.extended_max & 0xFFFFFFFF,
            int(self.jitter) & 0xFFFFFFFF,
            0,  # LSR: we do not track the peer's SR timing
            0,  # DLSR
        )


def ntp_now(now: float | None = None) -> int:
    t = time.time() if now is None else now
    seconds = int(t) + NTP_EPOCH_OFFSET
    fraction = int((t % 1) * (1 << 32))
    return (seconds << 32) | fraction


def sender_report(ssrc: int, rtp_timestamp: int, packets: int, octets: int,
                  blocks: list[bytes], cname: str | None = None,
                  now: float | None = None) -> bytes:
    """An RTCP compound packet: SR (with report blocks) and, given a CNAME, SDES."""
    count = len(blocks)
    length_words = (28 + 24 * count) // 4 - 1
    ntp = ntp_now(now)
    out = struct.pack(
        "!BBHIIIIII",
        RTP_VERSION_BITS | count,
        RTCP_SR,
        length_words,
        ssrc,
        ntp >> 32,
        ntp & 0xFFFFFFFF,
        rtp_timestamp & 0xFFFFFFFF,
        packets & 0xFFFFFFFF,
        octets & 0xFFFFFFFF,
    ) + b"".join(blocks)
    if cname:
        out += _sdes(ssrc, cname)
    return out


def receiver_report(ssrc: int, blocks: list[bytes]) -> bytes:
    """An RTCP RR from `ssrc` (our sender on that transport) with report blocks."""
    count = len(blocks)
    header = struct.pack("!BBHI", RTP_VERSION_BITS | count, RTCP_RR, (8 + 24 * count) // 4 - 1,
                         ssrc)
    return header + b"".join(blocks)


def _sdes(ssrc: int, cname: str) -> bytes:
    raw = cname.encode()[:255]
    item = bytes([1, len(raw)]) + raw + b"\x00"
    item += b"\x00" * (-len(item) % 4)
    chunk = struct.pack("!I", ssrc) + item
    return struct.pack("!BBH", RTP_VERSION_BITS | 1, RTCP_SDES, len(chunk) // 4) + chunk


def rtcp_packets(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a compound RTCP packet: (packet type, count/fmt, whole packet) each."""
    out = []
    offset = 0
    while offset + 4 <= len(data):
        first, ptype, length = struct.unpack_from("!BBH", data, offset)
        end = offset + 4 * (length + 1)
        if first & 0xC0 != RTP_VERSION_BITS or end > len(data):
            break
        out.append((ptype, first & 0x1F, data[offset:end]))
        offset = end
    return out
