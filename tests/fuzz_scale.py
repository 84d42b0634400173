"""How hard the hostile-input tests push: small in `make test`, full in `make fuzz`."""

from __future__ import annotations

import os

FULL = os.environ.get("APPLIANCE_FUZZ_SCALE", "") == "full"


def scaled(small: int, full: int) -> int:
    """`small` iterations in the everyday suite, `full` when `make fuzz` runs."""
    return full if FULL else small
