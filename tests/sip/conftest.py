"""Fixtures shared by the SIP tests."""

from __future__ import annotations

import pytest

from bench.system import loopback_only


@pytest.fixture
def loopback_netns() -> None:
    """Tests that send real datagrams run only where nothing leaves 127.0.0.0/8."""
    if not loopback_only():
        pytest.fail(
            "this test sends datagrams: run it in a loopback-only network namespace, "
            "tests/in-loopback-netns.sh .venv/bin/python -m pytest tests/sip"
        )
