"""OutgoingCall, the UAC side of one call, driven by hand-written peer messages."""

from __future__ import annotations

import pytest

from appliance.sip.auth import compute_response, parse_auth_params
from appliance.sip.call import CallState, OutgoingCall
from appliance.sip.events import (
    Answered,
    Failed,
    InfoDtmf,
    RemoteHangup,
    RemoteMediaChanged,
    Ringing,
    Terminated,
    Trying,
)
from appliance.sip.message import (
    SipRequest,
    SipResponse,
    cseq_of,
    parse_name_addr,
    top_via,
)
from appliance.sip.sdp import audio_endpoint

from .peer import (
    ANSWER_SDP,
    LOCAL,
    PEER_CONTACT,
    PROXY,
    events,
    in_dialog_request,
    make_call,
    reply,
    sent,
    sent_with_dest,
)


def started(**overrides: object) -> tuple[OutgoingCall, SipRequest]:
    call = make_call(**overrides)
    call.start(0.0)
    (invite,) = sent(call)
    assert isinstance(invite, SipRequest)
    return call, invite


def answered(**overrides: object) -> tuple[OutgoingCall, SipRequest]:
    call, invite = started(**overrides)
    call.receive_datagram(reply(invite, 180), PROXY, 0.1)
    call.receive_datagram(reply(invite, 200, sdp=ANSWER_SDP), PROXY, 0.2)
    sent(call)  # the ACK
    assert isinstance(events(call)[-1], Answered)
    return call, invite


def finish(call: OutgoingCall, until: float = 200.0) -> list[object]:
    """Run every timer out; what the call said meanwhile."""
    said: list[object] = []
    while (deadline := call.get_timer()) is not None and deadline <= until:
        call.handle_timer(deadline)
        call.datagrams_to_send()
        said += events(call)
    return said


def test_invite_carries_the_appliance_headers() -> None:
    call, invite = started()
    h = invite.headers
    assert invite.uri == "sip:9333@127.0.0.1:5080"
    sender = parse_name_addr(h.get("From") or "")
    assert (sender.display_name, sender.uri) == ("5678", "sip:5678@127.0.0.1") and sender.tag
    assert h.get("To") == "<sip:9333@127.0.0.1:5080>"
    assert h.get("Call-ID") == call.call_id and len(call.call_id) >= 32
    via = top_via(invite)
    assert via.rport is True and (via.branch or "").startswith("z9hG4bK")
    assert (via.host, via.port) == LOCAL
    assert h.get("Max-Forwards") == "70"
    assert h.get("CSeq") == "1 INVITE"
    assert h.get("Contact") == "<sip:5678@127.0.0.1:5062>"
    assert h.get("User-Agent") == "WebRTC Media Server 1.0"
    assert h.get("User-to-User") == "7b22726f6f6d6b6579223a317d;encoding=hex"
    assert h.get("Content-Type") == "application/sdp"
    assert audio_endpoint(invite.body.decode()).port == 40000
    assert call.state is CallState.CALLING


def test_two_calls_never_share_identifiers() -> None:
    (_, a), (_, b) = started(), started()
    for name in ("Call-ID", "From"):
        assert a.headers.get(name) != b.headers.get(name)
    assert top_via(a).branch != top_via(b).branch


def test_caller_must_be_a_plain_user_part() -> None:
    with pytest.raises(ValueError):
        make_call(caller="56;transport=tcp")
    with pytest.raises(ValueError):
        make_call(callee="93 33")


