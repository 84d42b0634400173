"""Bounds on what a stranger (or a failing job) can make us do repeatedly.

`TokenBucket` caps how many answers we send to datagrams anyone can forge (403 to a
stranger, 400 to garbage): without it, every spoofed datagram would draw a reply, and the
appliance would reflect traffic at whatever source address the attacker wrote in.

`LogBudget` owns the question "may this line be logged now, and how many were suppressed
since the last one": at most N lines per window, the rest counted. `BudgetedLogger` is the
logger for lines a client can trigger at will (a refused offer, a frame that hit a bug, a
connection over a cap): one budget per kind of line, the count of the suppressed ones
appended to the next line logged.

`Tally` counts an event an attacker can trigger at line rate (an unparsable datagram, a
request from a source we do not talk to) and logs it the way an operator can read it: the
first one at once, then at most one summary line per interval (how many, from how many
sources, the busiest one, the last reason), instead of one line per datagram.

Sans-IO where it can be: `now` is passed in, except to `BudgetedLogger`, which reads its
clock (injectable) because its callers log, they do not keep time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

Addr = tuple[str, int]  # (host, port) of a datagram's source

MAX_SOURCES_TRACKED = 64  # per summary: a spray from many addresses costs bounded memory


class TokenBucket:
    """`rate` events per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("need rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    def take(self, now: float) -> bool:
        """Whether one more event fits now (and if so, it is counted)."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class LogBudget:
    """At most `lines` log lines per `interval` seconds for one kind of event; the rest
    are counted and the count is reported with the next line allowed."""

    def __init__(self, lines: int, interval: float) -> None:
        self.lines = lines
        self.interval = interval
        self._window_start = float("-inf")
        self._used = 0
        self.suppressed = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """(may log now, how many lines were suppressed since the last one logged)."""
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._used = 0
        if self._used >= self.lines:
            self.suppressed += 1
            return False, 0
        self._used += 1
        suppressed, self.suppressed = self.suppressed, 0
        return True, suppressed


SIMILAR_SUPPRESSED = " (%d similar line(s) suppressed)"


class BudgetedLogger:
    """Log lines within a `LogBudget` of `lines` per `interval` seconds for each `kind`
    (so that a flood of one kind cannot silence another). `note`, a format with one %d,
    is appended to the next line logged with the count of those suppressed: only when
    some were, or on every line (`note_every_line`, for texts that always said it).
    A line whose level the logger would drop anyway uses no budget and is not counted."""

    def __init__(
        self, logger: logging.Logger, lines: int, interval: float = 10.0, *,
        note: str = SIMILAR_SUPPRESSED, note_every_line: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.lines = lines
        self.interval = interval
        self.note = note
        self.note_every_line = note_every_line
        self._clock = clock
        self._budgets: dict[str, LogBudget] = {}  # kinds are the code's constants: bounded

    def log(self, level: int, fmt: str, *args: Any, kind: str = "",
            exc_info: bool = False) -> bool:
        """Log `fmt % args` at `level` if the budget of `kind` allows; whether it did."""
        if not self.logger.isEnabledFor(level):
            return False
        budget = self._budgets.get(kind)
        if budget is None:
            budget = self._budgets[kind] = LogBudget(self.lines, self.interval)
        allowed, suppressed = budget.allow(self._clock())
        if not allowed:
            return False
        if suppressed or self.note_every_line:
            fmt += self.note
            args = (*args, suppressed)
        # stacklevel: the record names the line that asked, not this helper.
        self.logger.log(level, fmt, *args, exc_info=exc_info, stacklevel=2)
        return True


class Tally:
    """A counter with a rate-limited log line: `note()` per event, `flush()` from a timer."""

    def __init__(
        self, logger: logging.Logger, what: str, interval: float = 10.0,
        level: int = logging.INFO,
    ) -> None:
        self.log = logger
        self.what = what  # e.g. "unparsable SIP datagrams"
        self.interval = interval
        self.level = level
        self.total = 0
        self._pending = 0  # noted since the last line, not yet logged
        self._sources: dict[str, int] = {}
        self._last_detail = ""
        self._window_start: float | None = None  # None: the next event is logged at once

    def note(self, now: float, source: Addr, detail: str) -> None:
        self.total += 1
        due = self._window_start is None or now - self._window_start >= self.interval
        if due and self._pending:
            self.flush(now)  # the overdue summary; this event goes into the next one
        elif due:
            # Quiet for a whole interval: this one is news, say it now.
            self._window_start = now
            self.log.log(
                self.level, "%s from %s:%d: %s (%d since start; more are counted, "
                "logged at most every %.0f s)", self.what, source[0], source[1], detail,
                self.total, self.interval,
            )
            return
        self._pending += 1
        self._last_detail = detail
        if source[0] in self._sources or len(self._sources) < MAX_SOURCES_TRACKED:
            self._sources[source[0]] = self._sources.get(source[0], 0) + 1

    def deadline(self) -> float | None:
        """When the pending summary is due (None: nothing to say)."""
        if not self._pending or self._window_start is None:
            return None
        return self._window_start + self.interval

    def flush(self, now: float) -> None:
        """Log the summary of what was noted since the last line, if anything."""
        if not self._pending:
            if self._window_start is not None and now - self._window_start >= self.interval:
                self._window_start = None
            return
        busiest, count = max(self._sources.items(), key=lambda kv: kv[1], default=("?", 0))
        more = "+" if len(self._sources) >= MAX_SOURCES_TRACKED else ""
        self.log.log(
            self.level, "%d more %s in the last %.0f s from %d%s source(s), most from %s (%d); "
            "last: %s (%d since start)", self._pending, self.what,
            now - (self._window_start or now), len(self._sources), more, busiest, count,
            self._last_detail, self.total,
        )
        self._pending = 0
        self._sources = {}
        self._window_start = now
