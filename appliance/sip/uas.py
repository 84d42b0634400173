"""IncomingCall: the UAS side of one call, sans-IO, in the shape of OutgoingCall.

The appliance itself only places calls; this side exists for the simulated desk phone the
demo calls instead of a real PBX (deskphone/phone.py), so that the demo and its tests
exercise our UAC against the same stack rather than a second SIP implementation.

Feed it `receive_message()` / `receive_datagram()` and `handle_timer()` with `now`, then
drain `datagrams_to_send()`, `next_event()` and re-arm on `get_timer()`. The owner decides
what happens to the INVITE with `ring()`, `answer()`, `reject()` and later `hangup()`.

States (`state`):

    RECEIVED (100 sent) --ring--> RINGING --answer--> ANSWERED (2xx retransmitted)
      --ACK--> CONFIRMED --hangup: BYE--> TERMINATING --BYE answered or timed out--> ENDED
      RECEIVED/RINGING --reject / CANCEL (487) / early BYE (487)--> ENDED
      ANSWERED --no ACK for 64*T1--> BYE, TERMINATING
      ANSWERED/CONFIRMED --BYE received--> ENDED
      ENDED --last transaction done--> TERMINATED (Terminated)
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from enum import Enum, auto

from . import causes
from .dialog import ALLOW, Dialog, new_tag
from .events import (
    AckTimeout,
    CallCancelled,
    CallConfirmed,
    CallerHungUp,
    CallEvent,
    IncomingInvite,
    Terminated,
)
from .message import (
    USER_PART_RE,
    SipParseError,
    SipRequest,
    SipResponse,
    cseq_of,
    format_hostport,
    parse_name_addr,
    parse_uri,
    sdp_body,
    tag_of,
    top_via,
)
from .sdp import LocalSdp
from .session_call import RETRY_AFTER, SessionCall
from .sources import dialog_peers, normal_ip
from .transaction import (
    DEFAULT_TIMERS,
    Addr,
    ClientNonInviteTransaction,
    ClientTransaction,
    ResponseReceived,
    ServerInviteTransaction,
    ServerTransaction,
    TimerConfig,
    server_key,
)


class IncomingState(Enum):
    RECEIVED = auto()
    RINGING = auto()
    ANSWERED = auto()
    CONFIRMED = auto()
    TERMINATING = auto()
    ENDED = auto()
    TERMINATED = auto()


_EARLY = (IncomingState.RECEIVED, IncomingState.RINGING)
_UP = (IncomingState.ANSWERED, IncomingState.CONFIRMED)


def _user_of(uri: str) -> str:
    try:
        return parse_uri(uri).user or uri
    except SipParseError:
        return uri  # a tel: URI or the like: show it whole


class IncomingCall(SessionCall):
    def __init__(
        self,
        invite: SipRequest,
        source: Addr,
        now: float,
        *,
        local: Addr,
        user_agent: str = "",
        timers: TimerConfig = DEFAULT_TIMERS,
    ) -> None:
        """Take an out-of-dialog INVITE (parse() has checked From, To, Call-ID, CSeq, Via);
        sends 100 Trying at once and queues IncomingInvite."""
        if invite.method != "INVITE":
            raise ValueError(f"not an INVITE: {invite.method}")
        self.local = local
        self.source = source  # where BYE goes when the Contact host is no IP literal
        self.user_agent = user_agent
        self.timers = timers
        self.call_id = invite.headers.get("Call-ID") or ""
        self.state = IncomingState.RECEIVED
        self.invite = invite
        self.offer = sdp_body(invite)
        self.local_sdp: LocalSdp | None = None  # set by answer()
        self._invite_seq = cseq_of(invite).seq
        self._events: deque[CallEvent] = deque()
        self._out: list[tuple[bytes, Addr]] = []
        self._server: dict[tuple[str, str, str], ServerTransaction] = {}
        self._client: dict[str, ClientNonInviteTransaction] = {}  # our BYE(s), by branch
        self._hangup_pending = False  # hangup() before the ACK: BYE once it comes (§15)
        self._offer_in_2xx = False
        # The re-INVITE we answered 2xx: (transaction, CSeq, our 2xx carried the offer)
        self._reinvite: tuple[ServerInviteTransaction, int, bool] | None = None

        caller = parse_name_addr(invite.headers.get("From") or "")
        callee = parse_name_addr(invite.headers.get("To") or "")
        user = _user_of(callee.uri)
        self._contact = f"<sip:{_contact_user(user)}@{format_hostport(*local)}>"
        # §12.1.1: the UAS's dialog; the route set is Record-Route as received (not
        # reversed, we are the callee) and the remote target is the caller's Contact.
        self.dialog = Dialog(
            call_id=self.call_id,
            local=callee.with_tag(new_tag()),
            remote=caller,
            local_seq=0,
            remote_target=self._remote_target(invite, source),
            route_set=list(invite.headers.get_all("Record-Route")),
            local_contact=self._contact,
            remote_seq=self._invite_seq,
        )
        tx = ServerInviteTransaction(invite, source, now, timers)
        self._invite_tx = tx
        self._add_server(invite, tx)
        self._emit(IncomingInvite(_user_of(caller.uri), user, self.offer, invite.headers.copy()))
        self._drive(now)

    @staticmethod
    def _remote_target(invite: SipRequest, source: Addr) -> str:
        contact = invite.headers.get("Contact")
        if contact:
            with contextlib.suppress(SipParseError):
                return parse_name_addr(contact).uri
        # An INVITE must carry a Contact; without one, the address it came from will do.
        return f"sip:{format_hostport(*source)}"

    # ------------------------------------------------------------------ the owner's commands

    def ring(self, now: float) -> None:
        """180 Ringing (creates the early dialog; sending it again is harmless)."""
        if self.state not in _EARLY:
            return  # cancelled meanwhile: the owner's timer lost the race, nothing to do
        self.state = IncomingState.RINGING
        self._invite_tx.respond(self._invite_response(180), now)
        self._drive(now)

    def answer(self, sdp: str, now: float) -> str | None:
        """200 OK with SDP; `sdp` is our own description (address, port, codecs, as from
        `build_offer`). When the INVITE had an offer we answer it from `sdp` (shared codecs,
        the offer's payload numbers, mirrored direction); otherwise `sdp` is our offer and
        the answer comes in the ACK. Returns the SDP sent, or None when the call is no
        longer answerable or nothing is in common with the offer (then we sent 488)."""
        if self.state not in _EARLY:
            return None
        self.local_sdp = LocalSdp(sdp)  # our own bad SDP is the owner's bug: SdpError
        if self.offer is None:
            body = self.local_sdp.current
            self._offer_in_2xx = True
        else:
            answer = self._answer(self.offer)
            if answer is None:
                self.reject(488, now)
                return None
            body = answer
        headers = [("Allow", ALLOW), ("Content-Type", "application/sdp")]
        self._invite_tx.respond(self._invite_response(200, headers, body.encode()), now)
        self.state = IncomingState.ANSWERED
        self._drive(now)
        return body

    def reject(self, status: int, now: float, reason: str | None = None) -> None:
        """A final failure (486 Busy Here, 603 Decline, ...) to the INVITE; the transaction
        retransmits it until the caller's ACK."""
        if not 300 <= status < 700:
            raise ValueError(f"not a failure status: {status}")
        if self.state not in _EARLY:
            return
        self._invite_tx.respond(self._invite_response(status, reason=reason), now)
        self._end()
        self._drive(now)

    def hangup(self, now: float, status: int = 480, cause: int = causes.CAUSE_NORMAL) -> None:
        """End the call: BYE once confirmed; before the answer, reject with `status`.
        Answered but not yet ACKed: the BYE waits for the ACK (or its timeout), §15."""
        if self.state in _EARLY:
            self.reject(status, now)
            return
        if self.state is IncomingState.ANSWERED:
            self._hangup_pending = True
        elif self.state is IncomingState.CONFIRMED:
            self._send_bye(now, cause)
        self._drive(now)

    # ------------------------------------------------------------------ sans-IO interface

    @property
    def ended(self) -> bool:
        """The call is over for the owner (only retransmission timers may still run)."""
        return self.state in (IncomingState.ENDED, IncomingState.TERMINATED)

    @property
    def terminated(self) -> bool:
        return self.state is IncomingState.TERMINATED

    def has_dialog_for(self, request: SipRequest) -> bool:
        """Whether a request is this call's: in its dialog, or without a To tag (a CANCEL or
        a retransmission of the INVITE, which its transactions match)."""
        return tag_of(request, "To") is None or self.dialog.matches(request)

    def peer_addresses(self) -> frozenset[Addr]:
        """Where this call's SIP may come from (sources.py): the INVITE's source, and the
        hosts the dialog sends to (the caller's Contact, its Record-Route)."""
        source = (normal_ip(self.source[0]), self.source[1])
        return dialog_peers(self.dialog.route_set, self.dialog.remote_target) | {source}

    # ------------------------------------------------------------------ plumbing

    def _transactions(self) -> list[ClientTransaction | ServerTransaction]:
        return [*self._client.values(), *self._server.values()]

    def _invite_response(
        self,
        status: int,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        reason: str | None = None,
    ) -> SipResponse:
        """A response to the initial INVITE, To-tagged. §12.1.1: responses that create the
        dialog copy Record-Route and carry our Contact (the dialog adds it to a 2xx)."""
        extra = [("Record-Route", rr) for rr in self.invite.headers.get_all("Record-Route")]
        if status < 200:
            extra.append(("Contact", self._contact))
        extra += [*self._server_header(), *headers]
        return self.dialog.create_response(self.invite, status, reason, headers=extra, body=body)

    def _drive(self, now: float) -> None:
        """Collect what the transactions send and say, act on it, until nothing moves."""
        moved = True
        while moved:
            client_moved = self._pump(self._client, lambda _tx, event: self._on_bye_outcome(event))
            server_moved = self._pump(
                self._server, lambda tx, _event: self._on_server_timeout(tx, now))
            moved = client_moved or server_moved
        if self.state is IncomingState.ENDED and not self._client and not self._server:
            self.state = IncomingState.TERMINATED
            self._emit(Terminated())

    def _end(self) -> None:
        if self.state is not IncomingState.TERMINATED:
            self.state = IncomingState.ENDED
        self._hangup_pending = False

    def _send_bye(self, now: float, cause: int) -> None:
        bye = self._new_bye(self.dialog, cause)
        tx = ClientNonInviteTransaction(bye, self.dialog.next_hop(self.source), now, self.timers)
        self._client[tx.branch] = tx
        self.state = IncomingState.TERMINATING

    # ------------------------------------------------------------------ what the caller sends

    def _on_response(self, response: SipResponse, now: float) -> None:
        try:
            branch = top_via(response).branch or ""
        except SipParseError:
            return
        tx = self._client.get(branch)
        if tx is not None:
            tx.receive(response, now)

    def _on_bye_outcome(self, event: object) -> None:
        # Any final answer to our BYE (or none within Timer F) ends the call; a 481 means
        # the caller had forgotten it already, which is the same outcome.
        if isinstance(event, ResponseReceived) and event.response.status < 200:
            return
        if self.state is IncomingState.TERMINATING:
            self._end()

    def _on_request(self, request: SipRequest, addr: Addr, now: float) -> None:
        key = server_key(request)
        if request.method == "ACK":
            self._on_ack(request, key, now)
            return
        if key is not None and key in self._server:
            self._server[key].receive(request, now)  # a retransmission
            return
        if (
            request.method == "INVITE"
            and key is None
            and tag_of(request, "To") is None
            and cseq_of(request).seq == self._invite_seq
        ):
            self._invite_tx.receive(request, now)  # an RFC 2543 peer's retransmission
            return
        if request.method == "CANCEL":
            self._on_cancel(request, key, addr, now)
            return
        tx = self._new_server_tx(request, addr, now)
        if not self.dialog.matches(request):
            tx.respond(
                self.dialog.create_response(request, 481, headers=self._server_header()), now
            )
            return
        self._answer_in_dialog(self.dialog, request, tx, now)

    def _on_ack(self, ack: SipRequest, key: tuple[str, str, str] | None, now: float) -> None:
        if key is not None and key in self._server:
            # The ACK for a non-2xx final (same branch as its INVITE): the transaction's.
            self._server[key].receive(ack, now)
        if not self.dialog.matches(ack):
            return
        seq = cseq_of(ack).seq
        if seq == self._invite_seq and self.state is IncomingState.ANSWERED:
            # §13.3.1.4: the ACK for our 2xx has its own branch; the dialog matches it.
            self._invite_tx.confirm(now)
            self.dialog.confirmed = True
            self.state = IncomingState.CONFIRMED
            answer = sdp_body(ack) if self._offer_in_2xx else None
            self._emit(CallConfirmed(answer))
            if self._hangup_pending:
                self._hangup_pending = False
                self._send_bye(now, causes.CAUSE_NORMAL)
            return
        self._on_reinvite_ack(ack, now)

    def _on_cancel(
        self, cancel: SipRequest, key: tuple[str, str, str] | None, addr: Addr, now: float
    ) -> None:
        """§9.2: 200 to the CANCEL, and 487 to the INVITE if it has no final response yet."""
        invite_key = (key[0], key[1], "INVITE") if key is not None else None
        tx = self._new_server_tx(cancel, addr, now)
        if invite_key is None or self._server.get(invite_key) is not self._invite_tx:
            tx.respond(self.dialog.create_response(cancel, 481), now)
            return
        tx.respond(self.dialog.create_response(cancel, 200, headers=self._server_header()), now)
        if self.state in _EARLY:
            self._invite_tx.respond(self._invite_response(487), now)
            cause = causes.reason_cause(cancel) or causes.CAUSE_NORMAL
            self._emit(CallCancelled(cause, causes.causestring(cause)))
            self._end()

    def _on_bye(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        tx.respond(dialog.create_response(request, 200, headers=self._server_header()), now)
        cause = causes.reason_cause(request) or causes.CAUSE_NORMAL
        if self.state in _EARLY:
            # §15.1.2: the caller may BYE an early dialog; the INVITE then gets 487.
            self._invite_tx.respond(self._invite_response(487), now)
            self._emit(CallCancelled(cause, causes.causestring(cause)))
        elif self.state in _UP:
            # A BYE before the ACK means the ACK was lost: stop retransmitting the 2xx.
            self._invite_tx.confirm(now)
            self._emit(CallerHungUp(cause, causes.causestring(cause)))
        self._end()

    def _on_reinvite(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        if self.state is not IncomingState.CONFIRMED or self.local_sdp is None:
            # §14.2: not while our own 2xx (or an earlier re-INVITE's) awaits its ACK.
            if self.state in _UP:
                tx.respond(dialog.create_response(request, 500, headers=RETRY_AFTER), now)
            else:
                tx.respond(dialog.create_response(request, 481), now)
            return
        self._answer_reinvite(dialog, request, tx, now)

    def _on_server_timeout(self, tx: ServerTransaction, now: float) -> None:
        """Timer L without an ACK for a 2xx (§13.3.1.4): end the session with BYE. Other
        timeouts (Timer H after a non-2xx) need nothing: the call has ended already."""
        if tx is self._invite_tx and self.state is IncomingState.ANSWERED:
            self._emit(AckTimeout())
            self._hangup_pending = False
            self._send_bye(now, causes.CAUSE_TIMER_EXPIRY)
        elif (
            self._reinvite is not None
            and tx is self._reinvite[0]
            and self.state is IncomingState.CONFIRMED
        ):
            self._reinvite = None
            self._emit(AckTimeout())
            self._send_bye(now, causes.CAUSE_TIMER_EXPIRY)


def _contact_user(user: str) -> str:
    """The callee's user part for our Contact, unless it could break the URI."""
    # Only a user part safe to put in our Contact as is (no ';', '?', '@', quotes, spaces).
    return user if USER_PART_RE.fullmatch(user) else "deskphone"
