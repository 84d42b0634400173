"""RTP timestamps beyond their 32 bits: a sender's timestamps wrap around (every ~13 h at
90 kHz, from a random start), and a timeline on them must not jump back when they do."""

from __future__ import annotations


class RtpTimestampUnwrapper:
    """32-bit RTP timestamps -> a monotonic-ish 64-bit count (handles wrap-around)."""

    def __init__(self) -> None:
        self._last: int | None = None
        self._value = 0

    def unwrap(self, timestamp: int) -> int:
        if self._last is None:
            self._value = timestamp
        else:
            delta = (timestamp - self._last) & 0xFFFFFFFF
            self._value += delta - (1 << 32) if delta >= 1 << 31 else delta
        self._last = timestamp
        return self._value

