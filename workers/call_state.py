"""The call's state machine, as one explicit table (sans-IO: no sockets, no clock).

The worker feeds it events and performs what the returned `Transition` says. Every
`release` the appliance sends comes from a row of this table, so each cause is reachable
from a named state and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from appliance.core import protocol as p


class State(Enum):
    VERIFYING = auto()  # offer accepted, asking AP-S
    ANSWERING = auto()  # alert sent, building the WebRTC answer
    AWAITING_DTLS = auto()  # answer + ice sent, waiting for ICE and DTLS
    CONNECTED = auto()  # DTLSconnect sent
    INVITING = auto()  # INVITE sent to the PBX
    RINGING = auto()  # 180/183 received (ringback tone or early media)
    ANSWERED = auto()  # 200 OK + ACK: two-way audio
    RELEASED = auto()


class Event(Enum):
    VERIFY_OK = auto()
    VERIFY_REJECTED = auto()
    APS_DOWN = auto()
    ANSWER_SENT = auto()
    SDP_REFUSED = auto()
    DTLS_CONNECTED = auto()
    DTLS_TIMEOUT = auto()
    MEDIA_FAILED = auto()  # ICE or DTLS failed (the detail says why, e.g. consent lost)
    MEDIA_CLOSED = auto()  # the browser closed DTLS (close_notify): it hung up its side
    MEDIA_PORT_DOWN = auto()  # the worker's media port is configured but could not open
    NO_TCP = auto()  # the offer asks for RTP over TCP; this appliance has no TCP port
    LIFETIME_EXPIRED = auto()
    INVITE_SENT = auto()
    SIP_RINGING = auto()
    SIP_ANSWERED = auto()
    SIP_FAILED = auto()  # a final failure; the cause comes with the event (RFC 3398)
    SIP_BYE = auto()
    SIP_SETUP_FAILED = auto()  # no RTP port, no route to the PBX
    ROOM_REFUSED = auto()  # an Agent leg for a room that is gone or already has an agent
    PEER_GONE = auto()  # the room ended this leg (the customer's call is over)
    CLIENT_RELEASE = auto()
    CONNECTION_CLOSED = auto()
    SHUTDOWN = auto()


@dataclass(frozen=True)
class Release:
    cause: int
    causestring: str
    tell_client: bool = True  # False when the client itself ended the call or is gone


@dataclass(frozen=True)
class Transition:
    state: State
    release: Release | None = None


class IllegalTransition(Exception):
    pass


_TO_CLIENT_GONE = Release(p.CAUSE_NORMAL, "normal release", tell_client=False)
# Q.850 63 "service or option not available": the offer's `protocol: "TCP"` is valid, but
# not configured here (media.tcp_port 0); a client may offer again over UDP.
CAUSE_SERVICE_NOT_AVAILABLE = 63
_SHUTDOWN = Release(p.CAUSE_TEMPORARY_FAILURE, "appliance shutting down")
# Placeholder: the release is the one passed with the event (SIP status -> Q.850 cause).
FROM_EVENT = Release(0, "")
_SIP_PENDING = (State.INVITING, State.RINGING)
_MEDIA_UP = (State.CONNECTED, State.INVITING, State.RINGING, State.ANSWERED)
_ANY_LIVE = (State.VERIFYING, State.ANSWERING, State.AWAITING_DTLS, *_MEDIA_UP)

_TABLE: dict[tuple[State, Event], Transition] = {
    (State.VERIFYING, Event.VERIFY_OK): Transition(State.ANSWERING),
    (State.VERIFYING, Event.VERIFY_REJECTED): Transition(
        State.RELEASED, Release(p.CAUSE_CALL_REJECTED, "verify error")
    ),
    (State.VERIFYING, Event.APS_DOWN): Transition(
        State.RELEASED, Release(p.CAUSE_TEMPORARY_FAILURE, "verify error: AP-S unavailable")
    ),
    (State.ANSWERING, Event.ANSWER_SENT): Transition(State.AWAITING_DTLS),
    (State.ANSWERING, Event.MEDIA_PORT_DOWN): Transition(
        State.RELEASED, Release(p.CAUSE_TEMPORARY_FAILURE, "media port unavailable")
    ),
    (State.ANSWERING, Event.NO_TCP): Transition(
        State.RELEASED, Release(CAUSE_SERVICE_NOT_AVAILABLE, "RTP over TCP not available")
    ),
    (State.ANSWERING, Event.SDP_REFUSED): Transition(
        State.RELEASED, Release(p.CAUSE_INVALID_IE_CONTENTS, "offer SDP refused")
    ),
    (State.AWAITING_DTLS, Event.DTLS_CONNECTED): Transition(State.CONNECTED),
    (State.AWAITING_DTLS, Event.DTLS_TIMEOUT): Transition(
        State.RELEASED, Release(p.CAUSE_NORMAL, "Connect Timeout")
    ),
    (State.AWAITING_DTLS, Event.MEDIA_FAILED): Transition(
        State.RELEASED, Release(p.CAUSE_NORMAL, "Connect Timeout")
    ),
    (State.CONNECTED, Event.INVITE_SENT): Transition(State.INVITING),
    (State.CONNECTED, Event.SIP_SETUP_FAILED): Transition(
        State.RELEASED, Release(p.CAUSE_TEMPORARY_FAILURE, "SIP leg could not start")
    ),
    (State.ANSWERED, Event.SIP_BYE): Transition(
        State.RELEASED, Release(p.CAUSE_NORMAL, "normal release")
    ),
    # The phone's side ended an answered call for a reason (a session timer that expired,
    # a BYE with a Reason cause other than 16): the browser is told that cause.
    (State.ANSWERED, Event.SIP_FAILED): Transition(State.RELEASED, FROM_EVENT),
}
for _state in _SIP_PENDING:
    _TABLE[(_state, Event.SIP_RINGING)] = Transition(State.RINGING)
    _TABLE[(_state, Event.SIP_ANSWERED)] = Transition(State.ANSWERED)
    _TABLE[(_state, Event.SIP_FAILED)] = Transition(State.RELEASED, FROM_EVENT)
for _state in _MEDIA_UP:
    _TABLE[(_state, Event.MEDIA_FAILED)] = Transition(
        State.RELEASED, Release(p.CAUSE_TEMPORARY_FAILURE, "media connection lost")
    )
    _TABLE[(_state, Event.LIFETIME_EXPIRED)] = Transition(
        State.RELEASED, Release(p.CAUSE_NORMAL, "lifetime expired")
    )
_TABLE[(State.VERIFYING, Event.ROOM_REFUSED)] = Transition(State.RELEASED, FROM_EVENT)
for _state in _ANY_LIVE:
    _TABLE[(_state, Event.PEER_GONE)] = Transition(State.RELEASED, FROM_EVENT)
    _TABLE[(_state, Event.CLIENT_RELEASE)] = Transition(State.RELEASED, _TO_CLIENT_GONE)
    _TABLE[(_state, Event.CONNECTION_CLOSED)] = Transition(State.RELEASED, _TO_CLIENT_GONE)
    # Only the browser can close DTLS (the alert is authenticated): a hang-up, whichever
    # of its DTLS close and its `release` frame reaches us first.
    _TABLE[(_state, Event.MEDIA_CLOSED)] = Transition(State.RELEASED, _TO_CLIENT_GONE)
    _TABLE[(_state, Event.SHUTDOWN)] = Transition(State.RELEASED, _SHUTDOWN)

# Late events that race a release (a timer firing as the client hangs up) are harmless.
_IGNORED_WHEN_RELEASED = frozenset(Event)


class CallMachine:
    def __init__(self) -> None:
        self.state = State.VERIFYING

    @property
    def live(self) -> bool:
        return self.state is not State.RELEASED

    def handle(
        self, event: Event, detail: str = "", release: Release | None = None
    ) -> Transition | None:
        """Apply `event`; None means it arrived after the call ended and changes nothing.

        `release` carries the cause of events whose cause comes from outside (SIP_FAILED).
        """
        if self.state is State.RELEASED and event in _IGNORED_WHEN_RELEASED:
            return None
        try:
            transition = _TABLE[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"{event.name} in state {self.state.name}") from None
        if transition.release is FROM_EVENT:
            if release is None:
                raise IllegalTransition(f"{event.name} needs the release it causes")
            transition = Transition(transition.state, release)
        self.state = transition.state
        if detail and transition.release is not None and transition.release.tell_client:
            rel = transition.release
            text = f"{rel.causestring}: {detail}"[: p.MAX_VALUE_BYTES]
            transition = Transition(transition.state, Release(rel.cause, text, rel.tell_client))
        return transition


def reachable_causes() -> set[tuple[int, str]]:
    """Every (cause, causestring) a call can end with; used by tests and docs."""
    return {
        (t.release.cause, t.release.causestring)
        for t in _TABLE.values()
        if t.release is not None and t.release.tell_client and t.release is not FROM_EVENT
    }
