"""Connection caps for the public port (sans-IO: the front does the sockets).

The port faces the Internet, so the number of open connections is bounded in all and per
source address (an IPv6 /64 counts as one address, see `supervisor.admission.address_key`):
every connection costs a TLS session, buffers and a heartbeat, and thousands of idle ones
must not grow the supervisor without bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

TOO_MANY_TOTAL = "too many connections to this appliance, try again shortly"
TOO_MANY_FROM_ADDRESS = "too many connections from your address"


@dataclass
class ConnectionGuard:
    """0 for a limit means no limit (an operator's choice)."""

    max_total: int
    max_per_address: int
    open_total: int = 0
    refused_total: int = 0
    _per_address: Counter[str] = field(default_factory=Counter)

    def admit(self, address: str) -> str | None:
        """Count a new connection from `address`; None if admitted (call `closed` later),
        else why it is refused (nothing is counted)."""
        if self.max_total > 0 and self.open_total >= self.max_total:
            self.refused_total += 1
            return TOO_MANY_TOTAL
        if self.max_per_address > 0 and self._per_address[address] >= self.max_per_address:
            self.refused_total += 1
            return TOO_MANY_FROM_ADDRESS
        self.open_total += 1
        self._per_address[address] += 1
        return None

    def closed(self, address: str) -> None:
        """An admitted connection from `address` is gone."""
        if self._per_address[address] <= 0:
            return  # not ours: never let a stray call drive a count negative
        self.open_total -= 1
        self._per_address[address] -= 1
        if self._per_address[address] == 0:
            del self._per_address[address]  # memory per address lives only while it is open

    def open_from(self, address: str) -> int:
        return self._per_address.get(address, 0)

    @property
    def addresses(self) -> int:
        return len(self._per_address)
