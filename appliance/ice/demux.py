"""RFC 7983's first-byte rule, the one copy of it in the appliance's ICE and media paths:
what the first byte of a datagram on the media port (or of an RFC 4571 frame) says it
holds - STUN 0..3, DTLS 20..63, RTP/RTCP (so SRTP/SRTCP) 128..191 (RFC 7983 section 7).

Everything else is GARBAGE to us, including the ranges RFC 7983 gives to protocols the
port does not speak: ZRTP (16..19) and TURN ChannelData (64..79; a relay ends at the TURN
server, never here). An empty datagram is GARBAGE too.

Who uses it: `LiteAgent.receive` (every UDP datagram and TCP frame), `stun.looks_like_stun`,
and `rtc_adapter.SrtpFastPath` (per relayed packet). The per-packet callers index
`KIND_BY_FIRST_BYTE` and compare with the module constants `STUN`/`DTLS`/`SRTP`/`GARBAGE`:
on Python 3.11 an enum attribute lookup (`FrameKind.SRTP`) costs ~80 ns, a module global
~10, and a tuple index is cheaper than the chained comparison it replaces.
"""

from __future__ import annotations

import enum


class FrameKind(enum.Enum):
    STUN = "stun"  # first byte 0..3
    DTLS = "dtls"  # 20..63
    SRTP = "srtp"  # 128..191: SRTP or SRTCP (RTP version 2)
    GARBAGE = "garbage"  # empty, or a range we do not speak


STUN = FrameKind.STUN
DTLS = FrameKind.DTLS
SRTP = FrameKind.SRTP
GARBAGE = FrameKind.GARBAGE

# Indexed by the first byte (0..255): every byte value has exactly one kind.
KIND_BY_FIRST_BYTE: tuple[FrameKind, ...] = tuple(
    STUN if b <= 3
    else DTLS if 20 <= b <= 63
    else SRTP if 128 <= b <= 191
    else GARBAGE
    for b in range(256)
)


def classify(data: bytes | bytearray | memoryview) -> FrameKind:
    """What the first byte of a datagram or frame says it holds, by RFC 7983."""
    return KIND_BY_FIRST_BYTE[data[0]] if len(data) else GARBAGE
