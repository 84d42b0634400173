import pytest

from appliance.core import protocol as p
from workers.call_state import (
    CallMachine,
    Event,
    IllegalTransition,
    Release,
    State,
    reachable_causes,
)


def machine_in(state: State) -> CallMachine:
    machine = CallMachine()
    path = {
        State.VERIFYING: [],
        State.ANSWERING: [Event.VERIFY_OK],
        State.AWAITING_DTLS: [Event.VERIFY_OK, Event.ANSWER_SENT],
        State.CONNECTED: [Event.VERIFY_OK, Event.ANSWER_SENT, Event.DTLS_CONNECTED],
    }[state]
    for event in path:
        machine.handle(event)
    assert machine.state is state
    return machine


def test_happy_path_has_no_release() -> None:
    machine = CallMachine()
    for event in (Event.VERIFY_OK, Event.ANSWER_SENT, Event.DTLS_CONNECTED):
        transition = machine.handle(event)
        assert transition is not None and transition.release is None
    assert machine.state is State.CONNECTED and machine.live


@pytest.mark.parametrize(
    ("state", "event", "cause", "causestring"),
    [
        (State.VERIFYING, Event.VERIFY_REJECTED, 21, "verify error"),
        (State.VERIFYING, Event.APS_DOWN, 41, "verify error: AP-S unavailable"),
        (State.AWAITING_DTLS, Event.DTLS_TIMEOUT, 16, "Connect Timeout"),
        (State.CONNECTED, Event.LIFETIME_EXPIRED, 16, "lifetime expired"),
        (State.CONNECTED, Event.MEDIA_FAILED, 41, "media connection lost"),
        (State.CONNECTED, Event.SHUTDOWN, 41, "appliance shutting down"),
    ],
)
def test_release_causes(state: State, event: Event, cause: int, causestring: str) -> None:
    transition = machine_in(state).handle(event)
    assert transition is not None and transition.release is not None
    assert (transition.release.cause, transition.release.causestring) == (cause, causestring)
    assert transition.release.tell_client


@pytest.mark.parametrize("state", [State.VERIFYING, State.AWAITING_DTLS, State.CONNECTED])
def test_client_release_and_closed_socket_are_not_echoed(state: State) -> None:
    for event in (Event.CLIENT_RELEASE, Event.CONNECTION_CLOSED):
        transition = machine_in(state).handle(event)
        assert transition is not None and transition.release is not None
        assert not transition.release.tell_client


def test_events_after_release_are_ignored() -> None:
    machine = machine_in(State.AWAITING_DTLS)
    machine.handle(Event.CLIENT_RELEASE)
    assert machine.handle(Event.DTLS_TIMEOUT) is None
    assert not machine.live


def test_detail_is_appended_to_the_causestring() -> None:
    transition = machine_in(State.ANSWERING).handle(Event.SDP_REFUSED, "no common codec")
    assert transition is not None and transition.release is not None
    assert transition.release.causestring == "offer SDP refused: no common codec"


def test_illegal_transition_is_named() -> None:
    with pytest.raises(IllegalTransition, match="DTLS_CONNECTED in state VERIFYING"):
        CallMachine().handle(Event.DTLS_CONNECTED)


def test_every_cause_string_fits_the_protocol_limit() -> None:
    for cause, text in reachable_causes():
        assert 0 < cause < 128
        assert len(text.encode()) <= p.MAX_VALUE_BYTES


def machine_answered() -> CallMachine:
    machine = machine_in(State.CONNECTED)
    for event in (Event.INVITE_SENT, Event.SIP_RINGING, Event.SIP_ANSWERED):
        machine.handle(event)
    assert machine.state is State.ANSWERED
    return machine


def test_sip_leg_path_and_bye_from_the_phone() -> None:
    transition = machine_answered().handle(Event.SIP_BYE)
    assert transition is not None and transition.release is not None
    assert (transition.release.cause, transition.release.causestring) == (16, "normal release")


def test_sip_failure_carries_its_own_cause() -> None:
    machine = machine_in(State.CONNECTED)
    machine.handle(Event.INVITE_SENT)
    busy = Release(17, "user busy")
    transition = machine.handle(Event.SIP_FAILED, release=busy)
    assert transition is not None and transition.release == busy
    other = machine_in(State.CONNECTED)
    other.handle(Event.INVITE_SENT)
    with pytest.raises(IllegalTransition):
        other.handle(Event.SIP_FAILED)


def test_lifetime_and_media_failure_apply_while_ringing_and_talking() -> None:
    for event in (Event.LIFETIME_EXPIRED, Event.MEDIA_FAILED):
        transition = machine_answered().handle(event)
        assert transition is not None and transition.release is not None


def test_answered_call_ended_by_a_session_timer_tells_the_browser_why() -> None:
    expired = Release(102, "recovery on timer expiry: session timer")
    transition = machine_answered().handle(Event.SIP_FAILED, release=expired)
    assert transition is not None and transition.release == expired
