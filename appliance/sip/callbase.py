"""What every sans-IO call object shares (UAC `OutgoingCall`, UAS `IncomingCall`, the
`OrphanedDialog` that ends a dead worker's call): bytes and messages in, datagrams and events
out, one timer for the owner to arm, with the call's own handlers in between."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from .deadlines import earliest, fire_due
from .events import CallEvent
from .message import SipParseError, SipRequest, SipResponse, parse
from .transaction import Addr, ClientTransaction, ServerTransaction

log = logging.getLogger("appliance.sip")


class SansIoCall(ABC):
    call_id: str
    user_agent: str
    _out: list[tuple[bytes, Addr]]
    _events: deque[CallEvent]

    # -- what a kind of call implements --------------------------------------------------

    @abstractmethod
    def _on_response(self, response: SipResponse, now: float) -> None: ...

    @abstractmethod
    def _on_request(self, request: SipRequest, addr: Addr, now: float) -> None: ...

    @abstractmethod
    def _drive(self, now: float) -> None: ...

    @abstractmethod
    def _transactions(self) -> Iterable[ClientTransaction | ServerTransaction]:
        """Every live transaction of the call: their timers are the call's too."""

    def _own_deadlines(self) -> Iterable[float | None]:
        """Deadlines the call keeps beside its transactions' (ring timeout, ...)."""
        return ()

    def _handle_own_timers(self, now: float) -> None:  # noqa: B027 - a hook, empty by default
        """Act on those of `_own_deadlines()` that are due (after the transactions')."""

    # -- the sans-IO interface -------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        try:
            message = parse(data)
        except SipParseError as exc:
            log.debug("call %s: dropping unparsable datagram from %s: %s", self.call_id, addr, exc)
            return
        self.receive_message(message, addr, now)

    def receive_message(self, message: SipRequest | SipResponse, addr: Addr, now: float) -> None:
        if isinstance(message, SipResponse):
            self._on_response(message, now)
        else:
            self._on_request(message, addr, now)
        self._drive(now)

    def handle_timer(self, now: float) -> None:
        fire_due(self._transactions(), now)
        self._handle_own_timers(now)
        self._drive(now)

    def get_timer(self) -> float | None:
        return earliest(
            *self._own_deadlines(), *(tx.get_timer() for tx in self._transactions())
        )

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> CallEvent | None:
        return self._events.popleft() if self._events else None

    # -- plumbing --------------------------------------------------------------------------

    def _ua(self) -> list[tuple[str, str]]:
        """The User-Agent header of our requests, when we have a product name to give."""
        return [("User-Agent", self.user_agent)] if self.user_agent else []

    def _pump(self, table: dict[Any, Any], handle: Callable[[Any, Any], None],
              tx_of: Callable[[Any], Any] = lambda value: value) -> bool:
        """One pass over a table of transactions: collect what they send, hand each event to
        `handle(entry, event)`, forget the finished ones. True if anything moved."""
        moved = False
        for key, entry in list(table.items()):
            tx = tx_of(entry)
            out = tx.datagrams_to_send()
            self._out.extend(out)
            while (event := tx.next_event()) is not None:
                moved = True
                handle(entry, event)
            moved = moved or bool(out)
            if tx.terminated:
                table.pop(key, None)
        return moved

    def _emit(self, event: CallEvent) -> None:
        self._events.append(replace(event, call_id=self.call_id))
