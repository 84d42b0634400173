"""OutgoingCall: the UAC side of one call to the agent's desk phone, sans-IO.

It owns the call's transactions and dialog and no socket or clock: feed it
`receive_message()` / `receive_datagram()` and `handle_timer()` with `now`, then drain
`datagrams_to_send()`, `next_event()` and re-arm on `get_timer()`.

States (what the owner sees in `state`):

    IDLE --start--> CALLING --1xx--> PROCEEDING --2xx--> CONFIRMED --BYE sent--> TERMINATING
      CALLING/PROCEEDING --hangup/cancel/ring timeout--> CANCELLING (CANCEL sent once a 1xx
        has arrived, §9.1) --487--> ENDED;  --2xx (the CANCEL race)--> ACK + BYE, TERMINATING
      CALLING/PROCEEDING --3xx-6xx / Timer B--> ENDED (Failed)
      CONFIRMED --BYE received--> ENDED (RemoteHangup)
      TERMINATING --BYE answered or timed out--> ENDED
      ENDED --last transaction done--> TERMINATED (Terminated)
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Sequence
from enum import Enum, auto

from . import causes
from .auth import Credentials, answer_challenge
from .deadlines import due
from .dialog import ALLOW, Dialog, new_tag
from .dtmf_info import DTMF_RELAY, dtmf_relay_body
from .events import (
    Answered,
    CallEvent,
    DialogUpdated,
    Failed,
    RemoteHangup,
    Ringing,
    Terminated,
    Trying,
)
from .message import (
    USER_PART_RE,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    build_response,
    cseq_of,
    format_hostport,
    sdp_body,
    serialize,
    tag_of,
    validate_header,
)
from .sdp import LocalSdp
from .session_call import SessionCall
from .session_timer import SessionTimer, TimerAction, TimerSettings
from .snapshot import take as take_snapshot
from .sources import dialog_peers
from .transaction import (
    DEFAULT_TIMERS,
    Addr,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    ClientTransaction,
    ResponseReceived,
    ServerInviteTransaction,
    ServerTransaction,
    TimerConfig,
    TransactionEvent,
    client_key,
    server_key,
)

log = logging.getLogger("appliance.sip")

MAX_FORKS = 8  # 2xx from distinct forks we ACK (and BYE but the first) per call


class CallState(Enum):
    IDLE = auto()
    CALLING = auto()
    PROCEEDING = auto()
    CANCELLING = auto()
    CONFIRMED = auto()
    TERMINATING = auto()
    ENDED = auto()
    TERMINATED = auto()


_EARLY = (CallState.CALLING, CallState.PROCEEDING)


def _allows(response: SipResponse, method: str) -> bool:
    """Whether the peer's Allow lists `method` (RFC 3261 §20.5)."""
    return any(
        item.strip(" \t").upper() == method
        for value in response.headers.get_all("Allow")
        for item in value.split(",")
    )


