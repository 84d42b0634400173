"""Give the heap back to the OS after a wave of connections has gone.

Each TLS connection allocates its buffers and SSL objects from the C heap. When thousands
close, glibc keeps the freed pages (fragmented between survivors) and the supervisor's RSS
stays at its peak: measured, +3-10 MB for every 200 connections opened and closed, round
after round, although no Python object survives (tests/e2e/test_hostile_wss.py).
`malloc_trim(0)` returns those pages; it is called once the closes pile up, debounced, so
a busy port pays a few milliseconds every few seconds at most. Without glibc (musl), this
does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger("appliance.front")

TRIM_AFTER_CLOSES = 50  # connections closed since the last trim
TRIM_DELAY_S = 2.0  # after the first of them: a wave of closes is trimmed once


def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self._closed = 0
        self._pending: asyncio.TimerHandle | None = None
        self.trims = 0

    def connection_closed(self) -> None:
        if self._trim is None:
            return
        self._closed += 1
        if self._pending is None and self._closed >= TRIM_AFTER_CLOSES:
            self._pending = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._run)

    def _run(self) -> None:
        self._pending = None
        self._closed = 0
        assert self._trim is not None
        try:
            self._trim(0)
            self.trims += 1
        except Exception:  # an optimisation: never let it cost the port
            log.exception("malloc_trim failed; not trying again")
            self._trim = None
