"""RFC 4028 session timers on our calls, and BYE for a dialog another process left behind
(a dead worker's), both driven by a fake clock: no sleeping, no event loop."""

from __future__ import annotations

import msgspec

from appliance.sip.auth import Credentials
from appliance.sip.call import CallState, OutgoingCall
from appliance.sip.events import Answered, DialogUpdated, RemoteHangup
from appliance.sip.message import (
    SipRequest,
    SipResponse,
    cseq_of,
    parse,
    parse_name_addr,
    serialize,
)
from appliance.sip.orphan import DialogClosed, OrphanedDialog
from appliance.sip.session_timer import SessionTimer, TimerAction, TimerSettings
from appliance.sip.snapshot import DialogSnapshot, take
from appliance.sip.transaction import TimerConfig

from .peer import (
    ANSWER_SDP,
    PEER_CONTACT,
    PROXY,
    events,
    in_dialog_request,
    make_call,
    reply,
    sent,
    sent_with_dest,
)

TIMER = TimerSettings(expires=1800, min_se=90)


def answered(
    se: str | None, *, settings: TimerSettings = TIMER, allow: str | None = None,
    record_route: tuple[str, ...] = (),
) -> tuple[OutgoingCall, SipRequest]:
    """A call whose INVITE the PBX answered with `Session-Expires: se` (None: without)."""
    call = make_call()
    call.use_session_timer(settings)
    call.start(0.0)
    (invite,) = sent(call)
    assert isinstance(invite, SipRequest)
    headers = [] if se is None else [("Session-Expires", se), ("Require", "timer")]
    if allow is not None:
        headers.append(("Allow", allow))
    ok = reply(invite, 200, sdp=ANSWER_SDP, headers=headers, record_route=record_route)
    call.receive_datagram(ok, PROXY, 0.0)
    (ack,) = sent(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert isinstance(events(call)[-1], Answered)
    return call, invite


def run(call: OutgoingCall, until: float) -> list[tuple[float, SipRequest | SipResponse]]:
    """Fire the call's timers up to `until`; what it sent and when."""
    out: list[tuple[float, SipRequest | SipResponse]] = []
    while (deadline := call.get_timer()) is not None and deadline <= until:
        call.handle_timer(deadline)
        out += [(deadline, message) for message in sent(call)]
    return out


def requests(out: list[tuple[float, SipRequest | SipResponse]], method: str) -> list[float]:
    return [round(at, 3) for at, m in out if isinstance(m, SipRequest) and m.method == method]


# -- the INVITE and what the 2xx says ---------------------------------------------------------


def test_invite_offers_timers_and_leaves_the_refresher_to_the_answerer() -> None:
    call = make_call()
    call.use_session_timer(TIMER)
    call.start(0.0)
    (invite,) = sent(call)
    h = invite.headers
    assert h.get("Supported") == "timer"
    assert h.get("Session-Expires") == "1800"  # no refresher parameter: the PBX chooses
    assert h.get("Min-SE") == "90"


def test_session_expires_0_means_no_timer_headers_at_all() -> None:
    call = make_call()
    call.use_session_timer(TimerSettings(expires=0))
    call.start(0.0)
    (invite,) = sent(call)
    assert "Session-Expires" not in invite.headers and "Min-SE" not in invite.headers


def test_a_pbx_without_timers_means_no_refresh_and_no_expiry() -> None:
    call, _ = answered(None)
    out = run(call, 100_000.0)
    assert requests(out, "INVITE") == [] and requests(out, "BYE") == []
    assert call.state is CallState.CONFIRMED and not call.timer.active


def test_we_refresh_with_a_reinvite_at_half_the_interval() -> None:
    call, invite = answered("90;refresher=uac")
    out = run(call, 44.9)
    assert requests(out, "INVITE") == []
    out = run(call, 45.0)
    ((at, refresh),) = out
    assert at == 45.0 and isinstance(refresh, SipRequest) and refresh.method == "INVITE"
    assert refresh.headers.get("Session-Expires") == "90;refresher=uac"
    assert refresh.headers.get("Supported") == "timer"
    assert cseq_of(refresh).seq == cseq_of(invite).seq + 1
    assert refresh.uri == PEER_CONTACT.strip("<>")
    # RFC 4028 §7.4: the same session description, o= version unchanged.
    assert refresh.body == invite.body
    ok = reply(refresh, 200, sdp=ANSWER_SDP, headers=[("Session-Expires", "90;refresher=uac")])
    call.receive_datagram(ok, PROXY, 45.1)
    (ack,) = sent(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"
    assert cseq_of(ack).seq == cseq_of(refresh).seq
    # A retransmitted 2xx of the refresh is ACKed again.
    call.receive_datagram(ok, PROXY, 45.6)
    assert [m.method for m in sent(call) if isinstance(m, SipRequest)] == ["ACK"]
    # The interval restarted at the refresh's 2xx: the next one 45 s later.
    out = run(call, 100.0)
    assert requests(out, "INVITE")[0] == 90.1
    assert requests(out, "BYE") == []


def test_update_is_the_refresh_when_the_peer_allows_it() -> None:
    call, _ = answered("120;refresher=uac", allow="INVITE, ACK, BYE, UPDATE")
    out = run(call, 60.0)
    ((at, refresh),) = out
    assert isinstance(refresh, SipRequest) and refresh.method == "UPDATE" and at == 60.0
    assert refresh.body == b"" and refresh.headers.get("Session-Expires") == "120;refresher=uac"


def test_the_peer_refreshes_and_goes_silent_we_bye_with_cause_102() -> None:
    call, _ = answered("90;refresher=uas")
    out = run(call, 59.9)
    assert out == []
    out = run(call, 60.0)  # 90 - min(32, 90/3)
    ((at, bye),) = [(at, m) for at, m in out if isinstance(m, SipRequest)]
    assert at == 60.0 and bye.method == "BYE"
    assert "cause=102" in (bye.headers.get("Reason") or "")
    (hangup,) = events(call)
    assert isinstance(hangup, RemoteHangup) and hangup.cause == 102
    assert "session timer" in hangup.causestring
    assert call.state is CallState.TERMINATING


def test_a_refresh_from_the_peer_restarts_the_interval_and_gets_timer_headers() -> None:
    call, invite = answered("90;refresher=uas")
    to_tag = "desk1"
    reinvite = in_dialog_request(invite, to_tag, "INVITE", 2, sdp=ANSWER_SDP,
                                 headers=[("Session-Expires", "90;refresher=uac"),
                                          ("Supported", "timer")])
    call.receive_datagram(reinvite, PROXY, 50.0)
    (ok,) = [m for m in sent(call) if isinstance(m, SipResponse) and m.status == 200]
    assert isinstance(ok, SipResponse) and ok.status == 200
    assert ok.headers.get("Session-Expires") == "90;refresher=uac"
    assert ok.headers.get("Require") == "timer"
    call.receive_datagram(in_dialog_request(invite, to_tag, "ACK", 2, branch="z9hG4bKack"),
                          PROXY, 50.1)
    out = run(call, 109.9)
    assert requests(out, "BYE") == []
    out = run(call, 110.0)
    assert requests(out, "BYE") == [110.0]


def test_a_refresh_below_our_min_se_gets_422() -> None:
    call, invite = answered("90;refresher=uas")
    update = in_dialog_request(invite, "desk1", "UPDATE", 2,
                               headers=[("Session-Expires", "30")])
    call.receive_datagram(update, PROXY, 10.0)
    (refused,) = sent(call)
    assert isinstance(refused, SipResponse) and refused.status == 422
    assert refused.headers.get("Min-SE") == "90"


def test_422_retries_the_invite_with_the_min_se_it_asks() -> None:
    call = make_call()
    call.use_session_timer(TimerSettings(expires=90))
    call.start(0.0)
    (invite,) = sent(call)
    call.receive_datagram(reply(invite, 422, headers=[("Min-SE", "300")]), PROXY, 0.1)
    ack, retry = sent(call)
    assert isinstance(ack, SipRequest) and ack.method == "ACK"  # the 422's own ACK
    assert isinstance(retry, SipRequest) and retry.method == "INVITE"
    assert cseq_of(retry).seq == 2
    assert retry.headers.get("Session-Expires") == "300"
    assert retry.headers.get("Min-SE") == "300"
    assert retry.headers.get("Call-ID") == invite.headers.get("Call-ID")
    assert events(call) == []  # no Failed: the call goes on
    ok = reply(retry, 200, sdp=ANSWER_SDP, headers=[("Session-Expires", "300;refresher=uac")])
    call.receive_datagram(ok, PROXY, 0.2)
    sent(call)
    assert isinstance(events(call)[-1], Answered)
    assert requests(run(call, 150.2), "INVITE") == [150.2]


def test_a_422_asking_for_less_is_a_failure() -> None:
    call = make_call()
    call.use_session_timer(TIMER)
    call.start(0.0)
    (invite,) = sent(call)
    call.receive_datagram(reply(invite, 422, headers=[("Min-SE", "60")]), PROXY, 0.1)
    sent(call)
    (failed,) = events(call)
    assert type(failed).__name__ == "Failed"


def test_a_pbx_asking_for_one_second_is_held_to_our_floor() -> None:
    call, _ = answered("1;refresher=uac")
    assert requests(run(call, 44.9), "INVITE") == []
    assert requests(run(call, 45.0), "INVITE") == [45.0]


def test_a_refresh_answered_481_ends_the_call() -> None:
    call, _ = answered("90;refresher=uac")
    ((_, refresh),) = run(call, 45.0)
    assert isinstance(refresh, SipRequest)
    call.receive_datagram(reply(refresh, 481), PROXY, 45.1)
    methods = [m.method for m in sent(call) if isinstance(m, SipRequest)]
    assert "BYE" in methods
    (hangup,) = events(call)
    assert isinstance(hangup, RemoteHangup) and hangup.cause == 102


def test_refresh_glare_491_is_retried_within_4_seconds() -> None:
    call, _ = answered("90;refresher=uac")
    ((_, refresh),) = run(call, 45.0)
    assert isinstance(refresh, SipRequest)
    call.receive_datagram(reply(refresh, 491), PROXY, 45.1)
    sent(call)
    out = [(at, m) for at, m in run(call, 50.0) if at > 45.1]
    retries = {cseq_of(m).seq: at for at, m in reversed(out) if isinstance(m, SipRequest)
               and m.method == "INVITE"}
    assert len(retries) == 1 and cseq_of(refresh).seq not in retries
    assert 47.2 <= next(iter(retries.values())) <= 49.1


def test_the_timer_object_alone() -> None:
    timer = SessionTimer(TimerSettings(expires=1800, min_se=90))
    assert timer.get_timer() is None
    ok = SipResponse(200, "OK")
    ok.headers.add("Session-Expires", "1800;refresher=uas")
    timer.on_2xx(ok, 100.0)
    assert timer.active and not timer.we_refresh
    assert timer.get_timer() == 100.0 + 1800 - 32
    assert timer.handle_timer(1867.0) is None
    assert timer.handle_timer(1868.0) is TimerAction.EXPIRE
    assert not timer.active and timer.get_timer() is None


# -- the dialog as data, and the BYE another process sends from it ----------------------------


def snapshot_of_answered_call() -> tuple[OutgoingCall, DialogSnapshot]:
    rr = ("<sip:127.0.0.7:5070;lr>", "<sip:127.0.0.8;lr>")
    call = make_call()
    call.reports_dialog = True
    call.start(0.0)
    (invite,) = sent(call)
    assert isinstance(invite, SipRequest)
    call.receive_datagram(reply(invite, 200, sdp=ANSWER_SDP, record_route=rr), PROXY, 0.1)
    sent(call)
    said = events(call)
    updates = [e for e in said if isinstance(e, DialogUpdated)]
    assert len(updates) == 1 and updates[0].snapshot is not None
    return call, updates[0].snapshot


def test_the_call_reports_its_dialog_and_every_change_of_cseq() -> None:
    call, snap = snapshot_of_answered_call()
    assert snap.call_id == call.call_id and snap.local_seq == 1
    assert parse_name_addr(snap.local).tag and parse_name_addr(snap.remote).tag == "desk1"
    assert snap.remote_target == PEER_CONTACT.strip("<>")
    assert snap.route_set == ["<sip:127.0.0.8;lr>", "<sip:127.0.0.7:5070;lr>"]
    assert snap.next_hop == ("127.0.0.8", 5060)
    call.send_info_dtmf("5", 160, 1.0)
    (info,) = sent(call)
    ((update,),) = [[e for e in events(call) if isinstance(e, DialogUpdated)]]
    assert update.snapshot is not None and update.snapshot.local_seq == cseq_of(info).seq
    assert isinstance(info, SipRequest)
    call.receive_datagram(reply(info, 200), PROXY, 1.1)
    assert events(call) == []  # nothing changed
    call.hangup(2.0)
    (bye,) = sent(call)
    assert isinstance(bye, SipRequest)
    assert [type(e) for e in events(call)] == [DialogUpdated]  # its CSeq, until answered
    call.receive_datagram(reply(bye, 200), PROXY, 2.1)
    assert [e.snapshot for e in events(call) if isinstance(e, DialogUpdated)] == [None]


def test_a_snapshot_survives_the_bus_encoding() -> None:
    _, snap = snapshot_of_answered_call()
    data = msgspec.msgpack.encode(snap)
    assert msgspec.msgpack.decode(data, type=DialogSnapshot) == snap


FAST = TimerConfig(t1=0.5, t2=4.0, t4=5.0)


def orphan(snap: DialogSnapshot, **kwargs: object) -> OrphanedDialog:
    dialog = OrphanedDialog(snap, local=("127.0.0.1", 5062), user_agent="UA", timers=FAST,
                            **kwargs)  # type: ignore[arg-type]
    dialog.start(0.0)
    return dialog


def test_an_orphaned_dialog_gets_an_rfc3261_bye() -> None:
    call, snap = snapshot_of_answered_call()
    closer = orphan(snap)
    ((bye, dest),) = sent_with_dest(closer)
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    assert dest == ("127.0.0.8", 5060)  # the first route
    assert bye.uri == snap.remote_target
    assert bye.headers.get_all("Route") == snap.route_set
    assert bye.headers.get("Call-ID") == call.call_id
    assert bye.headers.get("From") == snap.local and bye.headers.get("To") == snap.remote
    assert cseq_of(bye).seq == snap.local_seq + 1
    assert "cause=41" in (bye.headers.get("Reason") or "")
    # Unanswered, it is retransmitted (Timer E: 0.5, 1, 2, 4, 4 ...).
    times = []
    while (deadline := closer.get_timer()) is not None and deadline < 8.0:
        closer.handle_timer(deadline)
        if sent(closer):
            times.append(deadline)
    assert times == [0.5, 1.5, 3.5, 7.5]
    closer.receive_datagram(reply(bye, 200), ("127.0.0.8", 5060), 7.6)
    (closed,) = events(closer)
    assert isinstance(closed, DialogClosed) and closed.status == 200
    closer.handle_timer(7.6 + 5.0)  # Timer K
    assert [type(e).__name__ for e in events(closer)] == ["Terminated"]
    assert closer.terminated


def test_an_orphaned_dialogs_bye_has_the_sent_by_the_call_had() -> None:
    _, snap = snapshot_of_answered_call()
    for local, sent_by in ((("127.0.0.1", 5062), "127.0.0.1:5062"),
                           (("::1", 5062), "[::1]:5062")):  # RFC 3261 §25.1: a reference
        closer = OrphanedDialog(snap, local=local, user_agent="UA", timers=FAST)
        closer.start(0.0)
        ((bye, _),) = sent_with_dest(closer)
        assert (bye.headers.get("Via") or "").split(";")[0] == f"SIP/2.0/UDP {sent_by}"


def test_an_orphaned_dialog_nobody_answers_ends_as_408() -> None:
    _, snap = snapshot_of_answered_call()
    closer = orphan(snap)
    sent(closer)
    while (deadline := closer.get_timer()) is not None:
        closer.handle_timer(deadline)
        sent(closer)
    assert deadline is None
    kinds = events(closer)
    assert isinstance(kinds[0], DialogClosed) and kinds[0].status == 408
    assert closer.terminated


def test_an_orphaned_dialog_answers_a_challenge_and_a_cseq_refusal() -> None:
    _, snap = snapshot_of_answered_call()
    closer = orphan(snap, credentials=Credentials("agent", "secret"))
    (bye,) = sent(closer)
    assert isinstance(bye, SipRequest)
    challenge = reply(bye, 401, headers=[
        ("WWW-Authenticate", 'Digest realm="pbx", nonce="abc", qop="auth"')])
    closer.receive_datagram(challenge, PROXY, 0.1)
    (authed,) = sent(closer)
    assert isinstance(authed, SipRequest) and authed.headers.get("Authorization")
    assert cseq_of(authed).seq == cseq_of(bye).seq + 1
    closer.receive_datagram(reply(authed, 500), PROXY, 0.2)
    (higher,) = sent(closer)
    assert isinstance(higher, SipRequest) and cseq_of(higher).seq > cseq_of(authed).seq + 50
    closer.receive_datagram(reply(higher, 200), PROXY, 0.3)
    assert [e.status for e in events(closer) if isinstance(e, DialogClosed)] == [200]


def test_the_phones_own_bye_crossing_ours_gets_200() -> None:
    call, snap = snapshot_of_answered_call()
    closer = orphan(snap)
    sent(closer)
    request = SipRequest("BYE", "sip:5678@127.0.0.1:5062")
    h = request.headers
    h.add("Via", "SIP/2.0/UDP 127.0.0.1:5090;rport;branch=z9hG4bKphone")
    h.add("From", snap.remote)
    h.add("To", snap.local)
    h.add("Call-ID", snap.call_id)
    h.add("CSeq", "7 BYE")
    closer.receive_datagram(serialize(request), ("127.0.0.1", 5090), 0.1)
    (ok,) = sent(closer)
    assert isinstance(ok, SipResponse) and ok.status == 200
    assert parse(serialize(ok)).headers.get("Call-ID") == call.call_id


def test_take_is_what_the_call_reports() -> None:
    call, snap = snapshot_of_answered_call()
    assert call.dialog is not None
    assert take(call.dialog, PROXY) == snap
