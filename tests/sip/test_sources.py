"""Finding 5 and 14b, sans-IO: SIP only from a call's peers, a stranger refused and counted,
replies to strangers and to garbage rate-limited, parse errors counted and summarized."""

from __future__ import annotations

import logging

import pytest

from appliance.core.throttle import Tally, TokenBucket
from appliance.sip.agent import REFUSAL_BURST, STATELESS_BURST, SipAgent
from appliance.sip.call import CallState, OutgoingCall
from appliance.sip.events import (
    Answered,
    CallConfirmed,
    IncomingInvite,
    RemoteHangup,
    RemoteMediaChanged,
)
from appliance.sip.message import SipRequest, SipResponse, cseq_of, serialize
from appliance.sip.sdp import build_offer
from appliance.sip.sources import SourcePolicy, dialog_peers, normal_ip, parse_networks
from appliance.sip.uas import IncomingCall

from .peer import ANSWER_SDP, LOCAL, OFFER, PROXY, in_dialog_request, reply, sent

STRANGER = ("127.0.0.9", 5090)
ROUTE_HOST = ("127.0.0.3", 5070)  # the PBX's Record-Route
PHONE = ("127.0.0.4", 5090)  # the desk phone's Contact
HOLD = ANSWER_SDP.replace("a=sendrecv", "a=sendonly").replace("127.0.0.2", "127.0.0.9")


def drain(agent: SipAgent) -> list[object]:
    out = []
    while (event := agent.next_event()) is not None:
        out.append(event)
    return out


def answered_via_proxy(
    agent: SipAgent, record_route: tuple[str, ...] = (f"<sip:{ROUTE_HOST[0]}:5070;lr>",)
) -> tuple[OutgoingCall, SipRequest]:
    """A call answered by a 200 that came through the proxy with a Record-Route."""
    call = agent.create_call("5678", "9333", OFFER)
    call.start(0.0)
    (invite,) = sent(agent)
    assert isinstance(invite, SipRequest)
    contact = f"<sip:9333@{PHONE[0]}:{PHONE[1]}>"
    ok = reply(invite, 200, sdp=ANSWER_SDP, contact=contact, record_route=record_route)
    agent.receive_datagram(ok, PROXY, 0.1)
    sent(agent)  # the ACK
    assert [type(e) for e in drain(agent)] == [Answered]
    return call, invite


def statuses(agent: SipAgent) -> list[int]:
    return [m.status for m in sent(agent) if isinstance(m, SipResponse)]


# ------------------------------------------------------------------ the policy itself


def test_policy_compares_ips_and_ports_only_when_strict() -> None:
    loose = SourcePolicy([("10.0.0.1", 5060)], ["192.0.2.0/24", "2001:db8::7"])
    assert loose.allows_out_of_dialog(("10.0.0.1", 40000))  # the PBX from another port
    assert loose.allows_out_of_dialog(("::ffff:10.0.0.1", 5060))  # dual-stack spelling
    assert loose.allows_out_of_dialog(("192.0.2.200", 1)) and loose.allows_out_of_dialog(
        ("2001:db8::7", 5060)
    )
    assert not loose.allows_out_of_dialog(("10.0.0.2", 5060))
    peers = frozenset({("10.0.0.9", 5070)})
    assert loose.allows_peer(("10.0.0.9", 1234), peers)
    strict = SourcePolicy([("10.0.0.1", 5060)], strict_port=True)
    assert strict.allows_peer(("10.0.0.9", 5070), peers)
    assert not strict.allows_peer(("10.0.0.9", 1234), peers)
    assert not strict.allows_out_of_dialog(("10.0.0.1", 5061))


def test_bad_allowed_source_is_named() -> None:
    with pytest.raises(ValueError, match=r"pbx\.example"):
        parse_networks(["10.0.0.0/8", "pbx.example"])


def test_dialog_peers_are_the_ip_literal_hosts_it_sends_to() -> None:
    peers = dialog_peers(
        ["<sip:10.0.0.5;lr>", "<sip:proxy.example:5070;lr>", "garbage<"], "sip:9333@[::1]:5099"
    )
    assert peers == {("10.0.0.5", 5060), ("::1", 5099)}
    assert normal_ip("[::ffff:127.0.0.1]") == "127.0.0.1"


def test_token_bucket_and_tally(caplog: pytest.LogCaptureFixture) -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    tally = Tally(logging.getLogger("test.tally"), "odd things", interval=10.0)
    with caplog.at_level(logging.INFO, logger="test.tally"):
        for i in range(1000):
            tally.note(i * 0.001, ("192.0.2.1" if i % 3 else "192.0.2.2", 9), f"#{i}")
        assert len(caplog.records) == 1  # the first at once, the rest counted
        assert tally.deadline() == 10.0
        tally.flush(10.0)
    assert tally.total == 1000 and tally.deadline() is None
    summary = caplog.records[-1].getMessage()
    assert "999 more odd things" in summary and "most from 192.0.2.1 (666)" in summary
    assert "#999" in summary and "1000 since start" in summary


