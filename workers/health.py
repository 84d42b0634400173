"""Event-loop lag of a worker: how late a callback runs compared with when it was due.

A relay whose loop is late delays every packet of every call on it; this is the first
number to look at when calls sound choppy, and what marks a worker degraded.
"""

from __future__ import annotations

import asyncio
from collections import deque

PROBE_INTERVAL = 0.05


class LoopLagProbe:
    def __init__(self, window: int = 200) -> None:
        self.samples: deque[float] = deque(maxlen=window)
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + PROBE_INTERVAL
        self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = now - self._due
        # Re-arm before anything else: the probe must never stop over its own error.
        self._due = now + PROBE_INTERVAL
        self._handle = loop.call_at(self._due, self._tick)
        self.samples.append(max(0.0, late) * 1000)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def percentiles(self) -> tuple[float, float]:
        """(p50, p99) in ms over the recent window."""
        if not self.samples:
            return 0.0, 0.0
        ordered = sorted(self.samples)
        last = len(ordered) - 1
        return ordered[last // 2], ordered[min(last, round(last * 0.99))]
