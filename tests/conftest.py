"""Suite-wide safety nets."""

from __future__ import annotations

import os
import sys
import threading

import pytest

_exit_status = 0


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    # aiortc starts a non-daemon decoder thread per receiver of a test caller; one whose
    # peer connection was torn down mid-start can wait forever and keep the interpreter
    # alive after the last test. The results are already reported: leave with them.
    stuck = [t for t in threading.enumerate()
             if t.name.endswith("-decoder") and t.is_alive() and not t.daemon]
    if stuck:
        sys.stderr.write(f"note: {len(stuck)} aiortc decoder thread(s) of test callers never "
                         "stopped; exiting without waiting for them\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
