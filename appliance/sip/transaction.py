"""RFC 3261 §17 transactions over UDP, sans-IO.

A transaction owns no socket and no clock. Each is fed `receive(msg, now)` and
`handle_timer(now)`, and hands back `datagrams_to_send()`, `next_event()` and
`get_timer()`, like aioquic's connection. The transaction user (the call) decides what
a response means; the transaction only makes delivery reliable over UDP.

Beyond RFC 3261 we follow RFC 6026: an INVITE client transaction that got a 2xx stays
"Accepted" for Timer M and passes 2xx retransmissions up (the call re-sends its ACK), and
an INVITE server transaction that sent a 2xx retransmits it until the call reports the
dialog's ACK, instead of leaving that loop to the transaction user.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto

from .message import (
    SipParseError,
    SipRequest,
    SipResponse,
    Via,
    build_response,
    cseq_of,
    serialize,
    top_via,
)

Addr = tuple[str, int]

BRANCH_COOKIE = "z9hG4bK"  # §8.1.1.7: marks a branch as RFC 3261-unique


def new_branch() -> str:
    return BRANCH_COOKIE + secrets.token_hex(8)


def new_via(sent_by: str) -> str:
    """The Via of a request we send: UDP, rport asked for (RFC 3581: the answer comes back to
    the port we sent from, whatever NAT is between) and a new transaction's branch."""
    return f"SIP/2.0/UDP {sent_by};rport;branch={new_branch()}"


@dataclass(frozen=True)
class TimerConfig:
    """§17.1.1.1 timer values; tests shrink them, production keeps the RFC defaults."""

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # cap of non-INVITE and response retransmission intervals
    t4: float = 5.0  # how long a message may linger in the network
    d: float = 32.0  # Timer D: wait for final-response retransmissions (>= 32 s on UDP)

    @property
    def timeout(self) -> float:
        return 64 * self.t1  # Timers B, F, H, J, L, M


DEFAULT_TIMERS = TimerConfig()


class TxState(Enum):
    CALLING = auto()
    TRYING = auto()
    PROCEEDING = auto()
    ACCEPTED = auto()
    COMPLETED = auto()
    CONFIRMED = auto()
    TERMINATED = auto()


@dataclass(frozen=True)
class ResponseReceived:
    """A response the transaction user must see (not a retransmission it has absorbed)."""

    response: SipResponse


@dataclass(frozen=True)
class TransactionTimeout:
    """Timer B/F (no final response), Timer H (no ACK) or Timer L (no ACK for a 2xx)."""


TransactionEvent = ResponseReceived | TransactionTimeout


def response_destination(via: Via, source: Addr) -> Addr:
    """Where a response goes (§18.2.2 with RFC 3581): the source address, and the source
    port when the client asked for rport, else the port in sent-by."""
    if via.rport is not None:
        return source
    return (source[0], via.port or 5060)


class _Transaction(ABC):
    def __init__(self, request: SipRequest, dest: Addr, timers: TimerConfig) -> None:
        self.request = request
        self.dest = dest
        self.timers = timers
        self.state = TxState.TRYING
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[TransactionEvent] = deque()
        self._deadlines: dict[str, float] = {}

    @property
    def branch(self) -> str:
        return top_via(self.request).branch or ""

    @property
    def terminated(self) -> bool:
        return self.state is TxState.TERMINATED

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> TransactionEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def handle_timer(self, now: float) -> None:
        # Fire every due timer in deadline order; a handler may re-arm its own timer.
        while self._deadlines:
            name, deadline = min(self._deadlines.items(), key=lambda item: item[1])
            if deadline > now:
                break
            del self._deadlines[name]
            self._fire(name, now)

    @abstractmethod
    def _fire(self, name: str, now: float) -> None:
        """Handle timer `name` (each kind of transaction has its own timers)."""

    def _send(self, data: bytes) -> None:
        self._out.append((data, self.dest))

    def _terminate(self) -> None:
        self.state = TxState.TERMINATED
        self._deadlines.clear()


