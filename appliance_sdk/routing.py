"""The table of one connection's calls, and the routing of the MS's frames to them.

The connection owns a CallRouter and its reader hands every frame to it; a call registers
the handlers of its own frames when it is created and withdraws them when it closes. So
neither side calls into the other's internals, and this module knows calls only as the
handlers they registered (and, for the application's `client.calls`, as opaque objects).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.core import protocol

CallKey = tuple[int, int]  # (dialogid, ref): what names a call in every frame

CallT = TypeVar("CallT")


@dataclass(frozen=True, slots=True)
class CallInbox:
    """Where a call takes what the connection routes to it."""

    frame: Callable[[protocol.Action], None]
    invalid: Callable[[str | bytes, str], None]  # the raw frame, why it did not decode
    connection_lost: Callable[[], None]


class CallRouter(Generic[CallT]):
    """The live calls of one connection by (dialogid, ref), and their inboxes."""

    def __init__(self) -> None:
        # Kept as a plain dict: it is the SDK's public `MediaServerClient.calls`.
        self.calls: dict[CallKey, CallT] = {}
        self._inboxes: dict[CallKey, CallInbox] = {}

    def register(self, key: CallKey, call: CallT, inbox: CallInbox) -> None:
        self.calls[key] = call
        self._inboxes[key] = inbox

    def withdraw(self, key: CallKey, call: CallT) -> None:
        """Stop routing to `call`; its frames go unrouted from now on."""
        if self.calls.get(key) is call:
            del self.calls[key]
            del self._inboxes[key]

    def route(self, key: CallKey, action: protocol.Action) -> bool:
        """Hand `action` to the call `key` names; False when no call has that key."""
        inbox = self._inboxes.get(key)
        if inbox is None:
            return False
        inbox.frame(action)
        return True

    def route_invalid(self, key: CallKey, raw: str | bytes, error: str) -> bool:
        """Tell the call `key` names of a frame that did not decode; False: no such call."""
        inbox = self._inboxes.get(key)
        if inbox is None:
            return False
        inbox.invalid(raw, error)
        return True

    def connection_lost(self) -> None:
        for inbox in list(self._inboxes.values()):
            inbox.connection_lost()