def test_ring_answer_and_local_hangup() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 100), PROXY, 0.05)
    call.receive_datagram(reply(invite, 180), PROXY, 0.1)
    assert events(call) == [Trying(call_id=call.call_id), Ringing(None, 180, call_id=call.call_id)]
    rr = ["<sip:10.9.9.9;lr>", "<sip:127.0.0.7:5070;lr>"]  # as the proxies near the phone add them
    ok = reply(invite, 200, sdp=ANSWER_SDP, record_route=rr)
    call.receive_datagram(ok, PROXY, 0.5)
    ((ack, dest),) = sent_with_dest(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert ack.uri == PEER_CONTACT.strip("<>")  # the remote target
    assert ack.headers.get_all("Route") == list(reversed(rr))
    assert dest == ("127.0.0.7", 5070)  # the first route, not the proxy we sent INVITE to
    assert top_via(ack).branch != top_via(invite).branch  # a 2xx ACK is its own transaction
    assert cseq_of(ack).seq == 1 and parse_name_addr(ack.headers.get("To") or "").tag == "desk1"
    assert events(call) == [Answered(ANSWER_SDP, call_id=call.call_id)]
    assert call.state is CallState.CONFIRMED

    # Our ACK was lost: the phone retransmits its 200, and gets the very same ACK again.
    call.receive_datagram(ok, PROXY, 1.0)
    assert sent(call) == [ack]
    assert events(call) == []

    call.hangup(5.0)
    ((bye, dest),) = sent_with_dest(call)
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    assert bye.headers.get_all("Route") == list(reversed(rr)) and dest == ("127.0.0.7", 5070)
    assert cseq_of(bye).seq == 2
    assert "cause=16" in (bye.headers.get("Reason") or "")
    call.receive_datagram(reply(bye, 200), dest, 5.1)
    assert call.state is CallState.ENDED
    assert finish(call) == [Terminated(call_id=call.call_id)]
    assert call.terminated and call.get_timer() is None


def test_183_with_sdp_is_early_media() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 183, sdp=ANSWER_SDP), PROXY, 0.1)
    call.receive_datagram(reply(invite, 183, sdp=ANSWER_SDP), PROXY, 0.2)  # repeated: once
    assert events(call) == [Ringing(ANSWER_SDP, 183, call_id=call.call_id)]
    call.receive_datagram(reply(invite, 200, sdp=ANSWER_SDP), PROXY, 2.0)
    assert [type(e) for e in events(call)] == [Answered]


def test_busy_fails_with_cause_17_and_is_acked() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 486), PROXY, 0.3)
    (ack,) = sent(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert top_via(ack).branch == top_via(invite).branch
    assert events(call) == [Failed(486, "Busy Here", 17, "user busy", call_id=call.call_id)]
    assert finish(call) == [Terminated(call_id=call.call_id)]


@pytest.mark.parametrize(
    ("status", "cause", "text"),
    [(404, 1, "unallocated number"), (480, 18, "no user responding"),
     (603, 21, "call rejected"), (503, 41, "temporary failure")],
)  # fmt: skip
def test_failure_causes(status: int, cause: int, text: str) -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, status), PROXY, 0.3)
    (failed,) = events(call)
    assert isinstance(failed, Failed) and (failed.cause, failed.causestring) == (cause, text)


def test_reason_header_overrides_the_table() -> None:
    call, invite = started()
    reason = ("Reason", 'Q.850;cause=34;text="no circuit"')
    call.receive_datagram(reply(invite, 503, headers=[reason]), PROXY, 0.3)
    (failed,) = events(call)
    assert isinstance(failed, Failed) and failed.cause == 34


CHALLENGE = 'Digest realm="pbx.example", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", qop="auth"'


