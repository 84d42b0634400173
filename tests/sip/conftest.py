"""Fixtures shared by the SIP tests."""

from __future__ import annotations

import pytest


def _loopback_only() -> bool:
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if not (address.startswith("127.") or address == "::1"):
                return False
    return True


@pytest.fixture
def loopback_netns() -> None:
    """Tests that send real datagrams run only where nothing leaves 127.0.0.0/8."""
    if not _loopback_only():
        pytest.fail(
            "this test sends datagrams: run it in a loopback-only network namespace, "
            "tests/in-loopback-netns.sh .venv/bin/python -m pytest tests/sip"
        )
