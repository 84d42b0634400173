"""Bounds on the media datagrams anyone can send us, and the counts of what was refused.

Every media port (the browser's ICE/SRTP port, the phone's RTP/RTCP pair) is public: a
datagram may be any size and hold any bytes. None of it may raise on the per-packet path
(an exception there is a traceback per packet in the log, and in aiortc's receive loop it
fails the whole DTLS transport), so datagrams are bounded at the edge and whatever a
handler still trips on is caught, counted, and logged at most once per interval per call.

The counters are per worker process (a few integer adds per refused packet); the worker
reports them with its stats every second.
"""

from __future__ import annotations

from dataclasses import dataclass

# No media we negotiate comes close: 20 ms of PCMU is 172 bytes, a VP8 packet at most the
# MTU (~1200 from browsers). pylibsrtp's buffer is 1500 bytes and raises ValueError beyond.
MAX_DATAGRAM = 1500


@dataclass
class MediaDrops:
    """Media datagrams refused in this process since it started."""

    refused_source: int = 0  # phone-side RTP/RTCP from an address its SDP did not give
    oversized: int = 0  # over MAX_DATAGRAM, or empty
    unprotect_failed: int = 0  # SRTP/SRTCP that failed authentication/replay (strangers)
    malformed: int = 0  # passed the edge, then a handler could not use it (caught)

    def stats(self) -> dict[str, int]:
        """As the fields of bus.WorkerStats."""
        return {"rtp_refused_source": self.refused_source, "media_oversized": self.oversized,
                "media_unprotect_failed": self.unprotect_failed,
                "media_malformed": self.malformed}


DROPS = MediaDrops()


def fits(data: bytes) -> bool:
    """Whether a datagram's size can be media at all (counts it when not)."""
    if 0 < len(data) <= MAX_DATAGRAM:
        return True
    DROPS.oversized += 1
    return False
