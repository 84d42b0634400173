"""Bounds on what a stranger can make the SIP port do repeatedly, sans-IO (`now` passed in).

`TokenBucket` caps how many answers we send to datagrams anyone can forge (403 to a
stranger, 400 to garbage): without it, every spoofed datagram would draw a reply, and the
appliance would reflect traffic at whatever source address the attacker wrote in.

`Tally` counts an event an attacker can trigger at line rate (an unparsable datagram, a
request from a source we do not talk to) and logs it the way an operator can read it: the
first one at once, then at most one summary line per interval (how many, from how many
sources, the busiest one, the last reason), instead of one line per datagram.
"""

from __future__ import annotations

import logging

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