class ClientInviteTransaction(_Transaction):
    """§17.1.1: Timer A retransmits (doubling, no cap), Timer B gives up, the ACK for a
    non-2xx final response is built here with the INVITE's branch, Timer D absorbs
    retransmitted finals."""

    def __init__(
        self, request: SipRequest, dest: Addr, now: float, timers: TimerConfig = DEFAULT_TIMERS
    ) -> None:
        super().__init__(request, dest, timers)
        self.state = TxState.CALLING
        self._wire = serialize(request)
        self._interval = timers.t1
        self._ack: bytes | None = None
        self._send(self._wire)
        self._deadlines = {"A": now + timers.t1, "B": now + timers.timeout}

    def receive(self, response: SipResponse, now: float) -> None:
        status = response.status
        if self.state in (TxState.CALLING, TxState.PROCEEDING):
            self._deadlines.pop("A", None)
            self._deadlines.pop("B", None)
            if status < 200:
                self.state = TxState.PROCEEDING
            elif status < 300:
                self.state = TxState.ACCEPTED
                self._deadlines["M"] = now + self.timers.timeout
            else:
                self.state = TxState.COMPLETED
                self._ack = serialize(self.build_ack(response))
                self._send(self._ack)
                self._deadlines["D"] = now + self.timers.d
            self._events.append(ResponseReceived(response))
        elif self.state is TxState.ACCEPTED:
            if 200 <= status < 300:
                self._events.append(ResponseReceived(response))
        elif self.state is TxState.COMPLETED and status >= 300 and self._ack is not None:
            self._send(self._ack)

    def cancel_timeout(self) -> None:
        """§9.1: after CANCEL, give up waiting 64*T1 later; the call tracks that deadline."""
        self._terminate()

    def build_ack(self, response: SipResponse) -> SipRequest:
        """§17.1.1.3: same Request-URI, Call-ID, From, CSeq number, top Via and Route as the
        INVITE; To from the response (it carries the UAS's tag)."""
        ack = SipRequest("ACK", self.request.uri)
        headers = ack.headers
        headers.add("Via", self.request.headers.get_all("Via")[0])
        headers.add("Max-Forwards", "70")
        headers.add("From", self.request.headers.get("From") or "")
        headers.add("To", response.headers.get("To") or "")
        headers.add("Call-ID", self.request.headers.get("Call-ID") or "")
        headers.add("CSeq", f"{cseq_of(self.request).seq} ACK")
        for route in self.request.headers.get_all("Route"):
            headers.add("Route", route)
        headers.add("Content-Length", "0")
        return ack

    def _fire(self, name: str, now: float) -> None:
        if name == "A" and self.state is TxState.CALLING:
            self._send(self._wire)
            self._interval *= 2
            self._deadlines["A"] = now + self._interval
        elif name == "B" and self.state is TxState.CALLING:
            self._terminate()
            self._events.append(TransactionTimeout())
        elif name in ("D", "M"):
            self._terminate()


class ClientNonInviteTransaction(_Transaction):
    """§17.1.2: Timer E retransmits (doubling, capped at T2; at T2 once provisional),
    Timer F gives up, Timer K absorbs retransmitted finals."""

    def __init__(
        self, request: SipRequest, dest: Addr, now: float, timers: TimerConfig = DEFAULT_TIMERS
    ) -> None:
        super().__init__(request, dest, timers)
        self.state = TxState.TRYING
        self._wire = serialize(request)
        self._interval = timers.t1
        self._send(self._wire)
        self._deadlines = {"E": now + timers.t1, "F": now + timers.timeout}

    def receive(self, response: SipResponse, now: float) -> None:
        if self.state not in (TxState.TRYING, TxState.PROCEEDING):
            return  # Completed: a retransmitted final is absorbed
        if response.status < 200:
            self.state = TxState.PROCEEDING
        else:
            self.state = TxState.COMPLETED
            self._deadlines = {"K": now + self.timers.t4}
        self._events.append(ResponseReceived(response))

    def _fire(self, name: str, now: float) -> None:
        if name == "E" and self.state in (TxState.TRYING, TxState.PROCEEDING):
            self._send(self._wire)
            if self.state is TxState.PROCEEDING:
                self._interval = self.timers.t2
            else:
                self._interval = min(2 * self._interval, self.timers.t2)
            self._deadlines["E"] = now + self._interval
        elif name == "F" and self.state in (TxState.TRYING, TxState.PROCEEDING):
            self._terminate()
            self._events.append(TransactionTimeout())
        elif name == "K":
            self._terminate()


