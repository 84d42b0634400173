"""SipAgent: routing by Call-ID, stateless answers, never raising on garbage; and the
sans-IO rule itself."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.sip.agent import SipAgent
from appliance.sip.events import Answered, Ringing, Terminated
from appliance.sip.message import SipRequest, SipResponse, serialize
from appliance.sip.transaction import TimerConfig

from .peer import ANSWER_SDP, LOCAL, OFFER, PROXY, UUI, reply, sent, sent_with_dest

PBX = ("127.0.0.1", 5080)


def agent_events(agent: SipAgent) -> list[object]:
    out = []
    while (event := agent.next_event()) is not None:
        out.append(event)
    return out


def options(to_tag: str | None = None, call_id: str = "ping-1") -> bytes:
    to = "<sip:5678@127.0.0.1:5062>" + (f";tag={to_tag}" if to_tag else "")
    return (
        "OPTIONS sip:5678@127.0.0.1:5062 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKping;rport\r\n"
        "From: <sip:pbx@127.0.0.1>;tag=p1\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 7 OPTIONS\r\n"
        "Max-Forwards: 70\r\n\r\n"
    ).encode()


def test_out_of_dialog_options_gets_200() -> None:
    agent = SipAgent(LOCAL, PROXY, user_agent="UA 1")
    agent.receive_datagram(options(), PBX, 0.0)
    ((ok, dest),) = sent_with_dest(agent)
    assert isinstance(ok, SipResponse) and ok.status == 200 and dest == PBX
    assert "INVITE" in (ok.headers.get("Allow") or "")
    assert "application/sdp" in (ok.headers.get("Accept") or "")
    assert ok.headers.get("Supported") == ""
    assert ";tag=" in (ok.headers.get("To") or "")
    assert ok.headers.get("CSeq") == "7 OPTIONS"


def test_unknown_in_dialog_request_gets_481() -> None:
    agent = SipAgent(LOCAL, PROXY)
    agent.receive_datagram(options(to_tag="gone"), PBX, 0.0)
    (refused,) = sent(agent)
    assert isinstance(refused, SipResponse) and refused.status == 481


def test_incoming_invite_is_refused_and_ack_ignored() -> None:
    agent = SipAgent(LOCAL, PROXY)
    invite = options().replace(b"OPTIONS", b"INVITE")
    agent.receive_datagram(invite, PBX, 0.0)
    (refused,) = sent(agent)
    assert isinstance(refused, SipResponse) and refused.status == 403
    agent.receive_datagram(options().replace(b"OPTIONS", b"ACK"), PBX, 0.0)
    assert sent(agent) == []


def test_garbage_is_logged_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    agent = SipAgent(LOCAL, PROXY)
    with caplog.at_level(logging.INFO, logger="appliance.sip"):
        for junk in (b"\x16\x03\x01\x02\x00", b"hello", b"\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n"):
            agent.receive_datagram(junk, PBX, 0.0)
    assert sent(agent) == []
    assert "unparsable" in caplog.text


def test_readable_bad_request_gets_400() -> None:
    agent = SipAgent(LOCAL, PROXY)
    bad = options().replace(b"CSeq: 7 OPTIONS", b"CSeq: 7 INVITE")  # method mismatch
    agent.receive_datagram(bad, PBX, 0.0)
    (refused,) = sent(agent)
    assert isinstance(refused, SipResponse) and refused.status == 400
    assert refused.reason.startswith("Bad Request")


def test_routes_by_call_id_and_forgets_terminated_calls() -> None:
    fast = TimerConfig(t1=0.01, t2=0.04, t4=0.05, d=0.3)
    agent = SipAgent(LOCAL, PROXY, user_agent="UA 1", timers=fast)
    first = agent.create_call("5678", "9333", OFFER, extra_headers=[UUI])
    second = agent.create_call("5679", "9334", OFFER)
    first.start(0.0)
    second.start(0.0)
    invite1, invite2 = sent(agent)
    assert isinstance(invite1, SipRequest) and isinstance(invite2, SipRequest)
    assert invite1.headers.get("User-Agent") == "UA 1"
    agent.receive_datagram(reply(invite2, 180), PBX, 0.1)
    agent.receive_datagram(reply(invite1, 200, sdp=ANSWER_SDP), PBX, 0.2)
    said = agent_events(agent)
    assert said == [
        Answered(ANSWER_SDP, call_id=first.call_id),
        Ringing(None, 180, call_id=second.call_id),
    ]
    sent(agent)
    first.hangup(0.3)
    (bye,) = sent(agent)
    agent.receive_datagram(reply(bye, 200), PBX, 0.31)  # type: ignore[arg-type]
    while (deadline := agent.get_timer()) is not None and deadline < 5.0:
        agent.handle_timer(deadline)
        said += agent_events(agent)
        sent(agent)
    assert Terminated(call_id=first.call_id) in said
    assert first.call_id not in agent.calls and second.call_id in agent.calls


def test_a_bug_in_a_call_costs_one_message_not_the_agent(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = SipAgent(LOCAL, PROXY)
    call = agent.create_call("5678", "9333", OFFER)
    call.start(0.0)
    (invite,) = sent(agent)

    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(call, "receive_message", boom)
    with caplog.at_level(logging.ERROR, logger="appliance.sip"):
        agent.receive_datagram(reply(invite, 180), PBX, 0.1)  # type: ignore[arg-type]
    assert "error handling a SIP message" in caplog.text


def test_stateless_responses_never_raise_on_odd_vias() -> None:
    agent = SipAgent(LOCAL, PROXY)
    odd = options().replace(b"127.0.0.1:5080;branch=z9hG4bKping;rport", b"[::1]:5080;branch=x")
    agent.receive_datagram(odd, PBX, 0.0)
    assert [m.status for m in sent(agent)] == [200]  # type: ignore[union-attr]


PURE_MODULES = [
    p for p in (Path(__file__).parents[2] / "appliance" / "sip").glob("*.py")
    if p.name != "endpoint.py"
]  # fmt: skip
FORBIDDEN = {"asyncio", "socket", "threading", "time", "selectors", "uvloop"}


# The imports are read in a fresh interpreter: CPython 3.11.7's ast.parse can fail with
# "AST constructor recursion depth mismatch" in a long test process whose recursion
# bookkeeping earlier tests (hypothesis, deep-nesting fuzzers) have disturbed.
_READ_IMPORTS = """
import ast, json, sys
out = {}
for name in sys.argv[1:]:
    imported = set()
    for node in ast.walk(ast.parse(open(name).read())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    out[name] = sorted(imported)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def module_imports() -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", _READ_IMPORTS, *map(str, PURE_MODULES)],
                          capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


@pytest.mark.parametrize("path", PURE_MODULES, ids=lambda p: p.name)
def test_sans_io_modules_import_no_io(path: Path, module_imports: dict[str, list[str]]) -> None:
    imported = set(module_imports[str(path)])
    assert not imported & FORBIDDEN, f"{path.name} imports {imported & FORBIDDEN}"


def test_serialize_is_what_the_agent_sends() -> None:
    agent = SipAgent(LOCAL, PROXY)
    agent.receive_datagram(options(), PBX, 0.0)
    ((data, _),) = agent.datagrams_to_send()
    assert data.startswith(b"SIP/2.0 200 OK\r\n") and data.endswith(b"\r\n\r\n")
    assert serialize(SipResponse(200, "OK")).endswith(b"Content-Length: 0\r\n\r\n")
