"""What the UAC `OutgoingCall` and the UAS `IncomingCall` share beyond `SansIoCall`: a
dialog that carries an SDP session, the server transactions of the peer's requests in it,
and the answers to those requests, which RFC 3261 makes the same on either side.

A request inside the dialog is checked for CSeq order (§12.2.2), then answered by method:
re-INVITE (§14.2, one offer at a time), UPDATE (RFC 3311), INFO (DTMF, dtmf_info.py),
OPTIONS, BYE; anything else 405. BYE and the gate in front of a re-INVITE depend on the
call's own states, so each kind of call brings those; RFC 4028 session timers come in
through two hooks that a call without a session timer (the UAS) leaves empty.
"""

from __future__ import annotations

import logging
from abc import abstractmethod

from . import causes
from .callbase import SansIoCall
from .dialog import ACCEPT, ALLOW, Dialog
from .dtmf_info import parse_dtmf_info
from .events import InfoDtmf, RemoteMediaChanged
from .message import SipRequest, cseq_of, format_hostport, sdp_body
from .sdp import LocalSdp, SdpError
from .transaction import (
    Addr,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    ServerTransaction,
    TimerConfig,
    new_via,
    server_key,
)

log = logging.getLogger("appliance.sip")

RETRY_AFTER = (("Retry-After", "1"),)  # §14.2: the peer re-offers a moment later


