"""What a simulated caller measures on each stream it receives: packets, loss from sequence
gaps, RFC 3550 interarrival jitter, and frames (marker bits).

It runs for every packet the load generator receives, so it is a flat `__slots__` class
that reads the header bytes directly instead of building a header object.
"""

from __future__ import annotations

import struct

_SEQ_TS = struct.Struct("!HI")


class RxStream:
    __slots__ = ("_base", "_expected_before", "_max", "_transit", "bytes", "clock_rate",
                 "frames", "jitter", "received", "ssrc", "ssrc_changes")

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.ssrc = -1
        self.ssrc_changes = 0
        self.received = 0
        self.bytes = 0
        self.frames = 0
        self.jitter = 0.0  # RFC 3550 A.8, in timestamp units
        self._base = 0  # extended sequence number of the current SSRC's first packet
        self._max = -1  # highest extended sequence number seen; -1: nothing yet
        self._expected_before = 0  # what earlier SSRCs of this stream expected
        self._transit: float | None = None

    def packet(self, data: bytes, arrival: float) -> None:
        seq, ts = _SEQ_TS.unpack_from(data, 2)
        ssrc = int.from_bytes(data[8:12], "big")
        if ssrc != self.ssrc:
            # A new source restarts the sequence space; what the old one expected stays.
            if self._max >= 0:
                self._expected_before += self._max - self._base + 1
                self.ssrc_changes += 1
            self.ssrc = ssrc
            self._base = self._max = seq
            self._transit = None
        else:
            delta = (seq - self._max) & 0xFFFF
            if 0 < delta < 0x8000:  # forward, possibly wrapped; the rest is reordering
                self._max += delta
        self.received += 1
        self.bytes += len(data)
        if data[1] & 0x80:
            self.frames += 1
        transit = arrival * self.clock_rate - ts
        previous = self._transit
        if previous is not None:
            d = transit - previous
            if d < 0:
                d = -d
            if d < self.clock_rate * 10:  # a timestamp jump (new source) is not jitter
                self.jitter += (d - self.jitter) / 16
        self._transit = transit

    @property
    def expected(self) -> int:
        current = 0 if self._max < 0 else self._max - self._base + 1
        return self._expected_before + current

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000 / self.clock_rate

    def snapshot(self) -> list[float]:
        """[received, expected, jitter_ms, frames, bytes] for the control channel."""
        return [self.received, self.expected, round(self.jitter_ms, 3), self.frames, self.bytes]
