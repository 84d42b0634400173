"""RTCP feedback the relay acts on (RFC 4585 PLI/NACK, RFC 5104 FIR, REMB) and receiver
reports, parsed and built at the byte level (sans-IO)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from appliance.media.rtp import RTCP_RR, RTCP_SR, RTP_VERSION_BITS, rtcp_packets

RTPFB = 205  # transport-layer feedback
PSFB = 206  # payload-specific feedback
FMT_NACK = 1
FMT_PLI = 1
FMT_FIR = 4
FMT_AFB = 15  # application layer feedback: REMB lives here
_REMB_ID = b"REMB"


@dataclass(frozen=True)
class Pli:
    media_ssrc: int


@dataclass(frozen=True)
class Fir:
    media_ssrc: int


@dataclass(frozen=True)
class Nack:
    media_ssrc: int
    lost: tuple[int, ...]


@dataclass(frozen=True)
class Remb:
    bitrate: int  # bits per second
    ssrcs: tuple[int, ...]


@dataclass(frozen=True)
class ReportBlock:
    ssrc: int
    fraction_lost: int  # /256
    cumulative_lost: int
    jitter: int  # timestamp units


Feedback = Pli | Fir | Nack | Remb | ReportBlock


def parse(data: bytes) -> list[Feedback]:
    """Everything the relay cares about in a (compound) RTCP packet; the rest is ignored."""
    out: list[Feedback] = []
    for ptype, fmt, packet in rtcp_packets(data):
        if ptype in (RTCP_SR, RTCP_RR):
            offset = 28 if ptype == RTCP_SR else 8
            for i in range(fmt):
                start = offset + 24 * i
                if start + 24 > len(packet):
                    break
                ssrc, fraction, lost_hi, lost_lo, _ext, jitter = struct.unpack_from(
                    "!IBBHII", packet, start)
                lost = (lost_hi << 16) | lost_lo
                if lost & 0x800000:  # 24-bit signed
                    lost -= 0x1000000
                out.append(ReportBlock(ssrc, fraction, lost, jitter))
        elif len(packet) >= 12:
            media_ssrc = struct.unpack_from("!I", packet, 8)[0]
            if ptype == PSFB and fmt == FMT_PLI:
                out.append(Pli(media_ssrc))
            elif ptype == PSFB and fmt == FMT_FIR and len(packet) >= 20:
                out.append(Fir(struct.unpack_from("!I", packet, 12)[0]))
            elif ptype == PSFB and fmt == FMT_AFB and packet[12:16] == _REMB_ID:
                remb = _parse_remb(packet)
                if remb is not None:
                    out.append(remb)
            elif ptype == RTPFB and fmt == FMT_NACK:
                out.append(Nack(media_ssrc, _nack_seqs(packet)))
    return out


def _parse_remb(packet: bytes) -> Remb | None:
    if len(packet) < 20:
        return None
    count = packet[16]
    exp = packet[17] >> 2
    mantissa = ((packet[17] & 0x03) << 16) | (packet[18] << 8) | packet[19]
    ssrcs = tuple(
        struct.unpack_from("!I", packet, 20 + 4 * i)[0]
        for i in range(count) if 24 + 4 * i <= len(packet)
    )
    return Remb(mantissa << exp, ssrcs)


def _nack_seqs(packet: bytes) -> tuple[int, ...]:
    seqs = []
    for offset in range(12, len(packet) - 3, 4):
        pid, blp = struct.unpack_from("!HH", packet, offset)
        seqs.append(pid)
        seqs.extend((pid + bit + 1) & 0xFFFF for bit in range(16) if blp & (1 << bit))
    return tuple(seqs)


def _feedback(ptype: int, fmt: int, sender_ssrc: int, media_ssrc: int, fci: bytes) -> bytes:
    length = (12 + len(fci)) // 4 - 1
    return struct.pack("!BBHII", RTP_VERSION_BITS | fmt, ptype, length, sender_ssrc,
                       media_ssrc) + fci


def pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    return _feedback(PSFB, FMT_PLI, sender_ssrc, media_ssrc, b"")


def fir(sender_ssrc: int, media_ssrc: int, sequence: int) -> bytes:
    fci = struct.pack("!IB3x", media_ssrc, sequence & 0xFF)
    return _feedback(PSFB, FMT_FIR, sender_ssrc, 0, fci)


def remb(sender_ssrc: int, bitrate: int, ssrcs: list[int]) -> bytes:
    exp = 0
    mantissa = max(0, bitrate)
    while mantissa > 0x3FFFF:
        mantissa >>= 1
        exp += 1
    fci = _REMB_ID + bytes([len(ssrcs), (exp << 2) | (mantissa >> 16), (mantissa >> 8) & 0xFF,
                            mantissa & 0xFF])
    fci += b"".join(struct.pack("!I", s) for s in ssrcs)
    return _feedback(PSFB, FMT_AFB, sender_ssrc, 0, fci)


def nack(sender_ssrc: int, media_ssrc: int, lost: list[int]) -> bytes:
    """Generic NACK with the lost sequence numbers packed into PID+BLP items."""
    items = []
    remaining = sorted(set(lost))
    while remaining:
        pid = remaining.pop(0)
        blp = 0
        for seq in list(remaining):
            delta = (seq - pid) & 0xFFFF
            if 1 <= delta <= 16:
                blp |= 1 << (delta - 1)
                remaining.remove(seq)
        items.append(struct.pack("!HH", pid, blp))
    return _feedback(RTPFB, FMT_NACK, sender_ssrc, media_ssrc, b"".join(items))
