"""Timers that outlive their own errors.

A periodic job written as "do the work, then `call_later` myself again" stops for good the
first time the work raises: that is how `/status` froze when psutil hit EMFILE. `Periodic`
re-arms *before* it runs the job, catches any Exception, and logs failures the way an
operator can read them: the first with its traceback, then at most one line per
`log_interval` (a `LogBudget` of one line) saying how many failed since. `call_later_safe`
is the one-shot variant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from appliance.core.throttle import LogBudget

log = logging.getLogger("appliance.periodic")


class FailureLog:
    """Rate-limited logging of one job's failures (sans-IO: `now` is passed in)."""

    def __init__(self, name: str, log_interval: float = 60.0,
                 logger: logging.Logger = log) -> None:
        self.name = name
        self.logger = logger
        self.failures = 0  # since start, for anyone who wants to show it
        self._budget = LogBudget(1, log_interval)

    @property
    def log_interval(self) -> float:
        return self._budget.interval

    def failed(self, exc: BaseException, now: float) -> None:
        self.failures += 1
        allowed, unlogged = self._budget.allow(now)
        if not allowed:
            return
        more = f" ({unlogged} more failure(s) since the last line)" if unlogged else ""
        # The traceback only once (the first failure always has its line): the same error
        # every second would flood the log.
        self.logger.error("%s failed: %s: %s%s; it keeps running", self.name,
                          type(exc).__name__, exc, more,
                          exc_info=exc if self.failures == 1 else None)


class Periodic:
    """Run `fn` every `interval` seconds on the running loop until `stop()`."""

    def __init__(self, interval: float, fn: Callable[[], Any], name: str,
                 log_interval: float = 60.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.fn = fn
        self.errors = FailureLog(name, log_interval)
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self, run_now: bool = True) -> None:
        """Begin (at once, or after one interval). Starting twice is a no-op."""
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        if run_now:
            self._tick()
        else:
            self._handle = self._loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        assert self._loop is not None
        # Re-arm first: whatever fn does (raise, or stop() us), the schedule is decided.
        self._handle = self._loop.call_later(self.interval, self._tick)
        try:
            self.fn()
        except Exception as exc:  # a periodic job must survive anything
            self.errors.failed(exc, self._loop.time())


def call_later_safe(delay: float, fn: Callable[[], Any], name: str) -> asyncio.TimerHandle:
    """`loop.call_later` whose callback's exception is logged with its name, never lost."""

    def run() -> None:
        try:
            fn()
        except Exception:  # logged; a one-shot has nothing to re-arm
            log.exception("%s failed", name)

    return asyncio.get_running_loop().call_later(delay, run)
