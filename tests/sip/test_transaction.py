"""RFC 3261 §17 transactions, driven by a fake clock: no sleeping, no event loop."""

from __future__ import annotations

import itertools

from appliance.sip.message import (
    SipRequest,
    SipResponse,
    build_response,
    parse,
    top_via,
)
from appliance.sip.transaction import (
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    ResponseReceived,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    TimerConfig,
    TransactionTimeout,
    TxState,
    client_key,
    response_destination,
    server_key,
)

DEST = ("127.0.0.1", 5080)
SOURCE = ("127.0.0.1", 5090)


def request(method: str, branch: str = "z9hG4bKclient1") -> SipRequest:
    req = SipRequest(method, "sip:9333@127.0.0.1")
    h = req.headers
    h.add("Via", f"SIP/2.0/UDP 127.0.0.1:5062;rport;branch={branch}")
    h.add("Max-Forwards", "70")
    h.add("From", "<sip:5678@127.0.0.1>;tag=ours")
    h.add("To", "<sip:9333@127.0.0.1>")
    h.add("Call-ID", "cid-1")
    h.add("CSeq", f"1 {method}")
    h.add("Route", "<sip:proxy.example;lr>")
    return req


def response_to(req: SipRequest, status: int) -> SipResponse:
    return build_response(req, status, to_tag="theirs")


def run_until(tx: object, end: float) -> list[float]:
    """Fire the transaction's timers up to `end`; the times at which it sent something."""
    sends: list[float] = []
    while (deadline := tx.get_timer()) is not None and deadline <= end:  # type: ignore[attr-defined]
        tx.handle_timer(deadline)  # type: ignore[attr-defined]
        if tx.datagrams_to_send():  # type: ignore[attr-defined]
            sends.append(round(deadline, 6))
    return sends


def test_timer_a_doubles_without_cap_and_timer_b_times_out_at_64_t1() -> None:
    tx = ClientInviteTransaction(request("INVITE"), DEST, now=0.0)
    assert [addr for _, addr in tx.datagrams_to_send()] == [DEST]
    sends = run_until(tx, 40.0)
    # Retransmissions at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 (intervals 0.5, 1, 2, 4, 8, 16).
    assert sends == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert tx.state is TxState.TERMINATED
    assert isinstance(tx.next_event(), TransactionTimeout)
    assert tx.get_timer() is None


def test_timer_b_fires_at_32_seconds() -> None:
    tx = ClientInviteTransaction(request("INVITE"), DEST, now=100.0)
    run_until(tx, 131.9)
    assert tx.state is TxState.CALLING
    run_until(tx, 132.0)
    assert tx.state is TxState.TERMINATED


def test_provisional_stops_retransmission_and_timer_b() -> None:
    req = request("INVITE")
    tx = ClientInviteTransaction(req, DEST, now=0.0)
    tx.datagrams_to_send()
    tx.receive(response_to(req, 180), now=0.2)
    assert tx.state is TxState.PROCEEDING
    assert isinstance(tx.next_event(), ResponseReceived)
    assert tx.get_timer() is None  # a ringing phone may ring for minutes
    assert run_until(tx, 100.0) == []


def test_ack_for_non_2xx_is_built_by_the_transaction() -> None:
    req = request("INVITE")
    tx = ClientInviteTransaction(req, DEST, now=0.0)
    tx.datagrams_to_send()
    busy = response_to(req, 486)
    tx.receive(busy, now=0.3)
    ((data, addr),) = tx.datagrams_to_send()
    ack = parse(data)
    assert isinstance(ack, SipRequest) and ack.method == "ACK" and addr == DEST
    assert ack.uri == req.uri
    assert top_via(ack).branch == "z9hG4bKclient1"  # same transaction as the INVITE
    assert ack.headers.get("To") == busy.headers.get("To")  # with the UAS's tag
    assert ack.headers.get("CSeq") == "1 ACK"
    assert ack.headers.get_all("Route") == ["<sip:proxy.example;lr>"]
    event = tx.next_event()
    assert isinstance(event, ResponseReceived) and event.response.status == 486
    # A retransmitted 486 gets the same ACK again and is not passed up.
    tx.receive(busy, now=0.8)
    assert [d for d, _ in tx.datagrams_to_send()] == [data]
    assert tx.next_event() is None
    # Timer D (32 s on UDP) then ends it.
    assert tx.get_timer() == 32.3
    run_until(tx, 40.0)
    assert tx.state is TxState.TERMINATED


