"""The bus heartbeat, judged sans-IO (issue 10, finding 8: a hung worker kept getting calls)."""

from __future__ import annotations

import pytest

from supervisor.liveness import Liveness, Verdict


def run(live: Liveness, start: float, end: float, step: float = 0.25,
        listening: bool = True) -> list[tuple[float, int, Verdict]]:
    """Checks every `step` seconds from `start` to `end`: what was reported, and when."""
    seen = []
    now = start
    while now <= end + 1e-9:
        seen += [(round(now, 2), i, v) for i, v in live.check(now, listening)]
        now += step
    return seen


def test_silent_after_the_timeout_then_hung_once() -> None:
    live = Liveness(timeout=2.0, restart_after=10.0)
    live.started(0)
    live.started(1)
    live.check(0.0)
    for t in (0.25, 0.5, 0.75, 1.0):  # worker 0 keeps talking, worker 1 stops at t=0
        live.heard(0)
        live.check(t)
    seen = run(live, 1.25, 12.0)
    silent_1 = [t for t, i, v in seen if i == 1 and v is Verdict.SILENT]
    hung_1 = [t for t, i, v in seen if i == 1 and v is Verdict.HUNG]
    assert silent_1 == [2.0] and hung_1 == [10.0]
    assert live.is_silent(1)
    # Worker 0 stopped too (last heard just before the check at t=1): judged on its own
    # clock, to within one check interval.
    assert [t for t, i, v in seen if i == 0 and v is Verdict.SILENT] == [2.75]


def test_back_when_it_speaks_again() -> None:
    live = Liveness(timeout=1.0, restart_after=5.0)
    live.started(0)
    assert run(live, 0.0, 1.0) == [(1.0, 0, Verdict.SILENT)]
    assert live.heard(0) is Verdict.BACK
    assert not live.is_silent(0) and live.quiet_for(0) == 0.0
    assert live.heard(0) is None  # once
    # A new silence is a new episode: reported again.
    assert run(live, 1.25, 2.25) == [(2.0, 0, Verdict.SILENT)]


def test_a_worker_is_judged_only_between_hello_and_exit() -> None:
    live = Liveness(timeout=1.0, restart_after=2.0)
    assert live.heard(0) is None  # a message before Hello (or from a dead predecessor)
    assert run(live, 0.0, 5.0) == []  # starting: never judged, however long it takes
    live.started(0)
    assert [v for _, _, v in run(live, 5.25, 8.0)] == [Verdict.SILENT, Verdict.HUNG]
    live.forget(0)  # it exited (killed): nothing more until the next Hello
    assert run(live, 8.25, 20.0) == [] and not live.is_silent(0)


def test_a_stalled_supervisor_does_not_blame_its_workers() -> None:
    live = Liveness(timeout=2.0, restart_after=10.0, max_step=0.5)
    live.started(0)
    live.check(0.0)
    # The supervisor's own loop was stuck for 30 s: it could not read the bus at all.
    assert live.check(30.0) == []
    assert live.quiet_for(0) == 0.5
    # Nor while it is busy handing a frame to a slow browser (not reading the bus).
    assert run(live, 30.25, 60.0, listening=False) == []
    assert live.quiet_for(0) == 0.5


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Liveness(timeout=0.0, restart_after=1.0)
    with pytest.raises(ValueError):
        Liveness(timeout=3.0, restart_after=2.0)
