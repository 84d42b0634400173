"""The budgeted logger: lines a client can trigger at will, N per window and kind, the
suppressed ones counted on the next line (the clock is injected)."""

from __future__ import annotations

import logging

import pytest

from appliance.core.throttle import BudgetedLogger

LOGGER = "test.log_budget"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_each_kind_has_its_own_budget_and_says_what_it_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limited = BudgetedLogger(logging.getLogger(LOGGER), lines=2, interval=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        logged = [limited.log(logging.INFO, "conn %d: open", i, kind="open") for i in range(5)]
        assert limited.log(logging.WARNING, "a cap", kind="cap")  # another kind: not silenced
        clock.now = 10.0
        limited.log(logging.INFO, "conn %d: open", 5, kind="open")
        limited.log(logging.INFO, "conn %d: open", 6, kind="open")
    assert logged == [True, True, False, False, False]
    assert messages(caplog) == [
        "conn 0: open", "conn 1: open", "a cap",
        "conn 5: open (3 similar line(s) suppressed)", "conn 6: open",
    ]


def test_a_note_on_every_line_and_a_note_of_its_own(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    errors = BudgetedLogger(logging.getLogger(LOGGER), 1, 10.0, note=" (%d more not logged)",
                            note_every_line=True, clock=clock)
    refusals = BudgetedLogger(logging.getLogger(LOGGER), 1, 10.0,
                              note=" [%d refusals since not logged]", clock=clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(3):
            errors.log(logging.ERROR, "%s not encodable", "Offer")
            refusals.log(logging.INFO, "offer refused: %d %s", 42, "busy")
        clock.now = 10.0
        errors.log(logging.ERROR, "%s not encodable", "Offer")
        refusals.log(logging.INFO, "offer refused: %d %s", 42, "busy")
    assert messages(caplog) == [
        "Offer not encodable (0 more not logged)", "offer refused: 42 busy",
        "Offer not encodable (2 more not logged)",
        "offer refused: 42 busy [2 refusals since not logged]",
    ]


def test_a_level_the_logger_drops_uses_no_budget(caplog: pytest.LogCaptureFixture) -> None:
    limited = BudgetedLogger(logging.getLogger(LOGGER), 1, 10.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not limited.log(logging.INFO, "dropped anyway")
        assert limited.log(logging.WARNING, "the one line")
    assert messages(caplog) == ["the one line"]  # and no "1 similar line(s) suppressed"


def test_the_record_names_the_caller_and_carries_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limited = BudgetedLogger(logging.getLogger(LOGGER), 1, 10.0, clock=Clock())
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            limited.log(logging.ERROR, "frame not processed", exc_info=True)
    (record,) = caplog.records
    assert record.pathname == __file__ and record.funcName.startswith("test_the_record")
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