def test_2xx_moves_to_accepted_and_passes_retransmissions_up() -> None:
    req = request("INVITE")
    tx = ClientInviteTransaction(req, DEST, now=0.0)
    tx.datagrams_to_send()
    ok = response_to(req, 200)
    tx.receive(ok, now=1.0)
    assert tx.state is TxState.ACCEPTED
    assert tx.datagrams_to_send() == []  # the ACK for a 2xx is the dialog's job
    tx.receive(ok, now=1.5)
    assert [type(e) for e in (tx.next_event(), tx.next_event())] == [ResponseReceived] * 2
    run_until(tx, 1.0 + 32.0)  # Timer M
    assert tx.state is TxState.TERMINATED


def test_timer_e_doubles_capped_by_t2_and_timer_f() -> None:
    tx = ClientNonInviteTransaction(request("BYE"), DEST, now=0.0)
    tx.datagrams_to_send()
    sends = run_until(tx, 40.0)
    # Intervals 0.5, 1, 2, 4, 4, 4, ... until Timer F at 32 s.
    assert sends[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]
    assert all(b - a == 4.0 for a, b in itertools.pairwise(sends[3:]))
    assert sends[-1] == 31.5
    assert tx.state is TxState.TERMINATED
    assert isinstance(tx.next_event(), TransactionTimeout)


def test_timer_e_at_t2_once_proceeding_and_timer_k() -> None:
    req = request("BYE")
    tx = ClientNonInviteTransaction(req, DEST, now=0.0)
    tx.datagrams_to_send()
    tx.receive(response_to(req, 100), now=0.1)
    assert tx.state is TxState.PROCEEDING
    assert run_until(tx, 5.0) == [0.5, 4.5]  # the pending retransmission, then every T2
    tx.receive(response_to(req, 200), now=5.0)
    assert tx.state is TxState.COMPLETED
    tx.receive(response_to(req, 200), now=5.1)  # absorbed
    events = [tx.next_event(), tx.next_event(), tx.next_event()]
    assert [e.response.status for e in events if isinstance(e, ResponseReceived)] == [100, 200]
    assert tx.get_timer() == 10.0  # Timer K = T4
    run_until(tx, 10.0)
    assert tx.state is TxState.TERMINATED


def test_configurable_timers() -> None:
    fast = TimerConfig(t1=0.01, t2=0.04, t4=0.05, d=0.3)
    tx = ClientNonInviteTransaction(request("BYE"), DEST, now=0.0, timers=fast)
    tx.datagrams_to_send()
    assert run_until(tx, 0.1) == [0.01, 0.03, 0.07]
    run_until(tx, 1.0)
    assert tx.state is TxState.TERMINATED  # Timer F = 64 * 0.01


def test_non_invite_server_absorbs_retransmissions_with_last_response() -> None:
    req = request("BYE", branch="z9hG4bKpeer")
    tx = ServerNonInviteTransaction(req, SOURCE)
    tx.receive(req, now=0.1)  # retransmission before we answered: nothing to re-send
    assert tx.datagrams_to_send() == []
    tx.respond(build_response(req, 200), now=0.2)
    first = tx.datagrams_to_send()
    assert len(first) == 1 and first[0][1] == SOURCE  # rport: back to the source port
    tx.receive(req, now=0.7)
    assert tx.datagrams_to_send() == first
    assert tx.get_timer() == 0.2 + 32.0  # Timer J
    run_until(tx, 40.0)
    assert tx.state is TxState.TERMINATED


