"""The time rules every sans-IO object of the stack shares: when a deadline is due, which of
several comes first, and firing the timers of those that are due. Time is always `now` as
the owner passes it in; nothing here reads a clock."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Timed(Protocol):
    """A sans-IO object with timers: a transaction, a call."""

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> object: ...


def due(deadline: float | None, now: float) -> bool:
    return deadline is not None and deadline <= now


def earliest(*deadlines: float | None) -> float | None:
    """The first of the deadlines that are set; None when none is."""
    return min((t for t in deadlines if t is not None), default=None)


def fire_due(timed: Iterable[Timed], now: float) -> None:
    """handle_timer(now) on each of `timed` whose timer is due. The items are listed before
    any fires, so a handler that changes the table they come from cannot upset the loop."""
    for item in list(timed):
        if due(item.get_timer(), now):
            item.handle_timer(now)