@pytest.mark.parametrize(
    ("status", "challenge_header", "answer_header"),
    [(401, "WWW-Authenticate", "Authorization"),
     (407, "Proxy-Authenticate", "Proxy-Authorization")],
)  # fmt: skip
def test_digest_challenge_is_answered_once(
    status: int, challenge_header: str, answer_header: str
) -> None:
    call, invite = started(credentials=("agent7", "s3cret"))
    challenge = [(challenge_header, CHALLENGE)]
    call.receive_datagram(reply(invite, status, headers=challenge), PROXY, 0.1)
    ack, invite2 = sent(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert isinstance(invite2, SipRequest) and invite2.method == "INVITE"
    assert events(call) == []  # transparent to the owner
    assert cseq_of(invite2).seq == 2
    assert top_via(invite2).branch != top_via(invite).branch
    for same in ("Call-ID", "From", "To", "User-to-User"):
        assert invite2.headers.get(same) == invite.headers.get(same)
    assert invite2.body == invite.body
    params = parse_auth_params((invite2.headers.get(answer_header) or "")[len("Digest ") :])
    assert params["username"] == "agent7" and params["uri"] == invite.uri
    assert params["qop"] == "auth" and params["nc"] == "00000001"
    expected = compute_response(
        algorithm="MD5", username="agent7", password="s3cret", realm="pbx.example",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", method="INVITE", uri=invite.uri,
        qop="auth", nc="00000001", cnonce=params["cnonce"],
    )  # fmt: skip
    assert params["response"] == expected

    # A second challenge means the credentials are wrong: fail, do not loop.
    call.receive_datagram(reply(invite2, status, headers=challenge), PROXY, 0.2)
    (failed,) = events(call)
    assert isinstance(failed, Failed) and failed.status == status and failed.cause == 21


def test_challenge_without_credentials_fails() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 401, headers=[("WWW-Authenticate", CHALLENGE)]), PROXY, 0.1)
    (failed,) = events(call)
    assert isinstance(failed, Failed) and failed.status == 401