def test_invite_server_sends_trying_and_retransmits_on_request_retransmission() -> None:
    req = request("INVITE", branch="z9hG4bKpeer")
    tx = ServerInviteTransaction(req, SOURCE, now=0.0)
    ((trying, _),) = tx.datagrams_to_send()
    assert parse(trying).status == 100  # type: ignore[union-attr]
    tx.receive(req, now=0.3)
    assert [d for d, _ in tx.datagrams_to_send()] == [trying]
    ok = build_response(req, 200, to_tag="ours")
    tx.respond(ok, now=0.4)
    ((answer, _),) = tx.datagrams_to_send()
    tx.receive(req, now=0.5)  # the INVITE again: the 2xx again
    assert [d for d, _ in tx.datagrams_to_send()] == [answer]


def test_invite_server_retransmits_2xx_until_confirmed() -> None:
    req = request("INVITE", branch="z9hG4bKpeer")
    tx = ServerInviteTransaction(req, SOURCE, now=0.0, send_trying=False)
    tx.respond(build_response(req, 200, to_tag="ours"), now=0.0)
    tx.datagrams_to_send()
    assert run_until(tx, 4.0) == [0.5, 1.5, 3.5]
    tx.confirm(now=4.0)
    assert run_until(tx, 30.0) == []
    run_until(tx, 40.0)  # Timer L
    assert tx.state is TxState.TERMINATED and tx.next_event() is None


def test_invite_server_2xx_never_acked_times_out() -> None:
    req = request("INVITE", branch="z9hG4bKpeer")
    tx = ServerInviteTransaction(req, SOURCE, now=0.0, send_trying=False)
    tx.respond(build_response(req, 200, to_tag="ours"), now=0.0)
    run_until(tx, 40.0)
    assert isinstance(tx.next_event(), TransactionTimeout)


def test_invite_server_timer_g_h_for_non_2xx_and_ack_stops_it() -> None:
    req = request("INVITE", branch="z9hG4bKpeer")
    tx = ServerInviteTransaction(req, SOURCE, now=0.0, send_trying=False)
    tx.respond(build_response(req, 488, to_tag="ours"), now=0.0)
    tx.datagrams_to_send()
    # Timer G: 0.5, 1, 2, 4, 4, ... (capped at T2)
    assert run_until(tx, 12.0) == [0.5, 1.5, 3.5, 7.5, 11.5]
    ack = request("ACK", branch="z9hG4bKpeer")
    assert server_key(ack) == server_key(req)  # the ACK for a non-2xx matches the INVITE
    tx.receive(ack, now=12.0)
    assert tx.state is TxState.CONFIRMED
    assert run_until(tx, 17.0) == []  # Timer I = T4 absorbs ACK copies, then done
    assert tx.state is TxState.TERMINATED

    unacked = ServerInviteTransaction(req, SOURCE, now=0.0, send_trying=False)
    unacked.respond(build_response(req, 486, to_tag="ours"), now=0.0)
    run_until(unacked, 40.0)  # Timer H
    assert isinstance(unacked.next_event(), TransactionTimeout)


def test_matching_keys_and_response_destination() -> None:
    invite = request("INVITE")
    assert client_key(invite) == ("z9hG4bKclient1", "INVITE")
    assert client_key(response_to(invite, 180)) == ("z9hG4bKclient1", "INVITE")
    assert client_key(request("CANCEL")) == ("z9hG4bKclient1", "CANCEL")
    old_style = request("INVITE", branch="1234")  # RFC 2543: not matchable by branch
    assert server_key(old_style) is None
    via = top_via(invite)
    assert response_destination(via, ("10.0.0.1", 40000)) == ("10.0.0.1", 40000)
    no_rport = top_via(parse(b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h:5070;branch=z9hG4bK1"
                             b"\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\n"
                             b"CSeq: 1 OPTIONS\r\n\r\n"))  # fmt: skip
    assert response_destination(no_rport, ("10.0.0.1", 40000)) == ("10.0.0.1", 5070)
