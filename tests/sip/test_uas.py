"""IncomingCall (the UAS side, for the simulated desk phone), driven with hand-written
caller messages and a fake clock; and SipAgent handing it incoming INVITEs."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from appliance.sip.agent import SipAgent
from appliance.sip.events import (
    AckTimeout,
    Answered,
    CallCancelled,
    CallConfirmed,
    CallerHungUp,
    CallEvent,
    IncomingInvite,
    InfoDtmf,
    RemoteMediaChanged,
    Ringing,
    Terminated,
)
from appliance.sip.message import SipRequest, SipResponse, parse, serialize
from appliance.sip.sdp import audio_endpoint, build_offer
from appliance.sip.transaction import DEFAULT_TIMERS
from appliance.sip.uas import IncomingCall, IncomingState

from .peer import OFFER, UUI, sent, sent_with_dest

CALLER = ("127.0.0.1", 5062)  # the UAC's address (its Via has rport)
PHONE = ("127.0.0.1", 5080)  # our listening address
OUR_SDP = build_offer("127.0.0.1", 30000, session_id=9, username="deskphone")
T1 = DEFAULT_TIMERS.t1
CALL_ID = "uas-call-1"
FROM = '"5678" <sip:5678@127.0.0.1>;tag=caller1'
TO = "<sip:9333@127.0.0.1:5080>"


def request(
    method: str,
    *,
    cseq: int = 1,
    branch: str = "z9hG4bKinvite1",
    to_tag: str | None = None,
    sdp: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    content_type: str | None = None,
    cseq_method: str | None = None,
) -> bytes:
    """A request from the caller, as our own OutgoingCall would send it."""
    uri = "sip:9333@127.0.0.1:5080"
    message = SipRequest(method, uri)
    h = message.headers
    h.add("Via", f"SIP/2.0/UDP 127.0.0.1:5062;rport;branch={branch}")
    h.add("Max-Forwards", "70")
    h.add("From", FROM)
    h.add("To", TO + (f";tag={to_tag}" if to_tag else ""))
    h.add("Call-ID", CALL_ID)
    h.add("CSeq", f"{cseq} {cseq_method or method}")
    if method in ("INVITE", "UPDATE"):
        h.add("Contact", "<sip:5678@127.0.0.1:5062>")
    for name, value in headers:
        h.add(name, value)
    if sdp is not None:
        h.add("Content-Type", "application/sdp")
        message.body = sdp.encode()
    elif body is not None:
        if content_type:
            h.add("Content-Type", content_type)
        message.body = body
    return serialize(message)


def invite(**kwargs: object) -> bytes:
    kwargs.setdefault("sdp", OFFER)
    kwargs.setdefault("headers", [UUI])
    return request("INVITE", **kwargs)  # type: ignore[arg-type]


def incoming(data: bytes | None = None, now: float = 0.0) -> IncomingCall:
    message = parse(data or invite())
    assert isinstance(message, SipRequest)
    return IncomingCall(message, CALLER, now, local=PHONE, user_agent="Desk 1")


def events(call: IncomingCall) -> list[CallEvent]:
    out = []
    while (event := call.next_event()) is not None:
        out.append(event)
    return out


def responses(call: IncomingCall) -> list[SipResponse]:
    out = sent(call)
    assert all(isinstance(m, SipResponse) for m in out), out
    return out  # type: ignore[return-value]


def statuses(call: IncomingCall) -> list[int]:
    return [r.status for r in responses(call)]


def our_tag(response: SipResponse) -> str:
    to = response.headers.get("To") or ""
    assert ";tag=" in to
    return to.split(";tag=", 1)[1]


def run_timers(call: IncomingCall, until: float) -> list[CallEvent]:
    """Fire every timer up to `until`, dropping what is sent; the events seen."""
    seen: list[CallEvent] = []
    while (deadline := call.get_timer()) is not None and deadline <= until:
        call.handle_timer(deadline)
        call.datagrams_to_send()
        seen += events(call)
    return seen


def answered(now: float = 1.0) -> tuple[IncomingCall, str]:
    """A call rung, answered and ACKed; the datagrams and events so far drained."""
    call = incoming()
    call.ring(0.1)
    call.answer(OUR_SDP, now)
    (ok,) = responses(call)[-1:]
    tag = our_tag(ok)
    call.receive_datagram(request("ACK", branch="z9hG4bKack1", to_tag=tag), CALLER, now + 0.01)
    events(call)
    sent(call)
    return call, tag


def test_invite_ring_answer_ack_then_our_bye() -> None:
    call = incoming()
    ((trying, dest),) = sent_with_dest(call)
    assert isinstance(trying, SipResponse) and trying.status == 100 and dest == CALLER
    (event,) = events(call)
    assert isinstance(event, IncomingInvite)
    assert (event.call_id, event.caller, event.callee, event.sdp) == (
        CALL_ID,
        "5678",
        "9333",
        OFFER,
    )
    assert event.headers.get("User-to-User") == UUI[1]

    call.ring(0.1)
    (ringing,) = responses(call)
    assert ringing.status == 180 and ringing.headers.get("Contact") == "<sip:9333@127.0.0.1:5080>"
    sdp = call.answer(OUR_SDP, 2.0)
    (ok,) = responses(call)
    assert ok.status == 200 and our_tag(ok) == our_tag(ringing)
    assert ok.headers.get("Server") == "Desk 1" and "INVITE" in (ok.headers.get("Allow") or "")
    assert ok.body.decode() == sdp
    answer = audio_endpoint(ok.body.decode())
    assert (answer.port, answer.payload_types, answer.telephone_event_pt) == (30000, [0, 101], 101)
    assert call.state is IncomingState.ANSWERED

    ack = request("ACK", branch="z9hG4bKack1", to_tag=our_tag(ok))
    call.receive_datagram(ack, CALLER, 2.05)
    assert events(call) == [CallConfirmed(None, call_id=CALL_ID)]
    assert call.state is IncomingState.CONFIRMED
    assert run_timers(call, 10.0) == []  # no 2xx retransmission after the ACK

    call.hangup(10.0)
    ((bye, dest),) = sent_with_dest(call)
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    assert dest == CALLER and bye.uri == "sip:5678@127.0.0.1:5062"  # the caller's Contact
    assert bye.headers.get("From") == f"{TO};tag={our_tag(ok)}"
    assert bye.headers.get("To") == FROM and bye.headers.get("CSeq") == "1 BYE"
    assert bye.headers.get("User-Agent") == "Desk 1"
    assert call.state is IncomingState.TERMINATING
    ok_bye = SipResponse(200, "OK")
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        ok_bye.headers.add(name, bye.headers.get(name) or "")
    call.receive_datagram(serialize(ok_bye), CALLER, 10.01)
    assert call.ended
    assert run_timers(call, 100.0) == [Terminated(call_id=CALL_ID)]
    assert call.terminated


def test_cancel_before_answer_gets_200_and_487() -> None:
    call = incoming()
    call.ring(0.1)
    sent(call)
    events(call)
    cancel = request("CANCEL", headers=[("Reason", 'Q.850;cause=19;text="no answer"')])
    call.receive_datagram(cancel, CALLER, 3.0)
    answers = {r.headers.get("CSeq"): r for r in responses(call)}
    assert {cseq: r.status for cseq, r in answers.items()} == {"1 CANCEL": 200, "1 INVITE": 487}
    terminated = answers["1 INVITE"]
    assert events(call) == [CallCancelled(19, "no answer", call_id=CALL_ID)]
    assert call.answer(OUR_SDP, 3.1) is None and sent(call) == []  # too late: no-op

    # The 487 is retransmitted (Timer G) until the ACK, which has the INVITE's branch.
    call.handle_timer(3.0 + T1)
    assert statuses(call) == [487]
    call.receive_datagram(request("ACK", to_tag=our_tag(terminated)), CALLER, 3.6)
    assert run_timers(call, 100.0) == [Terminated(call_id=CALL_ID)]


def test_cancel_after_the_answer_changes_nothing() -> None:
    call = incoming()
    call.answer(OUR_SDP, 1.0)
    sent(call)
    call.receive_datagram(request("CANCEL"), CALLER, 1.1)
    assert statuses(call) == [200]  # the CANCEL's own answer, and no 487
    assert call.state is IncomingState.ANSWERED


def test_cancel_for_another_invite_gets_481() -> None:
    call = incoming()
    sent(call)
    call.receive_datagram(request("CANCEL", branch="z9hG4bKother"), CALLER, 1.0)
    assert statuses(call) == [481]


def test_bye_from_the_caller() -> None:
    call, tag = answered()
    bye = request(
        "BYE", cseq=2, branch="z9hG4bKbye1", to_tag=tag, headers=[("Reason", "Q.850;cause=16")]
    )
    call.receive_datagram(bye, CALLER, 5.0)
    (ok,) = responses(call)
    assert (ok.status, ok.headers.get("CSeq"), our_tag(ok)) == (200, "2 BYE", tag)
    assert events(call) == [CallerHungUp(16, "normal call clearing", call_id=CALL_ID)]
    assert call.ended
    # A retransmitted BYE is absorbed by its transaction: the same 200 again.
    call.receive_datagram(bye, CALLER, 5.1)
    assert statuses(call) == [200]
    assert run_timers(call, 100.0) == [Terminated(call_id=CALL_ID)]


def test_2xx_retransmitted_with_doubling_until_the_ack() -> None:
    call = incoming()
    call.answer(OUR_SDP, 0.0)
    sent(call)
    times = []
    now = 0.0
    while (deadline := call.get_timer()) is not None and deadline < 20.0:
        now = deadline
        call.handle_timer(now)
        times += [now] * len(statuses(call))
    # Timer G for 2xx: T1, 2T1, 4T1, then capped at T2 (§13.3.1.4).
    assert times[:6] == pytest.approx([0.5, 1.5, 3.5, 7.5, 11.5, 15.5])
    call.receive_datagram(request("ACK", branch="z9hG4bKack1", to_tag="x"), CALLER, now)
    assert statuses(call) == []  # wrong To tag: not our dialog, ignored
    ok_tag = our_tag(_last_ok(call))
    call.receive_datagram(request("ACK", branch="z9hG4bKack1", to_tag=ok_tag), CALLER, now)
    assert [type(e) for e in events(call)][-1] is CallConfirmed
    assert run_timers(call, 30.0) == [] and sent(call) == []


def _last_ok(call: IncomingCall) -> SipResponse:
    """The 2xx the INVITE transaction keeps re-sending."""
    call.receive_datagram(invite(), CALLER, 0.0)  # a retransmitted INVITE: same answer
    (ok,) = responses(call)
    assert ok.status == 200
    return ok


def test_no_ack_gives_up_after_64_t1_and_sends_bye() -> None:
    call = incoming()
    call.answer(OUR_SDP, 0.0)
    sent(call)
    events(call)
    seen: list[CallEvent] = []
    byes: list[SipRequest] = []
    while (deadline := call.get_timer()) is not None and deadline <= 64 * T1:
        call.handle_timer(deadline)
        byes += [m for m in sent(call) if isinstance(m, SipRequest)]
        seen += events(call)
    assert seen == [AckTimeout(call_id=CALL_ID)]
    assert [b.method for b in byes] == ["BYE"]
    assert "cause=102" in (byes[0].headers.get("Reason") or "")
    assert call.state is IncomingState.TERMINATING


def test_hangup_before_the_ack_waits_for_it() -> None:
    call = incoming()
    call.answer(OUR_SDP, 0.0)
    (_, ok) = responses(call)
    call.hangup(0.1)
    assert sent(call) == []  # §15: no BYE before the ACK
    call.receive_datagram(request("ACK", branch="z9hG4bKa", to_tag=our_tag(ok)), CALLER, 0.2)
    (bye,) = sent(call)
    assert isinstance(bye, SipRequest) and bye.method == "BYE"


def test_reject_busy_retransmits_until_ack() -> None:
    call = incoming()
    sent(call)
    events(call)
    call.reject(486, 0.5)
    (busy,) = responses(call)
    assert (busy.status, busy.reason) == (486, "Busy Here") and our_tag(busy)
    assert call.ended
    call.handle_timer(0.5 + T1)
    assert statuses(call) == [486]
    call.receive_datagram(request("ACK", to_tag=our_tag(busy)), CALLER, 1.2)
    assert run_timers(call, 100.0) == [Terminated(call_id=CALL_ID)]
    with pytest.raises(ValueError):
        incoming().reject(200, 0.0)


def test_reinvite_is_answered_with_our_sdp() -> None:
    call, tag = answered()
    hold = OFFER.replace("a=sendrecv", "a=sendonly")
    call.receive_datagram(
        request("INVITE", cseq=2, branch="z9hG4bKre1", to_tag=tag, sdp=hold), CALLER, 5.0
    )
    trying, ok = responses(call)
    assert (trying.status, ok.status) == (100, 200)
    answer = audio_endpoint(ok.body.decode())
    assert (answer.port, answer.direction) == (30000, "recvonly")
    assert ok.headers.get("Contact") == "<sip:9333@127.0.0.1:5080>"
    assert events(call) == [RemoteMediaChanged(hold, call_id=CALL_ID)]
    call.receive_datagram(request("ACK", cseq=2, branch="z9hG4bKa2", to_tag=tag), CALLER, 5.1)
    assert run_timers(call, 8.0) == [] and call.state is IncomingState.CONFIRMED


def test_reinvite_without_sdp_after_hold_gets_a_sendrecv_offer() -> None:
    # Finding 15a, the UAS half: the same rule (RFC 6337 §5.3) on the desk phone's side.
    call, tag = answered()
    hold = OFFER.replace("a=sendrecv", "a=sendonly")
    call.receive_datagram(
        request("INVITE", cseq=2, branch="z9hG4bKre1", to_tag=tag, sdp=hold), CALLER, 5.0
    )
    _, held = responses(call)
    assert audio_endpoint(held.body.decode()).direction == "recvonly"
    call.receive_datagram(request("ACK", cseq=2, branch="z9hG4bKa2", to_tag=tag), CALLER, 5.1)
    call.receive_datagram(request("INVITE", cseq=3, branch="z9hG4bKre2", to_tag=tag), CALLER, 6.0)
    _, ok = responses(call)
    assert audio_endpoint(ok.body.decode()).direction == "sendrecv"
    events(call)
    call.receive_datagram(
        request("ACK", cseq=3, branch="z9hG4bKa3", to_tag=tag, sdp=OFFER), CALLER, 6.1
    )
    assert events(call) == [RemoteMediaChanged(OFFER, call_id=CALL_ID)]


def test_options_info_and_unknown_methods_in_dialog() -> None:
    call, tag = answered()
    call.receive_datagram(request("OPTIONS", cseq=2, branch="z9hG4bKo", to_tag=tag), CALLER, 3)
    (ok,) = responses(call)
    assert ok.status == 200 and "INFO" in (ok.headers.get("Allow") or "")
    info = request(
        "INFO",
        cseq=3,
        branch="z9hG4bKi",
        to_tag=tag,
        body=b"Signal=5\r\nDuration=160\r\n",
        content_type="application/dtmf-relay",
    )
    call.receive_datagram(info, CALLER, 4)
    assert statuses(call) == [200]
    assert events(call) == [InfoDtmf("5", 160, call_id=CALL_ID)]
    call.receive_datagram(request("MESSAGE", cseq=4, branch="z9hG4bKm", to_tag=tag), CALLER, 5)
    assert statuses(call) == [405]
    call.receive_datagram(request("BYE", cseq=5, branch="z9hG4bKb", to_tag="nope"), CALLER, 6)
    assert statuses(call) == [481] and call.state is IncomingState.CONFIRMED


def test_retransmitted_invite_gets_the_last_response_again() -> None:
    call = incoming()
    call.ring(0.1)
    assert statuses(call) == [100, 180]
    call.receive_datagram(invite(), CALLER, 0.5)
    assert statuses(call) == [180]


def test_offer_with_nothing_in_common_gets_488() -> None:
    g722 = OFFER.replace("RTP/AVP 0 101", "RTP/AVP 9").replace("a=rtpmap:0 PCMU/8000", "")
    call = incoming(invite(sdp=g722))
    sent(call)
    assert call.answer(OUR_SDP, 0.5) is None
    assert statuses(call) == [488] and call.ended


def test_invite_without_offer_gets_ours_and_the_answer_comes_in_the_ack() -> None:
    call = incoming(invite(sdp=None))
    (event,) = events(call)
    assert isinstance(event, IncomingInvite) and event.sdp is None
    assert call.answer(OUR_SDP, 0.5) == OUR_SDP
    (_, ok) = responses(call)
    ack = request("ACK", branch="z9hG4bKa", to_tag=our_tag(ok), sdp=OFFER)
    call.receive_datagram(ack, CALLER, 0.6)
    assert events(call) == [CallConfirmed(OFFER, call_id=CALL_ID)]


# ----------------------------------------------------------------------- SipAgent


def test_agent_hands_incoming_invites_to_its_handler_and_routes_the_dialog() -> None:
    taken: list[IncomingCall] = []
    agent = SipAgent(PHONE, ("127.0.0.1", 9), on_incoming=taken.append)
    agent.receive_datagram(invite(), CALLER, 0.0)
    (call,) = taken
    assert agent.incoming == {CALL_ID: call} and not agent.calls
    assert [type(agent.next_event())] == [IncomingInvite]
    call.answer(OUR_SDP, 0.1)
    trying, ok = (m for m in sent(agent) if isinstance(m, SipResponse))
    assert (trying.status, ok.status) == (100, 200)
    tag = our_tag(ok)
    agent.receive_datagram(request("ACK", branch="z9hG4bKa", to_tag=tag), CALLER, 0.2)
    assert isinstance(agent.next_event(), CallConfirmed)
    agent.receive_datagram(request("BYE", cseq=2, branch="z9hG4bKb", to_tag=tag), CALLER, 1.0)
    assert [m.status for m in sent(agent)] == [200]  # type: ignore[union-attr]
    assert isinstance(agent.next_event(), CallerHungUp)
    while (deadline := agent.get_timer()) is not None:
        agent.handle_timer(deadline)
    assert agent.next_event() == Terminated(call_id=CALL_ID)
    assert not agent.incoming


def test_agent_without_handler_still_refuses_and_a_failing_handler_rejects() -> None:
    agent = SipAgent(PHONE, ("127.0.0.1", 9))
    agent.receive_datagram(invite(), CALLER, 0.0)
    assert [m.status for m in sent(agent)] == [403]  # type: ignore[union-attr]

    def broken(call: IncomingCall) -> None:
        raise RuntimeError("bug")

    agent = SipAgent(PHONE, ("127.0.0.1", 9), on_incoming=broken)
    agent.receive_datagram(invite(), CALLER, 0.0)
    assert [m.status for m in sent(agent)] == [100, 500]  # type: ignore[union-attr]


def test_our_uac_calls_our_uas_without_sockets() -> None:
    """The two halves of the stack talk to each other, datagrams carried by hand."""
    uas_calls: list[IncomingCall] = []
    phone = SipAgent(PHONE, ("127.0.0.1", 9), on_incoming=uas_calls.append)
    appliance = SipAgent(CALLER, PHONE)
    agents = {PHONE: phone, CALLER: appliance}
    call = appliance.create_call("5678", "9333", OFFER, extra_headers=[UUI])
    call.start(0.0)
    said: list[CallEvent] = []

    def shuttle(now: float) -> None:
        moved = True
        while moved:
            moved = False
            for source, agent in agents.items():
                for data, dest in agent.datagrams_to_send():
                    agents[dest].receive_datagram(data, source, now)
                    moved = True
                while (event := agent.next_event()) is not None:
                    said.append(event)

    shuttle(0.0)
    (uas,) = uas_calls
    uas.ring(0.1)
    shuttle(0.1)
    uas.answer(OUR_SDP, 2.0)
    shuttle(2.0)
    kinds = [type(e).__name__ for e in said]
    assert kinds == ["IncomingInvite", "Trying", "Ringing", "Answered", "CallConfirmed"]
    assert isinstance(said[2], Ringing) and isinstance(said[3], Answered)
    assert audio_endpoint(said[3].sdp).port == 30000
    uas.hangup(5.0)
    shuttle(5.0)
    assert [type(e).__name__ for e in said[5:]] == ["RemoteHangup"]
    for now in (40.0, 80.0):
        for agent in agents.values():
            agent.handle_timer(now)
        shuttle(now)
    assert not phone.incoming and not appliance.calls
