"""What every sans-IO call object shares (UAC `OutgoingCall`, UAS `IncomingCall`): bytes and
messages in, datagrams and events out, with the call's own handlers in between."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .events import CallEvent
from .message import SipParseError, SipRequest, SipResponse, parse
from .transaction import Addr

log = logging.getLogger("appliance.sip")


class SansIoCall(ABC):
    call_id: str
    _out: list[tuple[bytes, Addr]]
    _events: deque[CallEvent]

    # -- what a kind of call implements --------------------------------------------------

    @abstractmethod
    def _on_response(self, response: SipResponse, now: float) -> None: ...

    @abstractmethod
    def _on_request(self, request: SipRequest, addr: Addr, now: float) -> None: ...

    @abstractmethod
    def _drive(self, now: float) -> None: ...

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

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> CallEvent | None:
        return self._events.popleft() if self._events else None

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