# ------------------------------------------------------------------ in-dialog: the call's peers


def test_bye_from_a_stranger_is_refused_and_from_the_route_host_accepted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = SipAgent(LOCAL, PROXY)
    call, invite = answered_via_proxy(agent)
    bye = in_dialog_request(invite, "desk1", "BYE", 5)
    with caplog.at_level(logging.INFO, logger="appliance.sip"):
        agent.receive_datagram(bye, STRANGER, 1.0)
    assert statuses(agent) == [403]
    assert drain(agent) == [] and call.state is CallState.CONFIRMED
    assert agent.stats["sip_refused_source"] == 1
    assert "BYE in call" in caplog.text and "127.0.0.9:5090" in caplog.text
    # The same BYE from the PBX's Record-Route host (from any port) ends the call.
    agent.receive_datagram(bye, (ROUTE_HOST[0], 40001), 1.1)
    assert statuses(agent) == [200]
    assert [type(e) for e in drain(agent)] == [RemoteHangup]


def test_reinvite_from_a_stranger_cannot_move_the_voice() -> None:
    agent = SipAgent(LOCAL, PROXY)
    _, invite = answered_via_proxy(agent)
    hijack = in_dialog_request(invite, "desk1", "INVITE", 5, branch="z9hG4bKevil", sdp=HOLD)
    agent.receive_datagram(hijack, STRANGER, 1.0)
    assert statuses(agent) == [403]
    assert drain(agent) == []  # no RemoteMediaChanged: the bridge keeps its phone address
    # The phone's own Contact host is a peer too (a phone that sends without the proxy).
    agent.receive_datagram(hijack, PHONE, 1.1)
    assert 200 in statuses(agent)
    assert [type(e) for e in drain(agent)] == [RemoteMediaChanged]
    # An ACK from a stranger is dropped without a word, but counted.
    ack = in_dialog_request(invite, "desk1", "ACK", 5, branch="z9hG4bKack")
    agent.receive_datagram(ack, STRANGER, 1.2)
    assert sent(agent) == [] and agent.stats["sip_refused_source"] == 2


def test_without_record_route_the_proxy_and_contact_are_the_peers() -> None:
    agent = SipAgent(LOCAL, PROXY)
    _, invite = answered_via_proxy(agent, record_route=())
    info = in_dialog_request(invite, "desk1", "INFO", 5, branch="z9hG4bKi1")
    agent.receive_datagram(info, ROUTE_HOST, 1.0)  # not a host of this dialog
    assert statuses(agent) == [403]
    agent.receive_datagram(info, (PROXY[0], 6000), 1.1)
    assert statuses(agent) == [200]


def test_strict_port_refuses_the_right_ip_from_another_port() -> None:
    agent = SipAgent(LOCAL, PROXY, sources=SourcePolicy([PROXY], strict_port=True))
    _, invite = answered_via_proxy(agent)
    bye = in_dialog_request(invite, "desk1", "BYE", 5)
    agent.receive_datagram(bye, (ROUTE_HOST[0], 40001), 1.0)
    assert statuses(agent) == [403]
    agent.receive_datagram(bye, ROUTE_HOST, 1.1)
    assert statuses(agent) == [200]


def test_a_strangers_response_to_our_invite_is_ignored() -> None:
    agent = SipAgent(LOCAL, PROXY)
    call = agent.create_call("5678", "9333", OFFER)
    call.start(0.0)
    (invite,) = sent(agent)
    assert isinstance(invite, SipRequest)
    fake = reply(invite, 200, to_tag="evil", sdp=HOLD)
    agent.receive_datagram(fake, STRANGER, 0.1)
    assert sent(agent) == [] and drain(agent) == []  # not ACKed, not answered
    assert call.state is CallState.CALLING and agent.stats["sip_refused_source"] == 1
    agent.receive_datagram(reply(invite, 200, sdp=ANSWER_SDP), PROXY, 0.2)
    assert [type(e) for e in drain(agent)] == [Answered]


def test_incoming_calls_take_in_dialog_requests_only_from_the_caller() -> None:
    taken: list[IncomingCall] = []
    agent = SipAgent(("127.0.0.1", 5080), ("127.0.0.1", 5080), on_incoming=taken.append)
    caller = agent.create_call("5678", "9333", OFFER)  # our own UAC makes the INVITE
    caller.start(0.0)
    (invite,) = sent(agent)
    assert isinstance(invite, SipRequest)
    agent.calls.clear()  # ...but this agent is the callee
    agent.receive_datagram(serialize(invite), ("127.0.0.1", 5062), 0.0)
    (call,) = taken
    assert isinstance(drain(agent)[0], IncomingInvite)
    sent(agent)
    call.answer(build_offer("127.0.0.1", 30000), 0.1)
    (ok,) = sent(agent)
    assert isinstance(ok, SipResponse) and ok.status == 200
    ack = _in_dialog_from_caller(invite, ok, "ACK", 1)
    agent.receive_datagram(ack, ("127.0.0.1", 5062), 0.2)
    assert [type(e) for e in drain(agent)] == [CallConfirmed]
    agent.receive_datagram(_in_dialog_from_caller(invite, ok, "BYE", 2), STRANGER, 0.3)
    assert statuses(agent) == [403] and not call.ended


