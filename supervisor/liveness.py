"""Which workers are still talking: the bus heartbeat, judged sans-IO (`now` passed in).

Every message a worker sends proves its event loop runs (a worker sends `WorkerStats`
twice a second even when idle). A worker the supervisor has not heard from for `timeout`
seconds is *silent*: it gets no new calls, and speaks again -> back. Silent for
`restart_after` seconds it is *hung*: the supervisor kills and restarts it, which releases
its calls like any dead worker's.

Quiet time is counted in the supervisor's own listening time: each check adds the time
since the previous check, but at most `max_step`. If the supervisor's loop itself stalled
(it could not read the bus), its workers are not blamed for the messages it did not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    SILENT = "silent"  # stop placing calls there
    BACK = "back"  # it spoke again: it takes calls again
    HUNG = "hung"  # silent for too long: kill and restart it


@dataclass
class _Beat:
    quiet: float = 0.0  # seconds of supervisor listening time without a message
    silent: bool = False
    hung: bool = False  # HUNG was reported for this episode (the kill is under way)


class Liveness:
    def __init__(self, timeout: float, restart_after: float, max_step: float = 0.5) -> None:
        if timeout <= 0 or restart_after < timeout:
            raise ValueError("need 0 < timeout <= restart_after")
        self.timeout = timeout
        self.restart_after = restart_after
        self.max_step = max_step
        self._beats: dict[int, _Beat] = {}  # only workers that have said Hello
        self._checked_at: float | None = None

    def started(self, index: int) -> None:
        """Worker `index` said Hello: judge it from now on (a starting worker is not)."""
        self._beats[index] = _Beat()

    def heard(self, index: int) -> Verdict | None:
        """A message from worker `index`. BACK if it had been silent."""
        beat = self._beats.get(index)
        if beat is None:
            return None  # not started, or already exited: nothing to judge
        beat.quiet = 0.0
        if beat.silent:
            beat.silent = beat.hung = False
            return Verdict.BACK
        return None

    def forget(self, index: int) -> None:
        """The worker exited: nothing to judge until its successor speaks."""
        self._beats.pop(index, None)

    def is_silent(self, index: int) -> bool:
        beat = self._beats.get(index)
        return beat is not None and beat.silent

    def quiet_for(self, index: int) -> float:
        beat = self._beats.get(index)
        return 0.0 if beat is None else beat.quiet

    def check(self, now: float, listening: bool = True) -> list[tuple[int, Verdict]]:
        """Advance quiet time to `now`; each SILENT and HUNG is reported once per episode.
        `listening` False: the supervisor was not reading the bus, so this step is no one's
        silence."""
        step = 0.0 if self._checked_at is None else min(self.max_step, now - self._checked_at)
        self._checked_at = now
        if not listening:
            step = 0.0
        verdicts: list[tuple[int, Verdict]] = []
        for index, beat in self._beats.items():
            beat.quiet += max(0.0, step)
            if not beat.silent and beat.quiet >= self.timeout:
                beat.silent = True
                verdicts.append((index, Verdict.SILENT))
            if beat.silent and not beat.hung and beat.quiet >= self.restart_after:
                beat.hung = True
                verdicts.append((index, Verdict.HUNG))
        return verdicts
