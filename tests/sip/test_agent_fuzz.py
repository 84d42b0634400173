"""The SipAgent with a live call under a stream of mutated and forged datagrams, sans-IO:
strangers with the call's real identifiers, the proxy's address with someone else's, and
garbage. No exception may escape a handler, the call must stay up, nothing may pile up.
The same over real UDP against the real appliance: tests/e2e/test_sip_strangers.py."""

from __future__ import annotations

import logging
import random

import pytest

from appliance.sip.agent import SipAgent
from appliance.sip.call import MAX_FORKS, CallState
from appliance.sip.message import SipRequest
from tests.fuzz_scale import scaled

from .mutate import garbage, mutate
from .peer import ANSWER_SDP, LOCAL, PROXY, in_dialog_request, reply, sent
from .test_sources import answered_via_proxy

STRANGERS = [(f"127.0.0.{i}", 5000 + i) for i in range(5, 12)]


def templates(invite: SipRequest) -> tuple[list[bytes], list[bytes]]:
    """(the real dialog's requests and responses, the same for a dialog that is not ours)."""
    real = [
        in_dialog_request(invite, "desk1", method, 50 + i, branch=f"z9hG4bKf{i}", sdp=sdp)
        for i, (method, sdp) in enumerate([
            ("BYE", None), ("INVITE", ANSWER_SDP), ("INFO", None), ("UPDATE", ANSWER_SDP),
            ("ACK", None), ("CANCEL", None), ("OPTIONS", None), ("INVITE", None),
        ])
    ]  # fmt: skip
    real.append(reply(invite, 200, sdp=ANSWER_SDP, to_tag="evil"))
    real.append(reply(invite, 486))
    # Not ours: the real Call-ID with a tag that is not the phone's, or another Call-ID.
    wrong_tag = [t.replace(b"desk1", b"other") for t in real]
    return real, wrong_tag + [t.replace(b"Call-ID: ", b"Call-ID: x") for t in wrong_tag]


@pytest.mark.fuzz
def test_a_live_call_survives_a_stream_of_forged_and_mutated_datagrams(
    caplog: pytest.LogCaptureFixture,
) -> None:
    count = scaled(20_000, 1_000_000)
    rng = random.Random(20261201)
    agent = SipAgent(LOCAL, PROXY)
    call, invite = answered_via_proxy(agent)
    real, other = templates(invite)
    replies = acks = 0
    most_transactions = 0
    now = 1.0
    with caplog.at_level(logging.WARNING, logger="appliance.sip"):
        for i in range(count):
            roll = rng.random()
            if roll < 0.45:  # a stranger who knows the dialog
                data, source = rng.choice(real), rng.choice(STRANGERS)
                if rng.random() < 0.7:
                    data = mutate(data, rng)
            elif roll < 0.8:  # the proxy's address, someone else's dialog (or mangled)
                data, source = rng.choice(other), (PROXY[0], 40000 + i % 7)
                if rng.random() < 0.5:
                    data = mutate(data, rng, rounds=1)
            else:
                data, source = garbage(rng), rng.choice([*STRANGERS, PROXY])
            agent.receive_datagram(data, source, now)
            now += 0.00005  # 20,000 datagrams per second
            if i % 512 == 0:
                agent.handle_timer(now)
            for out, _ in agent.datagrams_to_send():
                # An ACK answers a 2xx (from the proxy's address here) one for one, as
                # RFC 3261 wants; everything else we send must stay within the rate limits.
                acks += out.startswith(b"ACK ")
                replies += not out.startswith(b"ACK ")
            while agent.next_event() is not None:
                pass
            most_transactions = max(most_transactions, len(call._server))
    assert call.state is CallState.CONFIRMED, "a forged datagram ended the call"
    assert "Traceback" not in caplog.text and not [
        r for r in caplog.records if r.levelno >= logging.ERROR
    ], caplog.text[-2000:]
    stats = agent.stats
    print(f"{count} datagrams: {stats}, {replies} replies, {acks} ACKs, "
          f"at most {most_transactions} server transactions in the call")
    assert stats["sip_refused_source"] > count * 0.1
    assert stats["sip_parse_errors"] > 0
    # Answers are bounded by the rate limits (stateless, refusals), not by what the
    # attacker sends; a few stray-fork BYEs come on top...
    seconds = now - 1.0
    assert replies < (200 + 100 * seconds) + (20 + 5 * seconds) + 12 * MAX_FORKS, replies
    assert acks < count * 0.2, acks
    # ...and so is the state a flood can make the call keep.
    assert most_transactions <= 64, most_transactions
    assert len(call._client) <= 64, len(call._client)
    assert len(call._acks) <= MAX_FORKS + 1, len(call._acks)  # forged forks cost nothing
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) < 20, [r.getMessage() for r in warnings[:20]]
    assert list(agent.calls) == [call.call_id] and not agent.incoming
    # The real phone still gets through afterwards.
    bye = in_dialog_request(invite, "desk1", "BYE", 10_000, branch="z9hG4bKreal")
    agent.receive_datagram(bye, PROXY, now + 1)
    assert any(getattr(m, "status", 0) == 200 for m in sent(agent))
    assert call.state is not CallState.CONFIRMED