class ServerInviteTransaction(_Transaction):
    """§17.2.1 for the INVITEs we receive (re-INVITEs in a dialog we started).

    Sends 100 Trying at once (we may answer later than 200 ms if the owner is slow), re-sends
    the last response on each retransmitted INVITE, retransmits a non-2xx final under Timer G
    until the ACK (Timer H gives up, Timer I absorbs ACK copies) and a 2xx until `confirm()`.
    """

    def __init__(
        self,
        request: SipRequest,
        source: Addr,
        now: float,
        timers: TimerConfig = DEFAULT_TIMERS,
        send_trying: bool = True,
    ) -> None:
        super().__init__(request, response_destination(top_via(request), source), timers)
        self.state = TxState.PROCEEDING
        self.acked = False
        self._last: bytes | None = None
        self._interval = timers.t1
        if send_trying:
            self.respond(build_response(request, 100), now)

    def receive(self, request: SipRequest, now: float) -> None:
        if request.method == "ACK":
            if self.state is TxState.COMPLETED:
                self.state = TxState.CONFIRMED
                self._deadlines = {"I": now + self.timers.t4}
            return
        if self.state in (TxState.PROCEEDING, TxState.COMPLETED, TxState.ACCEPTED) and (
            self._last is not None
        ):
            self._send(self._last)

    def respond(self, response: SipResponse, now: float) -> None:
        if self.state is not TxState.PROCEEDING:
            return
        self._last = serialize(response)
        self._send(self._last)
        if response.status < 200:
            return
        self._interval = self.timers.t1
        if response.status < 300:
            self.state = TxState.ACCEPTED
            self._deadlines = {"G2xx": now + self._interval, "L": now + self.timers.timeout}
        else:
            self.state = TxState.COMPLETED
            self._deadlines = {"G": now + self._interval, "H": now + self.timers.timeout}

    def confirm(self, now: float) -> None:
        """The dialog saw the ACK for our 2xx (it has its own branch, so it never reaches
        this transaction by matching): stop retransmitting the 2xx."""
        self.acked = True
        self._deadlines.pop("G2xx", None)

    def _fire(self, name: str, now: float) -> None:
        if name in ("G", "G2xx") and self._last is not None:
            self._send(self._last)
            self._interval = min(2 * self._interval, self.timers.t2)
            self._deadlines[name] = now + self._interval
        elif name == "H":
            self._terminate()
            self._events.append(TransactionTimeout())
        elif name == "L":
            acked = self.acked
            self._terminate()
            if not acked:
                self._events.append(TransactionTimeout())
        elif name == "I":
            self._terminate()


class ServerNonInviteTransaction(_Transaction):
    """§17.2.2: absorbs retransmitted requests, answering each with the last response;
    Timer J keeps it that long after the final response."""

    def __init__(
        self, request: SipRequest, source: Addr, timers: TimerConfig = DEFAULT_TIMERS
    ) -> None:
        super().__init__(request, response_destination(top_via(request), source), timers)
        self.state = TxState.TRYING
        self._last: bytes | None = None

    def receive(self, request: SipRequest, now: float) -> None:
        if self._last is not None and self.state in (TxState.PROCEEDING, TxState.COMPLETED):
            self._send(self._last)

    def respond(self, response: SipResponse, now: float) -> None:
        if self.state not in (TxState.TRYING, TxState.PROCEEDING):
            return
        self._last = serialize(response)
        self._send(self._last)
        if response.status < 200:
            self.state = TxState.PROCEEDING
        else:
            self.state = TxState.COMPLETED
            self._deadlines = {"J": now + self.timers.timeout}

    def _fire(self, name: str, now: float) -> None:
        if name == "J":
            self._terminate()


ServerTransaction = ServerInviteTransaction | ServerNonInviteTransaction
ClientTransaction = ClientInviteTransaction | ClientNonInviteTransaction


def server_key(request: SipRequest) -> tuple[str, str, str] | None:
    """§17.2.3 matching: branch, sent-by and method, with ACK matching its INVITE."""
    try:
        via = top_via(request)
    except SipParseError:
        return None
    branch = via.branch or ""
    if not branch.startswith(BRANCH_COOKIE):
        return None  # RFC 2543 peers: the call layer falls back to dialog matching
    method = "INVITE" if request.method == "ACK" else request.method
    return (branch, f"{via.host}:{via.port or 5060}".lower(), method)


def client_key(message: SipRequest | SipResponse) -> tuple[str, str] | None:
    """§17.1.3 matching: the top Via branch and the CSeq method."""
    try:
        branch = top_via(message).branch or ""
        method = cseq_of(message).method
    except SipParseError:
        return None
    if isinstance(message, SipRequest) and message.method == "ACK":
        method = "INVITE"
    return (branch, method)
