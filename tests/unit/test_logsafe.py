"""Client text in a log line cannot forge another line or rewrite the terminal."""

from __future__ import annotations

import io
import logging

from appliance.core import logsafe


def _logger_to(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger(f"logsafe-test-{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s supervisor %(name)s: %(message)s"))
    logger.addHandler(handler)
    logsafe.install(logger)
    return logger


def test_newline_escape_and_nul_in_arguments_stay_on_one_line() -> None:
    out = io.StringIO()
    log = _logger_to(out)
    forged = "x\n2026-12-01 ERROR supervisor appliance.supervisor: fake\x1b[2J\x00\u2028"
    log.warning("refused frame: %s", forged)
    text = out.getvalue()
    assert text.count("\n") == 1
    assert "\\n2026-12-01 ERROR" in text and "\\x1b[2J" in text and "\\x00" in text
    assert "\\u2028" in text


def test_tracebacks_keep_their_lines() -> None:
    out = io.StringIO()
    log = _logger_to(out)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("handler failed for %s", "a\nb")
    text = out.getvalue()
    assert "a\\nb" in text and "Traceback (most recent call last):\n" in text


def test_long_messages_are_cut_and_bad_formats_kept() -> None:
    out = io.StringIO()
    log = _logger_to(out)
    log.info("%s", "y" * 10_000)
    log.info("%d", "not a number")
    first, second = out.getvalue().splitlines()
    assert len(first) < logsafe.MAX_MESSAGE_CHARS + 100 and "more chars" in first
    assert "not a number" in second
