"""OrphanedDialog: end a confirmed dialog whose call died in another process, sans-IO.

Built from a `DialogSnapshot` (snapshot.py) by the replacement of a dead worker (same SIP
port) or by the supervisor. It sends one BYE inside the old dialog (§15.1.1: Request-URI
the remote target, Route from the route set, CSeq above the last one the call used) as a
non-INVITE client transaction, so UDP loss is covered by Timer E retransmissions and
Timer F gives up; a 401/407 gets one digest retry, a 500 (our CSeq was not above one the
dead worker used without telling) one retry with a CSeq further up. A BYE from the phone
crossing ours gets 200; any other request in the old dialog 481.

It speaks the same interface as a call (`SansIoCall`), so a `SipAgent` routes its
responses by Call-ID like any other call's. Events: `DialogClosed` with the outcome, then
`Terminated`.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from . import causes
from .auth import Credentials, answer_challenge
from .callbase import SansIoCall
from .events import CallEvent, Terminated
from .message import (
    SipParseError,
    SipRequest,
    SipResponse,
    build_response,
    format_hostport,
    serialize,
    top_via,
)
from .snapshot import DialogSnapshot, restore
from .sources import dialog_peers, normal_ip
from .transaction import (
    DEFAULT_TIMERS,
    Addr,
    ClientNonInviteTransaction,
    ResponseReceived,
    TimerConfig,
    client_key,
    new_via,
    response_destination,
)

log = logging.getLogger("appliance.sip")

CSEQ_JUMP = 100  # how far above a CSeq the peer refused (500) the retry goes


@dataclass(frozen=True)
class DialogClosed(CallEvent):
    """The BYE's outcome: its final status (408 when nothing answered at all)."""

    status: int
    reason: str


class OrphanedDialog(SansIoCall):
    def __init__(
        self,
        snapshot: DialogSnapshot,
        *,
        local: Addr,
        user_agent: str = "",
        credentials: Credentials | None = None,
        timers: TimerConfig = DEFAULT_TIMERS,
        cause: int = 41,
    ) -> None:
        self.call_id = snapshot.call_id
        self.dialog = restore(snapshot)
        self.dest: Addr = (snapshot.next_hop[0], snapshot.next_hop[1])
        self.local = local
        self.user_agent = user_agent
        self.credentials = credentials
        self.timers = timers
        self.cause = cause
        self.outcome: DialogClosed | None = None
        self._tx: ClientNonInviteTransaction | None = None
        self._retried: set[str] = set()
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[CallEvent] = deque()
        self._terminated = False

    # -- the owner's commands ----------------------------------------------------------------

    def start(self, now: float) -> None:
        self._send_bye(now)
        self._drive(now)

    def hangup(self, now: float, cause: int = causes.CAUSE_NORMAL) -> None:
        """Already hanging up: nothing more to do."""

    # -- sans-IO interface -------------------------------------------------------------------

    @property
    def terminated(self) -> bool:
        return self._terminated

    def peer_addresses(self) -> frozenset[Addr]:
        """Who may answer: the next hop, the route set and the remote target (sources.py)."""
        return frozenset({(normal_ip(self.dest[0]), self.dest[1])}) | dialog_peers(
            self.dialog.route_set, self.dialog.remote_target)

    # -- plumbing ----------------------------------------------------------------------------

    def _transactions(self) -> list[ClientNonInviteTransaction]:
        return [] if self._tx is None else [self._tx]

    def _send_bye(self, now: float, extra: tuple[str, str] | None = None) -> None:
        # The sent-by the live call's requests had: an IPv6 address in brackets (§25.1).
        via = new_via(format_hostport(*self.local))
        headers = [*self._ua(), ("Reason", causes.reason_header(self.cause))]
        if extra is not None:
            headers.append(extra)
        bye = self.dialog.create_request("BYE", via, headers=headers)
        self._tx = ClientNonInviteTransaction(bye, self.dest, now, self.timers)

    def _on_response(self, response: SipResponse, now: float) -> None:
        tx = self._tx
        if tx is not None and client_key(response) == client_key(tx.request):
            tx.receive(response, now)

    def _on_request(self, request: SipRequest, addr: Addr, now: float) -> None:
        if request.method == "ACK":
            return
        # The phone hanging up at the same moment: the dialog ends either way.
        status = 200 if request.method == "BYE" and self.dialog.matches(request) else 481
        try:
            response = build_response(request, status, to_tag=self.dialog.local_tag)
            self._out.append((serialize(response), response_destination(top_via(request), addr)))
        except (SipParseError, ValueError) as exc:
            log.info("dialog %s: cannot answer a request from %s: %s", self.call_id, addr, exc)

    def _drive(self, now: float) -> None:
        tx = self._tx
        if tx is None or self._terminated:
            return
        self._out.extend(tx.datagrams_to_send())
        while (event := tx.next_event()) is not None:
            if not isinstance(event, ResponseReceived):
                self._finish(408, "no response to BYE")
            elif event.response.status >= 200:
                self._on_final(event.response, now)
        if self._tx is not tx:  # a retry went out: collect its first datagram too
            self._drive(now)
            return
        if tx.terminated and self.outcome is not None:
            self._terminated = True
            self._emit(Terminated())

    def _on_final(self, response: SipResponse, now: float) -> None:
        status = response.status
        if status in (401, 407) and self.credentials is not None and "auth" not in self._retried:
            self._retried.add("auth")
            bye = self._tx.request if self._tx is not None else None
            answer = None if bye is None else answer_challenge(
                response, self.credentials, "BYE", bye.uri)
            if answer is not None:
                self._send_bye(now, answer)
                return
        if status == 500 and "cseq" not in self._retried:
            self._retried.add("cseq")
            self.dialog.local_seq += CSEQ_JUMP
            self._send_bye(now)
            return
        self._finish(status, response.reason)

    def _finish(self, status: int, reason: str) -> None:
        if self.outcome is None:
            self.outcome = DialogClosed(status, reason, call_id=self.call_id)
            self._events.append(self.outcome)