class OutgoingCall(SessionCall):
    def __init__(
        self,
        *,
        local: Addr,
        proxy: Addr,
        caller: str,
        callee: str,
        local_sdp: str,
        caller_display: str | None = None,
        callee_display: str | None = None,
        user_agent: str = "",
        extra_headers: Sequence[tuple[str, str]] = (),
        credentials: Credentials | tuple[str, str] | None = None,
        ring_timeout: float | None = None,
        timers: TimerConfig = DEFAULT_TIMERS,
        call_id: str | None = None,
    ) -> None:
        for user in (caller, callee):
            if not USER_PART_RE.fullmatch(user):
                raise ValueError(f"not a SIP user part: {user!r}")
        # Fail here, not half-way through start().
        for name, value in [*extra_headers, ("User-Agent", user_agent)]:
            validate_header(name, value)
        for display in (caller_display, callee_display):
            validate_header("From", display or "")
        self.local = local
        self.proxy = proxy
        self.caller = caller
        self.callee = callee
        self.caller_display = caller if caller_display is None else caller_display
        self.callee_display = callee_display
        self.user_agent = user_agent
        self.extra_headers = list(extra_headers)
        if isinstance(credentials, tuple):
            credentials = Credentials(*credentials)
        self.credentials = credentials
        self.ring_timeout = ring_timeout
        self.timers = timers
        self.call_id = call_id or secrets.token_hex(16)
        self.state = CallState.IDLE
        self.local_sdp = LocalSdp(local_sdp)
        self.dialog: Dialog | None = None  # the confirmed dialog
        local_host, local_port = local
        self._from = NameAddr(
            f"sip:{caller}@{format_hostport(local_host)}", self.caller_display, {"tag": new_tag()}
        )
        self._to = NameAddr(f"sip:{callee}@{format_hostport(*proxy)}", callee_display)
        self._contact = f"<sip:{caller}@{format_hostport(local_host, local_port)}>"

        self._invite: SipRequest | None = None
        self._invite_tx: ClientInviteTransaction | None = None
        self._client: dict[tuple[str, str], tuple[ClientTransaction, str]] = {}
        self._server: dict[tuple[str, str, str], ServerTransaction] = {}
        self._early: dict[str, Dialog] = {}  # early dialogs by remote tag
        self._acks: dict[str, tuple[bytes, Addr]] = {}  # ACK per 2xx remote tag, to re-send
        self._events: deque[CallEvent] = deque()
        self._out: list[tuple[bytes, Addr]] = []
        self._ring_deadline: float | None = None
        self._cancel_deadline: float | None = None
        self._outcome = False  # Answered or Failed already told
        self._local_end = False  # the owner cancelled or hung up
        self._cancel_pending = False  # hang-up asked before any 1xx: CANCEL on the first
        self._cancel_cause = causes.CAUSE_NORMAL
        self._auth_tried: set[str] = set()
        self._seen_trying = False
        self._last_ringing: tuple[int, str | None] | None = None
        # The re-INVITE we answered 2xx: (transaction, CSeq, our 2xx carried the offer)
        self._reinvite: tuple[ServerInviteTransaction, int, bool] | None = None
        # RFC 4028 (session_timer.py); off until use_session_timer() before start().
        self.timer = SessionTimer()
        self._peer_allows_update = False
        self._refreshing = False  # our refresh request is in flight
        # DialogUpdated events only for an owner that asks (the workers: snapshot.py), and
        # what it was last told of the dialog, to tell only changes.
        self.reports_dialog = False
        self._announced: tuple[int, str, tuple[str, ...]] | None = None

    # ------------------------------------------------------------------ the owner's commands

    def use_session_timer(self, settings: TimerSettings) -> None:
        """RFC 4028 towards the peer (before start()): `settings.expires` 0 means none."""
        if self.state is not CallState.IDLE:
            raise RuntimeError("call already started")
        self.timer = SessionTimer(settings)

    def start(self, now: float) -> None:
        """Send the INVITE."""
        if self.state is not CallState.IDLE:
            raise RuntimeError("call already started")
        uri = self._to.uri
        invite = SipRequest("INVITE", uri, body=self.local_sdp.current.encode())
        headers = invite.headers
        headers.add("Via", self._via())
        headers.add("Max-Forwards", "70")
        headers.add("From", str(self._from))
        headers.add("To", str(self._to))
        headers.add("Call-ID", self.call_id)
        headers.add("CSeq", "1 INVITE")
        headers.add("Contact", self._contact)
        for name, value in self._ua():
            headers.add(name, value)
        headers.add("Allow", ALLOW)
        for name, value in self.timer.invite_headers():
            headers.add(name, value)
        for name, value in self.extra_headers:
            headers.add(name, value)
        headers.add("Content-Type", "application/sdp")
        self.state = CallState.CALLING
        if self.ring_timeout is not None:
            self._ring_deadline = now + self.ring_timeout
        self._send_invite(invite, now)
        self._drive(now)

    def hangup(self, now: float, cause: int = causes.CAUSE_NORMAL) -> None:
        """End the call: BYE once confirmed, CANCEL while it is still ringing."""
        if self.state is CallState.IDLE:
            self._end()
        elif self.state in _EARLY:
            self._local_end = True
            self._request_cancel(now, cause)
        elif self.state is CallState.CONFIRMED and self.dialog is not None:
            self._local_end = True
            self._send_bye(self.dialog, now, cause)
            self.state = CallState.TERMINATING
        self._drive(now)

    def cancel(self, now: float, cause: int = causes.CAUSE_NORMAL) -> None:
        """Give up before the answer (CANCEL). If the answer wins the race, it is ACKed and
        ended with BYE; on a confirmed call this is the same as hangup()."""
        self.hangup(now, cause)

    def send_info_dtmf(self, key: str, duration_ms: int, now: float) -> bool:
        """Send a key press as SIP INFO; False when there is no confirmed call to send on."""
        body = dtmf_relay_body(key, duration_ms)
        if self.state is not CallState.CONFIRMED or self.dialog is None:
            return False
        request = self.dialog.create_request(
            "INFO", self._via(), headers=[*self._ua(), ("Content-Type", DTMF_RELAY)], body=body
        )
        self._start_client(request, self.dialog.next_hop(self.proxy), now, "info")
        self._drive(now)
        return True

    # ------------------------------------------------------------------ sans-IO interface

    @property
    def terminated(self) -> bool:
        return self.state is CallState.TERMINATED

    def has_dialog_for(self, request: SipRequest) -> bool:
        """Whether a request is in one of this call's dialogs (confirmed or early)."""
        return self._dialog_for(request) is not None

    def peer_addresses(self) -> frozenset[Addr]:
        """Where this call's SIP may come from (sources.py): the proxy, and the hosts the
        confirmed or early dialogs send to (their Record-Route and Contact)."""
        peers = {self.proxy}
        for dialog in (self.dialog, *self._early.values()):
            if dialog is not None:
                peers |= dialog_peers(dialog.route_set, dialog.remote_target)
        return frozenset(peers)

    # ------------------------------------------------------------------ plumbing

    def _transactions(self) -> list[ClientTransaction | ServerTransaction]:
        return [*(tx for tx, _ in self._client.values()), *self._server.values()]

    def _own_deadlines(self) -> tuple[float | None, ...]:
        return (self._ring_deadline, self._cancel_deadline, self.timer.get_timer())

    def _handle_own_timers(self, now: float) -> None:
        if due(self._ring_deadline, now):
            self._ring_deadline = None
            self._on_ring_timeout(now)
        if due(self._cancel_deadline, now):
            self._cancel_deadline = None
            self._on_cancel_gave_up()
        if due(self.timer.get_timer(), now):
            self._on_session_timer(self.timer.handle_timer(now), now)

    def _start_client(
        self, request: SipRequest, dest: Addr, now: float, purpose: str
    ) -> ClientTransaction:
        tx: ClientTransaction
        if request.method == "INVITE":
            tx = ClientInviteTransaction(request, dest, now, self.timers)
        else:
            tx = ClientNonInviteTransaction(request, dest, now, self.timers)
        # We built the Via and CSeq ourselves, so the key always exists.
        self._client[client_key(request) or ("", request.method)] = (tx, purpose)
        return tx

    def _drive(self, now: float) -> None:
        """Collect what the transactions send and say, act on it, until nothing moves."""
        moved = True
        while moved:
            client_moved = self._pump(
                self._client, lambda entry, event: self._on_client_event(*entry, event, now),
                tx_of=lambda entry: entry[0])
            server_moved = self._pump(
                self._server, lambda tx, _event: self._on_server_timeout(tx, now))
            moved = client_moved or server_moved
        self._announce_dialog()
        if self.state is CallState.ENDED and not self._client and not self._server:
            self.state = CallState.TERMINATED
            self._emit(Terminated())

    def _announce_dialog(self) -> None:
        """DialogUpdated when the confirmed dialog first exists, when what a BYE from
        elsewhere would need changes (CSeq, target, routes), and once more (None) when it
        is over: a call we ended stays announced until its BYE is answered."""
        if self.state is not CallState.CONFIRMED:
            self.timer.stop()  # a session timer runs only on a confirmed call
        if not self.reports_dialog:
            return
        dialog = self.dialog
        live = dialog is not None and self.state in (CallState.CONFIRMED, CallState.TERMINATING)
        if dialog is not None and live:
            key = (dialog.local_seq, dialog.remote_target, tuple(dialog.route_set))
            if key != self._announced:
                self._announced = key
                self._emit(DialogUpdated(take_snapshot(dialog, self.proxy)))
        elif self._announced is not None:
            self._announced = None
            self._emit(DialogUpdated(None))

    def _end(self) -> None:
        if self.state is not CallState.TERMINATED:
            self.state = CallState.ENDED
        self._ring_deadline = None
        self._cancel_deadline = None
        self._cancel_pending = False

    # ------------------------------------------------------------------ INVITE client side

    def _send_invite(self, invite: SipRequest, now: float) -> None:
        self._invite = invite
        tx = self._start_client(invite, self.proxy, now, "invite")
        assert isinstance(tx, ClientInviteTransaction)
        self._invite_tx = tx

    def _on_client_event(
        self, tx: ClientTransaction, purpose: str, event: TransactionEvent, now: float
    ) -> None:
        response = event.response if isinstance(event, ResponseReceived) else None
        if purpose == "invite":
            if response is None:
                self._on_invite_timeout(tx)
            elif response.status < 200:
                self._on_provisional(tx.request, response, now)
            elif response.status < 300:
                self._on_2xx(tx.request, response, now)
            else:
                self._on_invite_failure(tx, response, now)
        elif purpose == "bye":
            if response is not None and response.status < 200:
                return
            if response is not None and self._retry_with_auth(tx, response, now, purpose):
                return
            if self.state is CallState.TERMINATING:
                self._end()
        elif purpose == "refresh":
            self._on_refresh_response(tx, response, now)
        # "cancel", "info" and "stray-bye" answers change nothing: the INVITE's own final
        # response (or the 64*T1 give-up) decides the fate of a cancelled call.

    def _on_provisional(self, invite: SipRequest, response: SipResponse, now: float) -> None:
        if self.state is CallState.CALLING:
            self.state = CallState.PROCEEDING
        if response.status == 100:
            if not self._seen_trying and not self._local_end:
                self._seen_trying = True
                self._emit(Trying())
        else:
            tag = tag_of(response, "To")
            if tag and self.dialog is None and tag not in self._early:
                try:
                    self._early[tag] = Dialog.from_uac_response(invite, response)
                except SipParseError as exc:
                    log.info("call %s: unusable early dialog: %s", self.call_id, exc)
            if not self._local_end and not self._outcome:
                sdp = sdp_body(response)
                if (response.status, sdp) != self._last_ringing:
                    self._last_ringing = (response.status, sdp)
                    self._emit(Ringing(sdp, response.status))
        if self._cancel_pending and self.state is CallState.PROCEEDING:
            self._send_cancel(now)

    def _on_2xx(self, invite: SipRequest, response: SipResponse, now: float) -> None:
        tag = tag_of(response, "To") or ""
        if tag in self._acks:
            # A retransmitted 2xx: our ACK was lost (§13.2.2.4), send the same one again.
            self._out.append(self._acks[tag])
            return
        if self.dialog is not None and len(self._acks) > MAX_FORKS:
            # More "forks" than any real fork of a call: forged 2xx (from the proxy's
            # address: sources.py refuses anyone else's). Each would cost an ACK, a BYE with
            # its retransmissions, and memory for the call's lifetime: ignore them.
            return
        try:
            dialog = Dialog.from_uac_response(invite, response)
        except SipParseError as exc:
            # Only the first answer matters; a broken "fork" after it is noise, not news.
            report = log.warning if self.dialog is None else log.debug
            report("call %s: 2xx we cannot build a dialog from: %s", self.call_id, exc)
            return
        ack = dialog.create_ack(cseq_of(invite).seq, self._via())
        for name, value in self._ua():
            ack.headers.add(name, value)
        self._acks[tag] = (serialize(ack), dialog.next_hop(self.proxy))
        self._out.append(self._acks[tag])
        if self.dialog is not None:
            # Another fork answered too: keep the first, end this one (§13.2.2.4).
            self._send_bye(dialog, now, causes.CAUSE_NORMAL, purpose="stray-bye")
            return
        if tag in self._early:
            dialog.remote_seq = self._early[tag].remote_seq  # e.g. an UPDATE while ringing
        self.dialog = dialog
        self._early.clear()
        self._cancel_deadline = None
        self._ring_deadline = None
        if self._local_end or self._outcome:
            # The answer crossed our CANCEL (or came after the ring timeout): it is up at
            # the far end now, so it has to be ended the long way.
            self._send_bye(dialog, now, self._cancel_cause)
            self.state = CallState.TERMINATING
            return
        sdp = sdp_body(response)
        self._outcome = True
        if sdp is None:
            cause = causes.CAUSE_INTERWORKING
            self._emit(Failed(response.status, "no SDP in the answer", cause, "no SDP answer"))
            self._send_bye(dialog, now, cause)
            self.state = CallState.TERMINATING
            return
        self.state = CallState.CONFIRMED
        self.timer.on_2xx(response, now)
        self._peer_allows_update = _allows(response, "UPDATE")
        self._emit(Answered(sdp))

    def _on_invite_failure(self, tx: ClientTransaction, response: SipResponse, now: float) -> None:
        if tx is not self._invite_tx:
            return
        if self._retry_with_auth(tx, response, now, "invite"):
            return
        if self._retry_with_longer_interval(tx, response, now):
            return
        if not self._outcome and not self._local_end:
            self._outcome = True
            cause, text = causes.cause_of_response(response)
            self._emit(Failed(response.status, response.reason, cause, text))
        self._end()

    def _on_invite_timeout(self, tx: ClientTransaction) -> None:
        if tx is not self._invite_tx:
            return
        if not self._outcome and not self._local_end:
            self._outcome = True
            cause = causes.CAUSE_TIMER_EXPIRY
            self._emit(Failed(408, "Request Timeout", cause, causes.causestring(cause)))
        self._end()

    def _retry_with_auth(
        self, tx: ClientTransaction, response: SipResponse, now: float, purpose: str
    ) -> bool:
        """Answer a 401/407 once per method: same request, CSeq+1, new branch, credentials."""
        method = tx.request.method
        if (
            response.status not in (401, 407)
            or self.credentials is None
            or method in self._auth_tried
            or (method == "INVITE" and (self._local_end or self._outcome))
        ):
            return False
        old = tx.request
        answer = answer_challenge(response, self.credentials, method, old.uri, body=old.body)
        if answer is None:
            return False
        self._auth_tried.add(method)
        if method == "INVITE":
            seq = cseq_of(old).seq + 1
        else:
            assert self.dialog is not None
            self.dialog.local_seq += 1
            seq = self.dialog.local_seq
        request = SipRequest(method, old.uri, old.headers.copy(), old.body)
        request.headers.set("Via", self._via())
        request.headers.set("CSeq", f"{seq} {method}")
        request.headers.remove("Authorization")
        request.headers.remove("Proxy-Authorization")
        request.headers.add(*answer)
        if method == "INVITE":
            self.state = CallState.CALLING  # CANCEL must wait for this INVITE's own 1xx
            self._send_invite(request, now)
        else:
            self._start_client(request, tx.dest, now, purpose)
        return True

    # ------------------------------------------------------------------ ending

    def _request_cancel(self, now: float, cause: int) -> None:
        self._ring_deadline = None
        self._cancel_cause = cause
        if self.state is CallState.PROCEEDING:
            self._send_cancel(now)
        else:
            self._cancel_pending = True  # §9.1: no CANCEL before a provisional response

    def _send_cancel(self, now: float) -> None:
        """§9.1: same Request-URI, Call-ID, From, To, CSeq number, top Via and Route as the
        INVITE, so every hop matches it to the INVITE transaction."""
        invite, invite_tx = self._invite, self._invite_tx
        assert invite is not None and invite_tx is not None
        self._cancel_pending = False
        cancel = SipRequest("CANCEL", invite.uri)
        headers = cancel.headers
        headers.add("Via", invite.headers.get_all("Via")[0])
        headers.add("Max-Forwards", "70")
        for name in ("From", "To", "Call-ID"):
            headers.add(name, invite.headers.get(name) or "")
        headers.add("CSeq", f"{cseq_of(invite).seq} CANCEL")
        for route in invite.headers.get_all("Route"):
            headers.add("Route", route)
        for name, value in self._ua():
            headers.add(name, value)
        headers.add("Reason", causes.reason_header(self._cancel_cause))
        self._start_client(cancel, invite_tx.dest, now, "cancel")
        self.state = CallState.CANCELLING
        self._cancel_deadline = now + self.timers.timeout

    def _on_cancel_gave_up(self) -> None:
        """§9.1: no final response 64*T1 after CANCEL: consider the INVITE cancelled."""
        if self._invite_tx is not None and self.state is CallState.CANCELLING:
            self._invite_tx.cancel_timeout()
            self._end()

    def _on_ring_timeout(self, now: float) -> None:
        if self.state not in _EARLY or self._outcome or self._local_end:
            return
        self._outcome = True
        cause = causes.CAUSE_NO_ANSWER
        self._emit(Failed(480, "No Answer", cause, causes.causestring(cause)))
        self._request_cancel(now, cause)

    def _send_bye(self, dialog: Dialog, now: float, cause: int, purpose: str = "bye") -> None:
        self._start_client(self._new_bye(dialog, cause), dialog.next_hop(self.proxy), now, purpose)

    # ------------------------------------------------------------------ session timer (RFC 4028)

    def _retry_with_longer_interval(
        self, tx: ClientTransaction, response: SipResponse, now: float
    ) -> bool:
        """422 Session Interval Too Small: the same INVITE again with the peer's Min-SE."""
        if response.status != 422 or self._local_end or self._outcome:
            return False
        if not self.timer.on_422(response):
            return False
        old = tx.request
        request = SipRequest("INVITE", old.uri, old.headers.copy(), old.body)
        request.headers.set("Via", self._via())
        request.headers.set("CSeq", f"{cseq_of(old).seq + 1} INVITE")
        for name, value in self.timer.invite_headers()[1:]:  # Session-Expires, Min-SE
            request.headers.set(name, value)
        self.state = CallState.CALLING  # CANCEL must wait for this INVITE's own 1xx
        self._send_invite(request, now)
        return True

    def _on_session_timer(self, action: TimerAction | None, now: float) -> None:
        if self.state is not CallState.CONFIRMED or self.dialog is None:
            return
        if action is TimerAction.REFRESH:
            self._send_refresh(now)
        elif action is TimerAction.EXPIRE:
            self._session_lost(now, "no session refresh in time")

    def _send_refresh(self, now: float) -> None:
        """Our refresh: UPDATE without a body when the peer allows it (no offer/answer to
        go wrong), else a re-INVITE with our SDP unchanged (same o= version)."""
        assert self.dialog is not None
        self._refreshing = True
        headers = [*self._ua(), *self.timer.refresh_headers()]
        if self._peer_allows_update:
            request = self.dialog.create_request("UPDATE", self._via(), headers=headers)
        else:
            headers += [("Allow", ALLOW), ("Content-Type", "application/sdp")]
            body = self.local_sdp.current.encode()
            request = self.dialog.create_request("INVITE", self._via(), headers=headers,
                                                 body=body)
        self._start_client(request, self.dialog.next_hop(self.proxy), now, "refresh")

    def _on_refresh_response(
        self, tx: ClientTransaction, response: SipResponse | None, now: float
    ) -> None:
        if response is not None and response.status < 200:
            return
        dialog = self.dialog
        if self.state is not CallState.CONFIRMED or dialog is None:
            return
        if response is not None and 200 <= response.status < 300:
            if tx.request.method == "INVITE":
                # §13.2.2.4: the ACK is ours to send (again, for a retransmitted 2xx).
                ack = dialog.create_ack(cseq_of(tx.request).seq, self._via())
                self._out.append((serialize(ack), dialog.next_hop(self.proxy)))
            if self._refreshing:
                self._refreshing = False
                dialog.target_refresh(response)  # type: ignore[arg-type] - reads Contact only
                self.timer.on_2xx(response, now)
            return
        self._refreshing = False
        status = 408 if response is None else response.status
        if status in (408, 481):
            # §12.2.1.2: the dialog is gone at the far end.
            self._session_lost(now, f"session refresh answered {status}")
        elif status == 491:
            # §14.1: glare; we own the Call-ID, so retry after 2.1-4 s.
            self.timer.retry_refresh(now, 2.1 + secrets.randbelow(1900) / 1000)
        elif status == 422 and response is not None and self.timer.on_422(response):
            self._send_refresh(now)
        # Anything else: the session stays as it is; no refresh by the deadline means BYE.

    def _session_lost(self, now: float, why: str) -> None:
        """RFC 4028 §10: the session expired (or the dialog is gone): BYE, cause 102."""
        assert self.dialog is not None
        log.info("call %s: session timer: %s; ending the call", self.call_id, why)
        cause = causes.CAUSE_TIMER_EXPIRY
        self._emit(RemoteHangup(cause, f"{causes.causestring(cause)}: session timer"))
        self._send_bye(self.dialog, now, cause)
        self.state = CallState.TERMINATING

    def _interval_too_small(self, request: SipRequest) -> list[tuple[str, str]] | None:
        if request.method not in ("INVITE", "UPDATE"):
            return None
        return self.timer.too_small(request)

    def _timer_answer(self, request: SipRequest, now: float) -> list[tuple[str, str]]:
        """The RFC 4028 headers of our 2xx to the peer's re-INVITE or UPDATE (a refresh);
        an UPDATE on the early dialog refreshes nothing."""
        if self.state is not CallState.CONFIRMED:
            return []
        return self.timer.on_refresh_request(request, now)

    # ------------------------------------------------------------------ requests from the peer

    def _on_response(self, response: SipResponse, now: float) -> None:
        key = client_key(response)
        entry = self._client.get(key) if key is not None else None
        if entry is not None:
            entry[0].receive(response, now)
            return
        # A 2xx retransmitted after the INVITE transaction is gone still needs its ACK.
        if 200 <= response.status < 300 and key is not None and key[1] == "INVITE":
            ack = self._acks.get(tag_of(response, "To") or "")
            if ack is not None:
                self._out.append(ack)

    def _on_request(self, request: SipRequest, addr: Addr, now: float) -> None:
        key = server_key(request)
        if key is not None and key in self._server:
            self._server[key].receive(request, now)  # a retransmission, or the non-2xx ACK
            return
        if request.method == "ACK":
            self._on_ack(request, now)
            return
        if request.method == "CANCEL":
            # We answer re-INVITEs at once, so a CANCEL never finds one still pending.
            pending = key is not None and (key[0], key[1], "INVITE") in self._server
            status = 200 if pending else 481
            self._new_server_tx(request, addr, now).respond(build_response(request, status), now)
            return
        dialog = self._dialog_for(request)
        tx = self._new_server_tx(request, addr, now)
        if dialog is None:
            tx.respond(build_response(request, 481, to_tag=new_tag()), now)
            return
        self._answer_in_dialog(dialog, request, tx, now)

    def _dialog_for(self, request: SipRequest) -> Dialog | None:
        if self.dialog is not None and self.dialog.matches(request):
            return self.dialog
        return next((d for d in self._early.values() if d.matches(request)), None)

    def _on_bye(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        # Only the caller may end an early dialog with BYE (§15): the callee must CANCEL-wait.
        if dialog is not self.dialog or self.state not in (
            CallState.CONFIRMED,
            CallState.TERMINATING,
        ):
            tx.respond(dialog.create_response(request, 481), now)
            return
        tx.respond(dialog.create_response(request, 200, headers=self._server_header()), now)
        if self.state is CallState.CONFIRMED:
            cause = causes.reason_cause(request) or causes.CAUSE_NORMAL
            self._emit(RemoteHangup(cause, causes.causestring(cause)))
        self._end()

    def _on_reinvite(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        if dialog is not self.dialog or self.state is not CallState.CONFIRMED:
            tx.respond(dialog.create_response(request, 481), now)
            return
        self._answer_reinvite(dialog, request, tx, now)

    def _on_ack(self, request: SipRequest, now: float) -> None:
        """The ACK for a 2xx we sent to a re-INVITE (a new branch, so matched by dialog)."""
        if self.dialog is not None and self.dialog.matches(request):
            self._on_reinvite_ack(request, now)

    def _on_server_timeout(self, tx: ServerTransaction, now: float) -> None:
        """No ACK for our 2xx to a re-INVITE: §13.3.1.4 says end the session."""
        if (
            self._reinvite is not None
            and tx is self._reinvite[0]
            and self.state is CallState.CONFIRMED
            and self.dialog is not None
        ):
            self._reinvite = None
            cause = causes.CAUSE_TIMER_EXPIRY
            self._emit(RemoteHangup(cause, causes.causestring(cause)))
            self._send_bye(self.dialog, now, cause)
            self.state = CallState.TERMINATING
