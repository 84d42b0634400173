"""Periodic jobs survive their own errors (issue 10, finding 9: /status froze on EMFILE)."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from appliance.core.periodic import FailureLog, Periodic, call_later_safe


def emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


async def test_a_job_that_raises_emfile_keeps_being_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    def sample() -> None:
        nonlocal calls
        calls += 1
        raise emfile()

    job = Periodic(0.02, sample, "health sampling", log_interval=60.0)
    with caplog.at_level(logging.ERROR, logger="appliance.periodic"):
        job.start()
        await asyncio.sleep(0.3)
        job.stop()
    assert calls >= 8, calls
    assert job.errors.failures == calls
    # One line (with the traceback) for the first failure; the rest counted, not logged.
    lines = [r for r in caplog.records if "health sampling failed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "Too many open files" in lines[0].getMessage()
    assert lines[0].exc_info is not None


async def test_a_job_that_recovers_runs_normally_again() -> None:
    results: list[str] = []

    def flaky() -> None:
        if len(results) < 3:
            results.append("failed")
            raise emfile()
        results.append("ok")

    job = Periodic(0.02, flaky, "flaky")
    job.start()
    await asyncio.sleep(0.25)
    job.stop()
    assert results[:3] == ["failed"] * 3
    assert results.count("ok") >= 3
    assert job.errors.failures == 3


async def test_stop_ends_it_even_from_inside_the_job() -> None:
    calls = 0
    job: Periodic

    def once() -> None:
        nonlocal calls
        calls += 1
        job.stop()

    job = Periodic(0.01, once, "once")
    job.start()
    await asyncio.sleep(0.1)
    assert calls == 1 and not job.running


def test_failure_log_says_how_many_it_did_not_log(caplog: pytest.LogCaptureFixture) -> None:
    failures = FailureLog("stats report", log_interval=10.0)
    with caplog.at_level(logging.ERROR, logger="appliance.periodic"):
        for second in range(25):  # one failure a second for 25 s
            failures.failed(emfile(), float(second))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages  # at 0 s, 10 s, 20 s
    assert "9 more failure(s)" in messages[1] and "9 more failure(s)" in messages[2]
    assert failures.failures == 25
    # Only the first line carries a traceback.
    assert [r.exc_info is not None for r in caplog.records] == [True, False, False]


def test_failure_log_text_is_what_operators_grep(caplog: pytest.LogCaptureFixture) -> None:
    failures = FailureLog("bus send", log_interval=10.0)
    with caplog.at_level(logging.ERROR, logger="appliance.periodic"):
        for now in (0.0, 9.9, 10.0, 19.9, 19.95, 30.0):
            failures.failed(emfile(), now)
    assert [r.getMessage() for r in caplog.records] == [
        "bus send failed: OSError: [Errno 24] Too many open files; it keeps running",
        "bus send failed: OSError: [Errno 24] Too many open files"
        " (1 more failure(s) since the last line); it keeps running",
        "bus send failed: OSError: [Errno 24] Too many open files"
        " (2 more failure(s) since the last line); it keeps running",
    ]


async def test_a_one_shot_timer_logs_its_error(caplog: pytest.LogCaptureFixture) -> None:
    def pickup() -> None:
        raise emfile()

    with caplog.at_level(logging.ERROR, logger="appliance.periodic"):
        call_later_safe(0.0, pickup, "recording leftovers pickup")
        await asyncio.sleep(0.05)
    assert any("recording leftovers pickup failed" in r.getMessage() for r in caplog.records)


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Periodic(0, lambda: None, "never")