def _in_dialog_from_caller(invite: SipRequest, ok: SipResponse, method: str, seq: int) -> bytes:
    request = SipRequest(method, "sip:9333@127.0.0.1:5080")
    for name in ("Via", "From", "Call-ID"):
        request.headers.add(name, invite.headers.get(name) or "")
    request.headers.set("Via", f"SIP/2.0/UDP 127.0.0.1:5062;rport;branch=z9hG4bK{method}{seq}")
    request.headers.add("To", ok.headers.get("To") or "")
    request.headers.add("CSeq", f"{seq if method != 'ACK' else cseq_of(invite).seq} {method}")
    request.headers.add("Max-Forwards", "70")
    return serialize(request)


# ------------------------------------------------------------------ outside any call


def test_out_of_dialog_requests_only_from_the_proxy_and_allowed_networks() -> None:
    agent = SipAgent(LOCAL, PROXY, sources=SourcePolicy([PROXY], ["127.0.0.64/26"]))
    ping = _options()
    agent.receive_datagram(ping, STRANGER, 0.0)
    assert statuses(agent) == [403]
    agent.receive_datagram(ping, ("127.0.0.70", 5060), 0.0)
    assert statuses(agent) == [200]
    agent.receive_datagram(ping, PROXY, 0.0)
    assert statuses(agent) == [200]
    assert agent.stats["sip_refused_source"] == 1


def test_refusals_and_stateless_answers_are_rate_limited() -> None:
    agent = SipAgent(LOCAL, PROXY)
    for i in range(1000):
        agent.receive_datagram(_options(f"flood-{i}"), STRANGER, 0.0)
    assert len(sent(agent)) == REFUSAL_BURST
    assert agent.stats["sip_refused_source"] == 1000
    assert agent.stats["sip_replies_limited"] == 1000 - REFUSAL_BURST
    for i in range(1000):  # the same flood claiming the proxy's address
        agent.receive_datagram(_options(f"ping-{i}"), PROXY, 1.0)
    assert len(sent(agent)) == STATELESS_BURST
    # A second later the budget is back, a little.
    agent.receive_datagram(_options("later"), STRANGER, 2.0)
    assert statuses(agent) == [403]


# ------------------------------------------------------------------ 14b: garbage


def test_garbage_is_counted_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = SipAgent(LOCAL, PROXY)
    bad_request = _options().replace(b"CSeq: 7 OPTIONS", b"CSeq: 7 INVITE")
    with caplog.at_level(logging.INFO, logger="appliance.sip"):
        for i in range(20_000):
            agent.receive_datagram(b"\x16\x03\x01 junk %d" % i, STRANGER, i * 0.0001)
        agent.receive_datagram(bad_request, STRANGER, 2.0)  # readable, but a stranger's
        assert sent(agent) == []
        agent.receive_datagram(bad_request, PROXY, 2.0)
        assert statuses(agent) == [400]  # the proxy learns what was wrong
        lines = [r for r in caplog.records if "unparsable" in r.getMessage()]
        assert len(lines) == 1
        deadline = agent.get_timer()
        assert deadline is not None and deadline <= 10.0
        agent.handle_timer(deadline)
    assert agent.stats["sip_parse_errors"] == 20_002
    lines = [r.getMessage() for r in caplog.records if "unparsable" in r.getMessage()]
    assert len(lines) == 2 and "20001 more unparsable" in lines[1], lines
    assert agent.get_timer() is None  # nothing pending: no timer keeps the loop busy


def _options(call_id: str = "ping-1") -> bytes:
    return (
        "OPTIONS sip:5678@127.0.0.1:5062 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKping;rport\r\n"
        "From: <sip:pbx@127.0.0.1>;tag=p1\r\n"
        "To: <sip:5678@127.0.0.1:5062>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 7 OPTIONS\r\n"
        "Max-Forwards: 70\r\n\r\n"
    ).encode()


def test_config_keys_are_validated() -> None:
    from appliance.core.config import ConfigError, from_dict

    config = from_dict({"sip": {"allowed_sources": ["10.1.2.0/24", "2001:db8::5"],
                                "strict_source_port": True}})
    assert config.sip.allowed_sources == ["10.1.2.0/24", "2001:db8::5"]
    assert from_dict({}).sip.allowed_sources == [] and not from_dict({}).sip.strict_source_port
    with pytest.raises(ConfigError, match=r"sip\.allowed_sources: .*pbx\.example"):
        from_dict({"sip": {"allowed_sources": ["pbx.example"]}})