class SessionCall(SansIoCall):
    local: Addr
    timers: TimerConfig
    local_sdp: LocalSdp | None  # ours; the UAS has it only once it answers
    _server: dict[tuple[str, str, str], ServerTransaction]
    # The re-INVITE we answered 2xx: (transaction, CSeq, our 2xx carried the offer)
    _reinvite: tuple[ServerInviteTransaction, int, bool] | None

    # -- what a kind of call implements --------------------------------------------------

    @abstractmethod
    def _on_bye(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None: ...

    @abstractmethod
    def _on_reinvite(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        """Refuse the re-INVITE where the call's state says so, else `_answer_reinvite`."""

    def _interval_too_small(self, request: SipRequest) -> list[tuple[str, str]] | None:
        """RFC 4028 §8.1: the headers of a 422 for a refresh below our Min-SE, else None."""
        return None

    def _timer_answer(self, request: SipRequest, now: float) -> list[tuple[str, str]]:
        """RFC 4028: the session timer headers of our 2xx to a re-INVITE or UPDATE."""
        return []

    # -- headers and transactions ------------------------------------------------------------

    def _via(self) -> str:
        return new_via(format_hostport(*self.local))

    def _server_header(self) -> list[tuple[str, str]]:
        """The Server header of our responses, when we have a product name to give."""
        return [("Server", self.user_agent)] if self.user_agent else []

    def _new_bye(self, dialog: Dialog, cause: int) -> SipRequest:
        """Our BYE in `dialog`, with the Q.850 cause that ends the call (RFC 3326 Reason)."""
        headers = [*self._ua(), ("Reason", causes.reason_header(cause))]
        return dialog.create_request("BYE", self._via(), headers=headers)

    def _add_server(self, request: SipRequest, tx: ServerTransaction) -> None:
        # A peer without RFC 3261 branches still gets a transaction, just not a matchable one.
        key = server_key(request) or ("", f"rfc2543-{id(tx)}", request.method)
        self._server[key] = tx

    def _new_server_tx(self, request: SipRequest, addr: Addr, now: float) -> ServerTransaction:
        tx: ServerTransaction
        if request.method == "INVITE":
            tx = ServerInviteTransaction(request, addr, now, self.timers)
        else:
            tx = ServerNonInviteTransaction(request, addr, self.timers)
        self._add_server(request, tx)
        return tx

    def _answer(self, offer: str) -> str | None:
        """Our SDP answer to the peer's offer; None when there is nothing in common, or when
        we have no SDP yet (an offer then would cross the INVITE's own offer/answer)."""
        if self.local_sdp is None:
            return None
        try:
            return self.local_sdp.answer(offer)
        except SdpError as exc:
            log.info("call %s: refusing an SDP offer: %s", self.call_id, exc)
            return None

    # -- requests from the peer, inside the dialog -------------------------------------------

    def _answer_in_dialog(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        if not dialog.accept_remote_cseq(request):
            tx.respond(dialog.create_response(request, 500, "CSeq Out of Order"), now)
            return
        too_small = self._interval_too_small(request)
        if too_small is not None:
            tx.respond(dialog.create_response(request, 422, headers=too_small), now)
            return
        handler = {
            "BYE": self._on_bye,
            "INVITE": self._on_reinvite,
            "UPDATE": self._on_update,
            "INFO": self._on_info,
            "OPTIONS": self._on_options,
        }.get(request.method)
        if handler is None:
            tx.respond(dialog.create_response(request, 405, headers=[("Allow", ALLOW)]), now)
            return
        handler(dialog, request, tx, now)

    def _answer_reinvite(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        """A re-INVITE the call's state allows: with an offer, our answer in the 200; without
        one, our offer (sendrecv: sdp.py) in the 200 and the peer's answer in the ACK."""
        pending = self._reinvite
        if pending is not None and not pending[0].acked and not pending[0].terminated:
            # §14.2: one offer at a time; the peer retries after Retry-After.
            tx.respond(dialog.create_response(request, 500, headers=RETRY_AFTER), now)
            return
        assert isinstance(tx, ServerInviteTransaction)
        assert self.local_sdp is not None  # the call's gate lets no re-INVITE in before
        dialog.target_refresh(request)
        offer = sdp_body(request)
        if offer is None:
            body = self.local_sdp.offer()
            self._reinvite = (tx, cseq_of(request).seq, True)
        else:
            answer = self._answer(offer)
            if answer is None:
                tx.respond(dialog.create_response(request, 488), now)
                return
            body = answer
            self._reinvite = (tx, cseq_of(request).seq, False)
        headers = [("Allow", ALLOW), *self._server_header(), ("Content-Type", "application/sdp")]
        headers += self._timer_answer(request, now)
        tx.respond(
            dialog.create_response(request, 200, headers=headers, body=body.encode()), now
        )
        if offer is not None:
            self._emit(RemoteMediaChanged(offer))

    def _on_reinvite_ack(self, ack: SipRequest, now: float) -> None:
        """The ACK (in the dialog) for our 2xx to a re-INVITE: it has a new branch, so the
        transaction cannot match it; its CSeq says which re-INVITE it acknowledges."""
        pending = self._reinvite
        if pending is None or cseq_of(ack).seq != pending[1]:
            return
        tx, _, offer_in_2xx = pending
        tx.confirm(now)
        self._reinvite = None
        if offer_in_2xx and (answer := sdp_body(ack)) is not None:
            self._emit(RemoteMediaChanged(answer))

    def _on_update(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        dialog.target_refresh(request)
        offer = sdp_body(request)
        if offer is None:
            headers = [*self._server_header(), *self._timer_answer(request, now)]
            tx.respond(dialog.create_response(request, 200, headers=headers), now)
            return
        answer = self._answer(offer)
        if answer is None:
            tx.respond(dialog.create_response(request, 488), now)
            return
        headers = [*self._server_header(), ("Content-Type", "application/sdp")]
        headers += self._timer_answer(request, now)
        tx.respond(dialog.create_response(request, 200, headers=headers, body=answer.encode()), now)
        self._emit(RemoteMediaChanged(offer))

    def _on_info(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        tx.respond(dialog.create_response(request, 200, headers=self._server_header()), now)
        dtmf = parse_dtmf_info(request)
        if dtmf is not None:
            self._emit(InfoDtmf(*dtmf))

    def _on_options(
        self, dialog: Dialog, request: SipRequest, tx: ServerTransaction, now: float
    ) -> None:
        headers = [("Allow", ALLOW), ("Accept", ACCEPT), *self._server_header()]
        tx.respond(dialog.create_response(request, 200, headers=headers), now)
