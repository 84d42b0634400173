"""SipAgent: every SIP call of one worker port, sans-IO.

Routes each datagram to its call by Call-ID, answers what belongs to no call (OPTIONS
pings from the PBX, stray in-dialog requests) statelessly, and turns garbage into a log
line (and a 400 when the request is readable enough to answer). Nothing a peer sends can
raise out of `receive_datagram()`.

An incoming INVITE gets 403 unless an `on_incoming` handler is set: then it becomes an
IncomingCall (uas.py) in `incoming`, the handler sees it before its IncomingInvite event
is drained, and its later requests are routed to it by Call-ID like an outgoing call's.
The appliance's workers set no handler; the simulated desk phone (deskphone.py) does.

Before any call sees a datagram, its source is checked (sources.py): a call's requests and
responses only from that call's peers, requests outside any call only from the proxy and the
configured allowed sources. A stranger is refused with 403 (never for ACK or a response),
those answers and the 400s to garbage are rate-limited (throttle.py), and both kinds of
hostile datagram are counted in `stats` and logged at most once per interval.

The per-call loops (datagrams, events, timers) are linear in the number of calls; a worker
carries tens to a few hundred calls, for which a scan is cheaper than keeping a heap right.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from appliance.core.throttle import Tally, TokenBucket

from .auth import Credentials
from .call import OutgoingCall
from .deadlines import due, earliest
from .dialog import ACCEPT, ALLOW, new_tag
from .events import CallEvent, Terminated
from .message import (
    SipParseError,
    SipRequest,
    SipResponse,
    build_response,
    parse,
    serialize,
    tag_of,
    top_via,
)
from .sources import SourcePolicy
from .transaction import DEFAULT_TIMERS, Addr, TimerConfig, response_destination
from .uas import IncomingCall

log = logging.getLogger("appliance.sip")

IncomingHandler = Callable[[IncomingCall], None]

# Answers to datagrams anyone can send: a stranger's request (403) and to garbage (400).
# Enough for a misconfigured PBX to see why it is refused, too few to make us a reflector.
REFUSAL_RATE, REFUSAL_BURST = 5.0, 20.0
# Stateless answers to the proxy and allowed sources (OPTIONS 200, 481, 405, 400): a PBX
# pings every few seconds; a flood claiming its address must not turn into one of ours.
STATELESS_RATE, STATELESS_BURST = 100.0, 200.0
LOG_INTERVAL = 10.0  # seconds between summary lines of refused / unparsable datagrams


class SipAgent:
    def __init__(
        self,
        local: Addr,
        proxy: Addr,
        *,
        user_agent: str = "",
        timers: TimerConfig = DEFAULT_TIMERS,
        on_incoming: IncomingHandler | None = None,
        sources: SourcePolicy | None = None,
    ) -> None:
        self.local = local
        self.proxy = proxy
        # Default: only the proxy (as given; the endpoint passes it resolved to IPs).
        self.sources = sources or SourcePolicy([proxy])
        self.user_agent = user_agent
        self.timers = timers
        self.on_incoming = on_incoming  # None: incoming INVITEs get 403
        self.calls: dict[str, OutgoingCall] = {}
        self.incoming: dict[str, IncomingCall] = {}
        self._out: list[tuple[bytes, Addr]] = []
        self._parse_errors = Tally(log, "unparsable SIP datagram(s)", LOG_INTERVAL)
        self._refused = Tally(log, "SIP datagram(s) refused (source not allowed)", LOG_INTERVAL)
        self._refusals = TokenBucket(REFUSAL_RATE, REFUSAL_BURST)
        self._stateless = TokenBucket(STATELESS_RATE, STATELESS_BURST)
        self._replies_limited = 0

    @property
    def stats(self) -> dict[str, int]:
        """Counters of hostile or broken input since start (the worker reports them)."""
        return {
            "sip_parse_errors": self._parse_errors.total,
            "sip_refused_source": self._refused.total,
            "sip_replies_limited": self._replies_limited,
        }

    def create_call(
        self,
        caller: str,
        callee: str,
        local_sdp: str,
        *,
        caller_display: str | None = None,
        callee_display: str | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
        credentials: Credentials | tuple[str, str] | None = None,
        ring_timeout: float | None = None,
        proxy: Addr | None = None,
    ) -> OutgoingCall:
        """A new call owned by this agent; `call.start(now)` sends the INVITE."""
        call = OutgoingCall(
            local=self.local,
            proxy=proxy or self.proxy,
            caller=caller,
            callee=callee,
            local_sdp=local_sdp,
            caller_display=caller_display,
            callee_display=callee_display,
            user_agent=self.user_agent,
            extra_headers=extra_headers,
            credentials=credentials,
            ring_timeout=ring_timeout,
            timers=self.timers,
        )
        self.calls[call.call_id] = call
        return call

    # ------------------------------------------------------------------ sans-IO interface

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        if not data.strip(b"\r\n"):
            return  # RFC 5626 keep-alive (CRLF ping); nothing to answer over UDP
        try:
            message = parse(data)
        except SipParseError as exc:
            self._on_garbage(exc, addr, now)
            return
        call_id = message.headers.get("Call-ID") or ""
        call = self.calls.get(call_id) or self.incoming.get(call_id)
        try:
            if not self._source_allowed(call, addr):
                self._refuse(message, addr, now, call_id, in_call=call is not None)
            elif isinstance(message, SipRequest) and call is not None and _not_ours(call, message):
                self._out_of_dialog(message, addr, now)
            elif call is not None:
                call.receive_message(message, addr, now)
            elif isinstance(message, SipRequest):
                self._out_of_dialog(message, addr, now)
            else:
                log.debug("response for no call (Call-ID %r) from %s dropped", call_id, addr)
        except Exception:
            # A bug must cost one message, not the worker and every call it carries.
            log.exception("error handling a SIP message from %s (Call-ID %r)", addr, call_id)

    def handle_timer(self, now: float) -> None:
        for tally in (self._parse_errors, self._refused):
            if due(tally.deadline(), now):
                tally.flush(now)
        for call in self._all_calls():
            if due(call.get_timer(), now):
                try:
                    call.handle_timer(now)
                except Exception:
                    log.exception("error in the timers of call %s", call.call_id)

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        for call in self._all_calls():
            out.extend(call.datagrams_to_send())
        return out

    def next_event(self) -> CallEvent | None:
        for call in self._all_calls():
            event = call.next_event()
            if event is None:
                continue
            if isinstance(event, Terminated):
                # Its last word: nothing more will come from it.
                self.calls.pop(call.call_id, None)
                self.incoming.pop(call.call_id, None)
            return event
        return None

    def get_timer(self) -> float | None:
        return earliest(
            self._parse_errors.deadline(),
            self._refused.deadline(),
            *(call.get_timer() for call in self._all_calls()),
        )

    def _all_calls(self) -> list[OutgoingCall | IncomingCall]:
        return [*self.calls.values(), *self.incoming.values()]

    # ------------------------------------------------------------------ who may talk to us

    def _source_allowed(self, call: OutgoingCall | IncomingCall | None, addr: Addr) -> bool:
        if call is None:
            return self.sources.allows_out_of_dialog(addr)
        return self.sources.allows_peer(addr, call.peer_addresses())

    def _refuse(
        self, message: SipRequest | SipResponse, addr: Addr, now: float, call_id: str,
        *, in_call: bool,
    ) -> None:
        what = message.method if isinstance(message, SipRequest) else f"{message.status} response"
        where = f"in call {call_id[:40]!r}" if in_call else "outside any call"
        self._refused.note(now, addr, f"{what} {where}")
        # A request (never an ACK) learns why; a response is dropped without a word.
        if isinstance(message, SipRequest) and message.method != "ACK":
            if self._refusals.take(now):
                self._respond(message, 403, addr, reason="Forbidden (source not allowed)")
            else:
                self._replies_limited += 1

    # ------------------------------------------------------------------ stateless answers

    def _out_of_dialog(self, request: SipRequest, addr: Addr, now: float) -> None:
        if request.method == "ACK":
            return  # never answered
        takes_call = request.method == "INVITE" and self.on_incoming is not None
        if not takes_call and not self._stateless.take(now):
            self._replies_limited += 1
            return  # a flood under the proxy's name: answered up to the rate, then dropped
        if tag_of(request, "To") is not None:
            # In-dialog, but no dialog of ours (a call long gone, or never ours).
            self._respond(request, 481, addr)
        elif request.method == "OPTIONS":
            self._respond(
                request,
                200,
                addr,
                [("Allow", ALLOW), ("Accept", ACCEPT), ("Supported", "")],
            )
        elif request.method == "CANCEL":
            self._respond(request, 481, addr)
        elif request.method == "INVITE" and self.on_incoming is not None:
            self._take_call(request, addr, now)
        elif request.method == "INVITE":
            # This appliance places calls; it does not take them.
            self._respond(request, 403, addr, reason="Incoming Calls Not Accepted")
        else:
            self._respond(request, 405, addr, [("Allow", ALLOW)])

    def _take_call(self, invite: SipRequest, addr: Addr, now: float) -> None:
        assert self.on_incoming is not None
        call = IncomingCall(
            invite, addr, now, local=self.local, user_agent=self.user_agent, timers=self.timers
        )
        self.incoming[call.call_id] = call
        try:
            self.on_incoming(call)
        except Exception:
            # The owner's bug must not leave the caller ringing forever.
            log.exception("incoming-call handler failed for call %s", call.call_id)
            call.reject(500, now)

    def _respond(
        self,
        request: SipRequest,
        status: int,
        addr: Addr,
        headers: Sequence[tuple[str, str]] = (),
        reason: str | None = None,
    ) -> None:
        extra = [*headers]
        if self.user_agent:
            extra.append(("Server", self.user_agent))
        response = build_response(request, status, reason, to_tag=new_tag(), headers=extra)
        self._send_response(request, response, addr)

    def _send_response(self, request: SipRequest, response: SipResponse, addr: Addr) -> None:
        try:
            dest = response_destination(top_via(request), addr)
            self._out.append((serialize(response), dest))
        except (SipParseError, ValueError) as exc:
            # A Via we cannot answer to: as garbage as garbage, and as easy to send in bulk.
            log.debug("cannot answer a request from %s: %s", addr, exc)

    def _on_garbage(self, exc: SipParseError, addr: Addr, now: float) -> None:
        partial = exc.partial
        self._parse_errors.note(now, addr, str(exc)[:200])
        # §21.4.1: a request we can address a response to gets 400 with the reason, if it
        # comes from a source we talk to (a stranger's garbage gets nothing), within a rate.
        if (
            isinstance(partial, SipRequest)
            and partial.method != "ACK"
            and partial.headers.get_all("Via")
            and partial.headers.get("Call-ID")
            and self._garbage_source_known(partial, addr)
        ):
            if not self._stateless.take(now):
                self._replies_limited += 1
                return
            reason = "Bad Request - " + str(exc).replace("\r", " ").replace("\n", " ")[:80]
            response = build_response(partial, 400, reason, to_tag=new_tag())
            self._send_response(partial, response, addr)

    def _garbage_source_known(self, partial: SipRequest, addr: Addr) -> bool:
        call_id = partial.headers.get("Call-ID") or ""
        return self._source_allowed(self.calls.get(call_id) or self.incoming.get(call_id), addr)


def _not_ours(call: OutgoingCall | IncomingCall, request: SipRequest) -> bool:
    """A request with the call's Call-ID that is in none of its dialogs (tags that are not
    the call's, or no To tag for an outgoing call, which never takes one). Answered
    statelessly (481, rate-limited) rather than by the call, whose transactions would keep
    each one, and retransmit a 481 to an INVITE, for 32 s."""
    return not call.has_dialog_for(request)