def test_cancel_then_487() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 180), PROXY, 0.1)
    events(call)
    call.cancel(3.0)
    (cancel,) = sent(call)
    assert isinstance(cancel, SipRequest) and cancel.method == "CANCEL"
    assert cancel.uri == invite.uri
    assert top_via(cancel).branch == top_via(invite).branch
    assert cancel.headers.get("To") == invite.headers.get("To")  # no tag: as in the INVITE
    assert cancel.headers.get("CSeq") == "1 CANCEL"
    assert call.state is CallState.CANCELLING
    call.receive_datagram(reply(cancel, 200), PROXY, 3.1)
    call.receive_datagram(reply(invite, 487), PROXY, 3.2)
    (ack,) = sent(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert events(call) == []  # the owner asked for it: no Failed
    assert finish(call) == [Terminated(call_id=call.call_id)]


def test_cancel_waits_for_a_provisional_response() -> None:
    call, invite = started()
    call.hangup(0.1)
    assert sent(call) == []  # §9.1: no CANCEL before any 1xx
    call.receive_datagram(reply(invite, 100), PROXY, 0.2)
    (cancel,) = sent(call)
    assert isinstance(cancel, SipRequest) and cancel.method == "CANCEL"
    assert events(call) == []


def test_200_after_cancel_is_acked_then_ended_with_bye() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 180), PROXY, 0.1)
    call.cancel(1.0)
    (cancel,) = sent(call)
    # The phone was picked up just as our CANCEL flew: 200 for the INVITE, 481/200 for it.
    call.receive_datagram(reply(invite, 200, sdp=ANSWER_SDP), PROXY, 1.1)
    ack, bye = sent(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    assert parse_name_addr(bye.headers.get("To") or "").tag == "desk1"
    call.receive_datagram(reply(cancel, 200), PROXY, 1.2)
    call.receive_datagram(reply(bye, 200), PROXY, 1.3)
    assert [type(e) for e in events(call)] == [Ringing]  # never Answered
    assert finish(call) == [Terminated(call_id=call.call_id)]


def test_ring_timeout_cancels_with_cause_19() -> None:
    call, invite = started(ring_timeout=30.0)
    call.receive_datagram(reply(invite, 180), PROXY, 1.0)
    events(call)
    assert call.get_timer() == 30.0
    call.handle_timer(30.0)
    (cancel,) = sent(call)
    assert isinstance(cancel, SipRequest) and cancel.method == "CANCEL"
    assert "cause=19" in (cancel.headers.get("Reason") or "")
    assert events(call) == [Failed(480, "No Answer", 19, "no answer", call_id=call.call_id)]
    call.receive_datagram(reply(invite, 487), PROXY, 30.1)
    assert events(call) == []  # the 487 adds nothing: the owner already knows
    assert Terminated(call_id=call.call_id) in finish(call)


def test_no_response_at_all_is_timer_b() -> None:
    call, _ = started()
    said = finish(call, until=31.9)
    assert said == [] and call.state is CallState.CALLING
    said = finish(call, until=40.0)
    assert said[0] == Failed(408, "Request Timeout", 102, "recovery on timer expiry",
                             call_id=call.call_id)  # fmt: skip
    assert said[-1] == Terminated(call_id=call.call_id)


def test_bye_from_the_peer() -> None:
    call, invite = answered()
    bye = in_dialog_request(invite, "desk1", "BYE", 1, headers=[("Reason", "Q.850;cause=16")])
    call.receive_datagram(bye, ("127.0.0.1", 5090), 10.0)
    ((ok, dest),) = sent_with_dest(call)
    assert isinstance(ok, SipResponse) and ok.status == 200 and cseq_of(ok).method == "BYE"
    assert dest == ("127.0.0.1", 5090)
    assert events(call) == [RemoteHangup(16, "normal call clearing", call_id=call.call_id)]
    call.receive_datagram(bye, ("127.0.0.1", 5090), 10.5)  # retransmitted: same 200, no event
    assert sent(call) == [ok] and events(call) == []
    assert finish(call) == [Terminated(call_id=call.call_id)]


def test_reinvite_hold_is_answered_with_our_sdp() -> None:
    call, invite = answered()
    hold = ANSWER_SDP.replace("a=sendrecv", "a=sendonly").replace("o=desk 77 1", "o=desk 77 2")
    reinvite = in_dialog_request(invite, "desk1", "INVITE", 1, branch="z9hG4bKre1", sdp=hold)
    call.receive_datagram(reinvite, ("127.0.0.1", 5090), 10.0)
    trying, ok = sent(call)
    assert isinstance(trying, SipResponse) and trying.status == 100
    assert isinstance(ok, SipResponse) and ok.status == 200
    assert ok.headers.get("Contact") == "<sip:5678@127.0.0.1:5062>"
    answer = audio_endpoint(ok.body.decode())
    assert (answer.port, answer.direction, answer.address) == (40000, "recvonly", "127.0.0.1")
    assert "o=- 4242 2 " in ok.body.decode()  # the version moved on: the SDP changed
    assert events(call) == [RemoteMediaChanged(hold, call_id=call.call_id)]
    # The 2xx is retransmitted until the phone's ACK arrives.
    call.handle_timer(10.5)
    assert sent(call) == [ok]
    ack = in_dialog_request(invite, "desk1", "ACK", 1, branch="z9hG4bKack1")
    call.receive_datagram(ack, ("127.0.0.1", 5090), 10.6)
    finish(call, until=40.0)
    assert sent(call) == []
    assert call.state is CallState.CONFIRMED

    # Resume: sendrecv again.
    resume = hold.replace("a=sendonly", "a=sendrecv").replace("o=desk 77 2", "o=desk 77 3")
    reinvite = in_dialog_request(invite, "desk1", "INVITE", 2, branch="z9hG4bKre2", sdp=resume)
    call.receive_datagram(reinvite, ("127.0.0.1", 5090), 50.0)
    _, ok = sent(call)
    assert audio_endpoint(ok.body.decode()).direction == "sendrecv"  # type: ignore[union-attr]


def test_reinvite_without_sdp_gets_our_offer_and_the_answer_comes_in_the_ack() -> None:
    call, invite = answered()
    reinvite = in_dialog_request(invite, "desk1", "INVITE", 1, branch="z9hG4bKre1")
    call.receive_datagram(reinvite, ("127.0.0.1", 5090), 10.0)
    _, ok = sent(call)
    assert isinstance(ok, SipResponse) and audio_endpoint(ok.body.decode()).port == 40000
    assert events(call) == []
    ack = in_dialog_request(invite, "desk1", "ACK", 1, branch="z9hG4bKack", sdp=ANSWER_SDP)
    call.receive_datagram(ack, ("127.0.0.1", 5090), 10.1)
    assert events(call) == [RemoteMediaChanged(ANSWER_SDP, call_id=call.call_id)]


def test_resume_by_reinvite_without_sdp_after_hold_offers_sendrecv() -> None:
    """Finding 15a: a PBX holds with a sendonly re-INVITE, then resumes with a re-INVITE
    without SDP. Our offer in the 200 must say what we want (sendrecv, RFC 6337 §5.3), not
    repeat the recvonly of our hold answer, or the PBX answers sendonly and the call stays
    on hold towards the phone."""
    call, invite = answered()
    hold = ANSWER_SDP.replace("a=sendrecv", "a=sendonly").replace("o=desk 77 1", "o=desk 77 2")
    reinvite = in_dialog_request(invite, "desk1", "INVITE", 1, branch="z9hG4bKre1", sdp=hold)
    call.receive_datagram(reinvite, ("127.0.0.1", 5090), 10.0)
    _, held = sent(call)
    assert isinstance(held, SipResponse)
    assert audio_endpoint(held.body.decode()).direction == "recvonly"
    ack = in_dialog_request(invite, "desk1", "ACK", 1, branch="z9hG4bKack1")
    call.receive_datagram(ack, ("127.0.0.1", 5090), 10.1)
    events(call)

    resume = in_dialog_request(invite, "desk1", "INVITE", 2, branch="z9hG4bKre2")
    call.receive_datagram(resume, ("127.0.0.1", 5090), 20.0)
    _, ok = sent(call)
    assert isinstance(ok, SipResponse) and ok.status == 200
    offer = ok.body.decode()
    ours = audio_endpoint(offer)
    assert (ours.direction, ours.address, ours.port) == ("sendrecv", "127.0.0.1", 40000)
    assert ours.payload_types == [0, 101]
    assert "o=- 4242 3 " in offer, offer  # 1 (INVITE), 2 (hold answer), 3 (this offer)
    assert events(call) == []
    answer = ANSWER_SDP.replace("o=desk 77 1", "o=desk 77 3")
    ack = in_dialog_request(invite, "desk1", "ACK", 2, branch="z9hG4bKack2", sdp=answer)
    call.receive_datagram(ack, ("127.0.0.1", 5090), 20.1)
    (changed,) = events(call)
    assert isinstance(changed, RemoteMediaChanged)
    assert not audio_endpoint(changed.sdp).on_hold  # the bridge sends to the phone again
    # Asked again with nothing changed: the same offer, the same version.
    again = in_dialog_request(invite, "desk1", "INVITE", 3, branch="z9hG4bKre3")
    call.receive_datagram(again, ("127.0.0.1", 5090), 30.0)
    _, ok2 = sent(call)
    assert isinstance(ok2, SipResponse) and ok2.body.decode() == offer


def test_reinvite_with_nothing_in_common_gets_488() -> None:
    call, invite = answered()
    g729 = ANSWER_SDP.replace("RTP/AVP 0 101", "RTP/AVP 18").replace("a=rtpmap:0 PCMU/8000\r\n", "")
    reinvite = in_dialog_request(invite, "desk1", "INVITE", 1, branch="z9hG4bKre1", sdp=g729)
    call.receive_datagram(reinvite, ("127.0.0.1", 5090), 10.0)
    _, refused = sent(call)
    assert isinstance(refused, SipResponse) and refused.status == 488
    assert events(call) == [] and call.state is CallState.CONFIRMED


def test_update_with_sdp_is_answered() -> None:
    call, invite = answered()
    moved = ANSWER_SDP.replace("127.0.0.2", "127.0.0.3")
    update = in_dialog_request(invite, "desk1", "UPDATE", 1, sdp=moved)
    call.receive_datagram(update, ("127.0.0.1", 5090), 10.0)
    (ok,) = sent(call)
    assert isinstance(ok, SipResponse) and ok.status == 200 and ok.body
    assert events(call) == [RemoteMediaChanged(moved, call_id=call.call_id)]


def test_info_dtmf_both_ways() -> None:
    call, invite = answered()
    assert call.send_info_dtmf("5", 160, 10.0)
    (info,) = sent(call)
    assert isinstance(info, SipRequest) and info.method == "INFO"
    assert info.headers.get("Content-Type") == "application/dtmf-relay"
    assert info.body == b"Signal=5\r\nDuration=160\r\n"
    relay = in_dialog_request(
        invite, "desk1", "INFO", 1, body=b"Signal=#\r\nDuration=250\r\n",
        content_type="application/dtmf-relay",
    )  # fmt: skip
    call.receive_datagram(relay, ("127.0.0.1", 5090), 11.0)
    (ok,) = sent(call)
    assert isinstance(ok, SipResponse) and ok.status == 200
    assert events(call) == [InfoDtmf("#", 250, call_id=call.call_id)]
    with pytest.raises(ValueError):
        call.send_info_dtmf("x", 160, 12.0)


def test_info_dtmf_needs_a_confirmed_call() -> None:
    call, _ = started()
    assert call.send_info_dtmf("1", 100, 0.5) is False


def test_in_dialog_requests_we_do_not_know() -> None:
    call, invite = answered()
    refer = in_dialog_request(invite, "desk1", "REFER", 1)
    call.receive_datagram(refer, ("127.0.0.1", 5090), 10.0)
    (refused,) = sent(call)
    assert isinstance(refused, SipResponse) and refused.status == 405
    assert "INVITE" in (refused.headers.get("Allow") or "")
    stranger = in_dialog_request(invite, "not-the-desk", "BYE", 2, branch="z9hG4bKx")
    call.receive_datagram(stranger, ("127.0.0.1", 5090), 10.1)
    (refused,) = sent(call)
    assert isinstance(refused, SipResponse) and refused.status == 481
    assert call.state is CallState.CONFIRMED


def test_out_of_order_cseq_gets_500() -> None:
    call, invite = answered()
    call.receive_datagram(in_dialog_request(invite, "desk1", "OPTIONS", 5), PROXY, 10.0)
    call.receive_datagram(
        in_dialog_request(invite, "desk1", "OPTIONS", 4, branch="z9hG4bKold"), PROXY, 10.1
    )
    ok, refused = sent(call)
    assert (ok.status, refused.status) == (200, 500)  # type: ignore[union-attr]


def test_2xx_without_sdp_is_acked_and_ended() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 200), PROXY, 0.2)
    ack, bye = sent(call)
    assert (ack.method, bye.method) == ("ACK", "BYE")  # type: ignore[union-attr]
    (failed,) = events(call)
    assert isinstance(failed, Failed) and failed.cause == 127


def test_second_fork_answering_is_acked_and_ended() -> None:
    call, invite = started()
    call.receive_datagram(reply(invite, 200, sdp=ANSWER_SDP, to_tag="desk1"), PROXY, 0.2)
    call.receive_datagram(reply(invite, 200, sdp=ANSWER_SDP, to_tag="desk2"), PROXY, 0.3)
    _, ack2, bye = sent(call)
    assert parse_name_addr(ack2.headers.get("To") or "").tag == "desk2"
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    assert parse_name_addr(bye.headers.get("To") or "").tag == "desk2"
    assert [type(e) for e in events(call)] == [Answered]
    assert call.dialog is not None and call.dialog.remote_tag == "desk1"


def test_garbage_is_dropped() -> None:
    call, _ = started()
    call.receive_datagram(b"\x00\xffnot sip at all", PROXY, 0.1)
    call.receive_datagram(b"SIP/2.0 200 OK\r\n\r\n", PROXY, 0.1)
    assert sent(call) == [] and events(call) == []
