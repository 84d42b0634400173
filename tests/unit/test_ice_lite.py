"""The ICE-lite agent (appliance/ice/lite.py): every answer it gives a connectivity check,
how it demultiplexes a worker's port by session and path, the route it follows as the
browser nominates and moves, consent freshness with `now` passed in, its bounds, hostile
input, and at the end aioice's own full agent completing its checks against a LiteAgent
over a real loopback UDP socket (run those in the loopback-only namespace:
tests/in-loopback-netns.sh .venv/bin/python -m pytest tests/unit/test_ice_lite.py).

The browser's checks are built with aioice's STUN code (the reference implementation), and
our answers are read back with it, so both ends of every exchange are checked by code that
is not ours."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import aioice.ice
import pytest
from aioice import Candidate, Connection
from aioice import stun as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.ice import stun
from appliance.ice.lite import (
    CONSENT_TIMEOUT,
    ConsentLost,
    Credentials,
    LiteAgent,
    LiteError,
    Nominated,
    Path,
    PathValidated,
    Received,
    SelectedPathChanged,
    new_credentials,
    tcp_path,
    udp_path,
)
from bench.system import loopback_only
from tests.fuzz_scale import scaled

OURS = Credentials("ourUfragABCD1234", "ourPasswordIsLongEnough0123456789")
THEIRS = Credentials("brws", "browserPasswordLongEnough")
A = udp_path("192.0.2.10", 50000)
B = udp_path("198.51.100.7", 61000)  # the same browser after a network change
C = udp_path("203.0.113.5", 4000)
DTLS = bytes([22, 0xFE, 0xFD]) + bytes(20)
RTP = bytes([0x80, 0x6F]) + bytes(20)


def check(*, ours: Credentials = OURS, theirs: Credentials = THEIRS, key: bytes | None = None,
          nominate: bool = False, controlling: bool = True, controlled: bool = False,
          username: str | None = None, priority: int | None = 0x6E0001FF) -> bytes:
    """A browser's connectivity check, built by aioice."""
    m = ref.Message(ref.Method.BINDING, ref.Class.REQUEST)
    m.attributes["USERNAME"] = username if username is not None else (
        f"{ours.ufrag}:{theirs.ufrag}")
    if priority is not None:
        m.attributes["PRIORITY"] = priority
    if controlling:
        m.attributes["ICE-CONTROLLING"] = 0x1122334455667788
    if controlled:
        m.attributes["ICE-CONTROLLED"] = 0x1122334455667788
    if nominate:
        m.attributes["USE-CANDIDATE"] = None
    m.add_message_integrity(key if key is not None else ours.pwd.encode())
    return bytes(m)


def answer(out: Received) -> ref.Message:
    """Our reply, as aioice reads it (its parser checks FINGERPRINT)."""
    assert out.reply is not None
    return ref.parse_message(out.reply)


def assert_success(out: Received, request: bytes, path: Path,
                   creds: Credentials = OURS) -> None:
    m = answer(out)
    assert m.message_class == ref.Class.RESPONSE
    assert m.transaction_id == ref.parse_message(request).transaction_id
    assert m.attributes["XOR-MAPPED-ADDRESS"] == (path[1], path[2])
    assert m.check_message_integrity(creds.pwd.encode())
    assert list(m.attributes) == ["XOR-MAPPED-ADDRESS", "MESSAGE-INTEGRITY", "FINGERPRINT"]


def assert_error(out: Received, code: int, *, signed_with: Credentials | None) -> ref.Message:
    m = answer(out)
    assert m.message_class == ref.Class.ERROR
    assert m.error_code == code
    assert "FINGERPRINT" in m.attributes
    if signed_with is None:
        assert "MESSAGE-INTEGRITY" not in m.attributes
    else:
        assert m.check_message_integrity(signed_with.pwd.encode())
    return m


@pytest.fixture
def agent() -> LiteAgent:
    a = LiteAgent()
    a.register(OURS, THEIRS)
    return a


# -- credentials and sessions ---------------------------------------------------------------


def test_new_credentials_are_random_ice_chars_of_the_sizes_asked() -> None:
    made = [new_credentials() for _ in range(200)]
    assert len({c.ufrag for c in made}) == len({c.pwd for c in made}) == 200
    for c in made:
        assert len(c.ufrag) == 16 and len(c.pwd) == 32  # ~95 and ~190 bits
        assert c.ufrag.isalnum() and c.pwd.isascii() and c.pwd.isalnum()
        aioice.ice.validate_username(c.ufrag)  # the reference's RFC grammar
        aioice.ice.validate_password(c.pwd)
    assert made[0].pwd not in repr(made[0])  # a session logged is not its password


@pytest.mark.parametrize("remote", [
    Credentials("abc", "browserPasswordLongEnough"),  # ufrag under 4
    Credentials("ab:c", "browserPasswordLongEnough"),  # ':' is no ice-char
    Credentials("abcd", "short"),
    Credentials("abcd", "browserPasswordLongEnough\n"),
    Credentials("a" * 257, "browserPasswordLongEnough"),
    Credentials("abcd", "é" * 30),
])
def test_malformed_offer_credentials_are_refused(remote: Credentials) -> None:
    agent = LiteAgent()
    with pytest.raises(LiteError):
        agent.register(new_credentials(), remote)
    ufrag = agent.register(new_credentials())
    with pytest.raises(LiteError):
        agent.set_remote(ufrag, remote)


def test_sessions_are_bounded_and_unique() -> None:
    agent = LiteAgent(max_sessions=2)
    agent.register(OURS)
    with pytest.raises(LiteError, match="exists"):
        agent.register(OURS)
    agent.register(new_credentials())
    with pytest.raises(LiteError, match="already 2"):
        agent.register(new_credentials())
    with pytest.raises(LiteError):
        agent.register(Credentials("x", "y"))
    agent.remove(OURS.ufrag)
    agent.remove(OURS.ufrag)  # idempotent
    assert len(agent) == 1 and OURS.ufrag not in agent
    agent.register(OURS)
    assert OURS.ufrag in agent


def test_bad_agent_limits_are_refused() -> None:
    for kwargs in ({"max_sessions": 0}, {"max_paths": 0}, {"consent_timeout": 0},
                   {"check_rate": 0}, {"check_burst": 0.5}):
        with pytest.raises(ValueError):
            LiteAgent(**kwargs)  # type: ignore[arg-type]


# -- the success path -----------------------------------------------------------------------


def test_a_valid_check_is_answered_and_validates_its_path(agent: LiteAgent) -> None:
    assert agent.route(OURS.ufrag) is None
    req = check()
    out = agent.receive(A, req, 0.0)
    assert_success(out, req, A)
    assert out.session == OURS.ufrag and out.media is None
    assert out.events == (PathValidated(OURS.ufrag, A),)
    assert agent.route(OURS.ufrag) == A
    assert agent.counters.checks == agent.counters.valid_checks == 1
    # The next check on it is answered with no event.
    again = agent.receive(A, check(), 1.0)
    assert again.events == () and again.reply is not None


def test_our_answer_also_reads_back_with_our_parser(agent: LiteAgent) -> None:
    out = agent.receive(A, check(), 0.0)
    m = stun.parse(out.reply)  # type: ignore[arg-type]
    assert m.cls == stun.StunClass.SUCCESS and m.xor_mapped_address == ("192.0.2.10", 50000)
    assert m.check_integrity(OURS.pwd.encode()) and m.check_fingerprint()


def test_ipv6_and_tcp_paths(agent: LiteAgent) -> None:
    v6 = udp_path("2001:db8::7", 50001)
    req = check()
    assert_success(agent.receive(v6, req, 0.0), req, v6)
    # Two TCP connections from one address and port are two paths.
    t1, t2 = tcp_path("192.0.2.10", 50002, 1), tcp_path("192.0.2.10", 50002, 2)
    req = check()
    assert_success(agent.receive(t1, req, 0.0), req, t1)
    assert agent.receive(t1, DTLS, 0.1).session == OURS.ufrag
    assert agent.receive(t2, DTLS, 0.1).media is None
    assert agent.counters.unknown_path_drops == 1


def test_media_is_demultiplexed_by_validated_path(agent: LiteAgent) -> None:
    other = new_credentials()
    agent.register(other)
    agent.receive(A, check(), 0.0)
    agent.receive(B, check(ours=other), 0.0)
    for data in (DTLS, RTP, bytes([0xBF]) + bytes(11), bytes([20]), bytes([63])):
        assert agent.receive(A, data, 0.1) == Received(session=OURS.ufrag, media=data)
        assert agent.receive(B, data, 0.1) == Received(session=other.ufrag, media=data)
    assert agent.receive(C, DTLS, 0.1) == Received()
    assert agent.receive(C, RTP, 0.1) == Received()
    assert agent.counters.unknown_path_drops == 2


@pytest.mark.parametrize("first", [*range(4, 20), *range(64, 128), *range(192, 256)])
def test_bytes_that_are_neither_stun_dtls_nor_rtp_are_dropped(agent: LiteAgent,
                                                              first: int) -> None:
    agent.receive(A, check(), 0.0)
    assert agent.receive(A, bytes([first]) + bytes(40), 0.1) == Received()
    assert agent.counters.not_media == 1


def test_empty_datagram_is_dropped(agent: LiteAgent) -> None:
    agent.receive(A, check(), 0.0)
    assert agent.receive(A, b"", 0.1) == Received()
    assert agent.counters.not_media == 1


def test_remote_ufrag_is_checked_once_known() -> None:
    agent = LiteAgent()
    agent.register(OURS)  # the offer's credentials not known yet
    stranger = Credentials("zzzz", "browserPasswordLongEnough")
    assert agent.receive(A, check(theirs=stranger), 0.0).events == (
        PathValidated(OURS.ufrag, A),)
    agent.set_remote(OURS.ufrag, THEIRS)
    assert_error(agent.receive(A, check(theirs=stranger), 1.0), 401, signed_with=None)
    assert agent.receive(A, check(), 2.0).reply is not None
    agent.set_remote("no such session", THEIRS)  # ignored


# -- nomination and the browser moving ------------------------------------------------------


def test_route_follows_nomination_and_the_browser_moving(agent: LiteAgent) -> None:
    s = OURS.ufrag
    assert agent.receive(A, check(), 0.0).events == (PathValidated(s, A),)
    assert agent.receive(A, check(nominate=True), 0.1).events == (Nominated(s, A),)
    assert agent.route(s) == A
    # A valid check from a new address: learnt (its media is the session's), not followed.
    out = agent.receive(B, check(), 1.0)
    assert out.reply is not None and out.events == ()
    assert agent.route(s) == A
    assert agent.receive(B, RTP, 1.1).session == s
    # Nominated from there: the browser moved; we follow.
    assert agent.receive(B, check(nominate=True), 2.0).events == (
        SelectedPathChanged(s, B, A),)
    assert agent.route(s) == B
    assert agent.receive(B, check(nominate=True), 3.0).events == ()  # same path: no news
    assert agent.receive(A, RTP, 3.1).session == s  # late packets on the old path still land
    assert agent.receive(A, check(nominate=True), 4.0).events == (
        SelectedPathChanged(s, A, B),)


def test_first_nomination_may_pick_another_path_than_the_first_validated(
        agent: LiteAgent) -> None:
    s = OURS.ufrag
    agent.receive(A, check(), 0.0)
    agent.receive(B, check(), 0.1)
    assert agent.receive(B, check(nominate=True), 0.2).events == (Nominated(s, B),)
    assert agent.route(s) == B


def test_a_nominating_first_check_validates_and_nominates(agent: LiteAgent) -> None:
    s = OURS.ufrag
    assert agent.receive(A, check(nominate=True), 0.0).events == (
        PathValidated(s, A), Nominated(s, A))


def test_use_candidate_counts_only_from_the_controlling_side(agent: LiteAgent) -> None:
    out = agent.receive(A, check(nominate=True, controlling=False), 0.0)
    assert out.reply is not None and out.events == (PathValidated(OURS.ufrag, A),)
    agent.receive(B, check(nominate=True, controlling=False), 0.1)
    assert agent.route(OURS.ufrag) == A


# -- answers that refuse ------------------------------------------------------------------


def test_wrong_password_is_401_unsigned(agent: LiteAgent) -> None:
    out = agent.receive(A, check(key=b"not the password"), 0.0)
    assert_error(out, 401, signed_with=None)
    assert out.events == () and agent.route(OURS.ufrag) is None
    assert agent.receive(A, DTLS, 0.1).media is None  # not validated
    assert agent.counters.bad_integrity == 1 and agent.counters.valid_checks == 0


@pytest.mark.parametrize("username", [
    "unknownUfrag:brws", f"{OURS.ufrag}:wrong", OURS.ufrag, f"{OURS.ufrag}brws", "",
    f":{OURS.ufrag}", f"brws:{OURS.ufrag}",
])
def test_usernames_that_name_no_session_are_401(agent: LiteAgent, username: str) -> None:
    assert_error(agent.receive(A, check(username=username), 0.0), 401, signed_with=None)
    assert agent.counters.unknown_ufrag == 1 and agent.route(OURS.ufrag) is None


def _ours(attrs: list[tuple[int, bytes]], *, key: bytes | None = None,
          fingerprint: bool = True, cls: stun.StunClass = stun.StunClass.REQUEST,
          method: int = stun.BINDING) -> bytes:
    return stun.build(method, cls, bytes(range(12)), attrs, integrity_key=key,
                      fingerprint=fingerprint)


USER = (stun.USERNAME, f"{OURS.ufrag}:{THEIRS.ufrag}".encode())
PRIO = (stun.PRIORITY, stun.encode_u32(1))
CONTROLLING = (stun.ICE_CONTROLLING, stun.encode_u64(7))


def test_missing_username_or_integrity_is_400_unsigned(agent: LiteAgent) -> None:
    assert_error(agent.receive(A, _ours([USER, PRIO, CONTROLLING]), 0.0), 400,
                 signed_with=None)
    assert_error(agent.receive(A, _ours([PRIO, CONTROLLING], key=OURS.pwd.encode()), 0.0),
                 400, signed_with=None)
    assert agent.route(OURS.ufrag) is None


def test_missing_or_wrong_fingerprint_is_dropped_unanswered(agent: LiteAgent) -> None:
    key = OURS.pwd.encode()
    assert agent.receive(A, _ours([USER, PRIO, CONTROLLING], key=key, fingerprint=False),
                         0.0) == Received()
    good = check()
    assert agent.receive(A, good[:-1] + bytes([good[-1] ^ 1]), 0.0) == Received()
    assert agent.counters.malformed == 2 and agent.route(OURS.ufrag) is None
    assert_success(agent.receive(A, good, 0.0), good, A)  # the control: it was only that


def test_role_conflict_is_487_signed(agent: LiteAgent) -> None:
    out = agent.receive(A, check(controlling=False, controlled=True), 0.0)
    assert_error(out, 487, signed_with=OURS)
    assert agent.route(OURS.ufrag) is None and agent.counters.role_conflicts == 1


def test_check_with_neither_role_attribute_is_answered(agent: LiteAgent) -> None:
    req = check(controlling=False)
    assert_success(agent.receive(A, req, 0.0), req, A)


def test_unknown_comprehension_required_attributes_are_420_signed(agent: LiteAgent) -> None:
    req = _ours([USER, PRIO, CONTROLLING, (0x0002, b"x"), (0x7ABC, b"")],
                key=OURS.pwd.encode())
    out = agent.receive(A, req, 0.0)
    assert_error(out, 420, signed_with=OURS)
    assert stun.parse(out.reply).unknown_attributes == (0x0002, 0x7ABC)  # type: ignore[arg-type]
    assert agent.route(OURS.ufrag) is None
    # Comprehension-optional ones (Chrome's GOOG-NETWORK-INFO) are ignored.
    req = _ours([USER, PRIO, CONTROLLING, (0xC057, b"\0\0\0\0")], key=OURS.pwd.encode())
    assert_success(agent.receive(A, req, 0.1), req, A)


def test_unknown_attributes_of_an_unauthenticated_check_get_only_401(agent: LiteAgent) -> None:
    req = _ours([USER, PRIO, (0x0002, b"x")], key=b"wrong")
    assert_error(agent.receive(A, req, 0.0), 401, signed_with=None)


def test_missing_priority_is_400_signed(agent: LiteAgent) -> None:
    assert_error(agent.receive(A, check(priority=None), 0.0), 400, signed_with=OURS)
    assert agent.route(OURS.ufrag) is None


def test_indications_responses_and_other_methods_are_not_answered(agent: LiteAgent) -> None:
    key = OURS.pwd.encode()
    for data in (
        _ours([USER], key=key, cls=stun.StunClass.INDICATION),
        _ours([], cls=stun.StunClass.SUCCESS),
        _ours([(stun.ERROR_CODE, stun.encode_error_code(401, "x"))], cls=stun.StunClass.ERROR),
        _ours([USER, PRIO, CONTROLLING], key=key, method=0x003),  # a TURN Allocate
    ):
        assert agent.receive(A, data, 0.0) == Received()
    assert agent.counters.indications == 1 and agent.counters.other_stun == 3
    assert agent.route(OURS.ufrag) is None and agent.counters.checks == 0


def test_stun_range_garbage_is_dropped(agent: LiteAgent) -> None:
    for data in (b"\x00", b"\x01\x01" + bytes(30), check()[:-4], check() + b"\0\0\0\0"):
        assert agent.receive(A, data, 0.0) == Received()
    assert agent.counters.malformed == 4


def test_unauthenticated_answers_are_rate_limited() -> None:
    agent = LiteAgent(unauthenticated_rate=1.0, unauthenticated_burst=3.0)
    agent.register(OURS, THEIRS)
    bad = check(key=b"wrong")
    replies = [agent.receive(A, bad, 0.0).reply for _ in range(10)]
    assert sum(r is not None for r in replies) == 3
    assert agent.counters.answers_suppressed == 7 and agent.counters.bad_integrity == 10
    replies = [agent.receive(A, bad, 2.0).reply for _ in range(5)]
    assert sum(r is not None for r in replies) == 2
    # Authenticated answers are not limited by it.
    good = check()
    assert_success(agent.receive(A, good, 2.0), good, A)


def test_checks_per_session_are_rate_limited_before_the_hmac() -> None:
    agent = LiteAgent(check_rate=2.0, check_burst=3.0)
    agent.register(OURS, THEIRS)
    other = new_credentials()
    agent.register(other)
    good, forged = check(), check(key=b"wrong")
    # Whoever read the ufrag off the wire spends the session's burst, valid or not...
    outs = [agent.receive(A, forged, 0.0) for _ in range(2)] + [
        agent.receive(A, good, 0.0) for _ in range(3)]
    assert agent.counters.bad_integrity == 2 and agent.counters.valid_checks == 1
    assert agent.counters.checks_over_rate == 2
    assert outs[3] == outs[4] == Received()  # over the rate: dropped, unanswered
    # ...but not another session's, and the bucket refills at check_rate.
    theirs = check(ours=other)
    assert_success(agent.receive(C, theirs, 0.0), theirs, C, other)
    assert_success(agent.receive(A, good, 0.5), good, A)
    assert agent.receive(A, good, 0.5) == Received()
    assert agent.counters.checks_over_rate == 3


# -- bounds on paths ----------------------------------------------------------------------


def test_paths_per_session_are_bounded_and_stale_ones_give_way() -> None:
    agent = LiteAgent(max_paths=2)
    agent.register(OURS, THEIRS)
    s = OURS.ufrag
    agent.receive(A, check(nominate=True), 0.0)
    agent.receive(B, check(), 0.0)
    assert agent.receive(C, check(), 1.0) == Received()  # a third: ignored, unanswered
    assert agent.counters.paths_ignored == 1
    assert agent.receive(C, DTLS, 1.1).media is None
    # B goes a whole consent window without a check while the route stays fresh: C may
    # take its place; the route is never displaced.
    agent.receive(A, check(), 20.0)
    agent.receive(A, check(), CONSENT_TIMEOUT + 0.5)
    assert agent.receive(C, check(), CONSENT_TIMEOUT + 1.0).reply is not None
    assert agent.receive(B, DTLS, CONSENT_TIMEOUT + 1.1).media is None
    assert agent.receive(C, DTLS, CONSENT_TIMEOUT + 1.1).session == s
    assert agent.route(s) == A


def test_a_path_belongs_to_one_session(agent: LiteAgent) -> None:
    other = new_credentials()
    agent.register(other)
    agent.receive(A, check(), 0.0)
    # Someone with the other session's credentials, from (or spoofing) A's address.
    assert agent.receive(A, check(ours=other), 0.1) == Received()
    assert agent.counters.path_conflicts == 1
    assert agent.receive(A, DTLS, 0.2).session == OURS.ufrag
    assert agent.route(other.ufrag) is None
    agent.remove(OURS.ufrag)
    assert agent.receive(A, check(ours=other), 0.3).events == (PathValidated(other.ufrag, A),)


# -- consent freshness --------------------------------------------------------------------


def test_consent_is_lost_after_30_s_without_a_valid_check(agent: LiteAgent) -> None:
    s = OURS.ufrag
    assert agent.next_deadline() is None  # nothing validated: no consent to watch
    agent.receive(A, check(nominate=True), 100.0)
    assert agent.next_deadline() == 100.0 + CONSENT_TIMEOUT
    agent.receive(A, check(), 110.0)
    assert agent.next_deadline() == 140.0
    agent.receive(A, check(key=b"forged"), 120.0)  # a forged check refreshes nothing
    assert agent.next_deadline() == 140.0
    assert agent.timer(139.9) == []
    assert agent.route(s) == A
    assert agent.timer(140.0) == [ConsentLost(s, A)]
    assert agent.counters.consent_lost == 1
    assert agent.route(s) is None and agent.next_deadline() is None
    assert agent.timer(1000.0) == []  # once
    # The session is over: the browser's checks go unanswered, its media is dropped.
    assert agent.receive(A, check(), 141.0) == Received()
    assert agent.counters.late_checks == 1
    assert agent.receive(A, RTP, 141.0) == Received()
    agent.remove(s)
    assert_error(agent.receive(A, check(), 142.0), 401, signed_with=None)


def test_only_checks_on_the_route_keep_consent(agent: LiteAgent) -> None:
    agent.receive(A, check(nominate=True), 0.0)
    agent.receive(B, check(), 20.0)  # another path's checks are not consent for A
    assert agent.timer(30.0) == [ConsentLost(OURS.ufrag, A)]


def test_consent_follows_the_browser_when_it_moves(agent: LiteAgent) -> None:
    agent.receive(A, check(nominate=True), 0.0)
    agent.receive(B, check(nominate=True), 20.0)
    assert agent.timer(30.0) == []
    assert agent.next_deadline() == 50.0
    assert agent.timer(50.0) == [ConsentLost(OURS.ufrag, B)]


def test_consent_for_many_sessions_fires_in_order() -> None:
    agent = LiteAgent()
    creds = [new_credentials() for _ in range(50)]
    for i, c in enumerate(creds):
        agent.register(c)
        agent.receive(udp_path("192.0.2.1", 1000 + i), check(ours=c), float(i))
    for i in range(50):
        assert agent.next_deadline() == i + CONSENT_TIMEOUT
        assert agent.timer(i + CONSENT_TIMEOUT) == [
            ConsentLost(creds[i].ufrag, udp_path("192.0.2.1", 1000 + i))]
    assert agent.next_deadline() is None


def test_removed_sessions_leave_no_deadlines_behind() -> None:
    agent = LiteAgent()
    for i in range(2000):
        c = new_credentials()
        agent.register(c)
        agent.receive(udp_path("192.0.2.1", 1 + i % 60000), check(ours=c), float(i))
        agent.remove(c.ufrag)
        assert len(agent._deadlines) <= 2 * len(agent) + 65
    assert agent.next_deadline() is None and agent.timer(1e9) == []


def test_a_closed_tcp_connection_leaves_the_session_without_a_route(agent: LiteAgent) -> None:
    s = OURS.ufrag
    t1, t2 = tcp_path("192.0.2.10", 50002, 1), tcp_path("192.0.2.10", 50002, 2)
    agent.receive(t1, check(nominate=True), 0.0)
    agent.forget_path(t1)
    agent.forget_path(t1)  # idempotent
    agent.forget_path(C)  # never seen
    assert agent.route(s) is None
    assert agent.receive(t1, DTLS, 1.0).media is None
    # The browser reconnects: its next valid check is the route again.
    assert agent.receive(t2, check(), 5.0).events == (SelectedPathChanged(s, t2, None),)
    assert agent.route(s) == t2
    assert agent.next_deadline() == 5.0 + CONSENT_TIMEOUT


def test_consent_runs_out_while_there_is_no_route(agent: LiteAgent) -> None:
    t1 = tcp_path("192.0.2.10", 50002, 1)
    agent.receive(t1, check(nominate=True), 0.0)
    agent.forget_path(t1)
    assert agent.timer(CONSENT_TIMEOUT) == [ConsentLost(OURS.ufrag, None)]


def test_removing_a_session_frees_its_paths(agent: LiteAgent) -> None:
    agent.receive(A, check(nominate=True), 0.0)
    agent.remove(OURS.ufrag)
    assert agent.route(OURS.ufrag) is None
    assert agent.receive(A, DTLS, 0.1) == Received()
    assert agent.next_deadline() is None


def test_counters_export_every_field(agent: LiteAgent) -> None:
    agent.receive(A, check(), 0.0)
    exported = agent.counters.as_dict()
    assert exported["checks"] == exported["valid_checks"] == 1
    assert {"bad_integrity", "unknown_ufrag", "unknown_path_drops", "consent_lost"} <= set(
        exported)


# -- hostile input ------------------------------------------------------------------------

PATHS = [A, B, C, tcp_path("192.0.2.10", 1, 9), udp_path("2001:db8::1", 7)]


def _valid_inputs() -> list[bytes]:
    return [check(), check(nominate=True), check(controlled=True, controlling=False),
            check(key=b"x"), check(priority=None), DTLS, RTP,
            _ours([USER, PRIO, CONTROLLING, (0x0002, b"")], key=OURS.pwd.encode())]


VALID_INPUTS = _valid_inputs()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b += rng.randbytes(rng.choice((1, 4, 8)))
        elif len(b) >= 4:
            b[2:4] = (max(0, len(b) - 20) & 0xFFFF).to_bytes(2, "big")
    return bytes(b)


@pytest.mark.fuzz
@settings(max_examples=scaled(150, 10000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(
    st.integers(0, len(PATHS) - 1),
    st.one_of(st.binary(max_size=300),
              st.tuples(st.integers(0, len(VALID_INPUTS) - 1), st.integers(0, 2**32))),
    st.floats(0, 5)), max_size=40))
def test_hostile_streams_never_raise_or_misdeliver(steps: list[Any]) -> None:
    agent = LiteAgent(max_paths=3, unauthenticated_burst=5)
    agent.register(OURS, THEIRS)
    now = 0.0
    validated: set[Path] = set()
    for path_index, data, dt in steps:
        path = PATHS[path_index]
        if isinstance(data, tuple):
            which, seed = data
            data = VALID_INPUTS[which]
            if seed % 3:
                data = _mutate(random.Random(seed), data)
        now += dt
        out = agent.receive(path, data, now)
        for event in out.events:
            if isinstance(event, PathValidated | Nominated | SelectedPathChanged):
                validated.add(event.path)
        if out.reply is not None:
            if answer(out).message_class == ref.Class.RESPONSE:
                validated.add(path)
            m = stun.parse(out.reply)
            assert m.check_fingerprint()
        if out.media is not None:
            # Media only from a path a valid check came from, only to its session.
            assert out.session == OURS.ufrag and path in validated
        agent.timer(now)
        deadline = agent.next_deadline()
        assert deadline is None or deadline > now
        route = agent.route(OURS.ufrag)
        assert route is None or route in validated


# -- end to end: aioice's full agent against a LiteAgent on a real UDP socket ---------------


@pytest.fixture
def loopback_netns() -> None:
    if not loopback_only():
        pytest.fail("this test sends datagrams: run it in the loopback-only namespace, "
                    "tests/in-loopback-netns.sh .venv/bin/python -m pytest "
                    "tests/unit/test_ice_lite.py")


class LiteEdge(asyncio.DatagramProtocol):
    """The smallest honest UDP edge: every datagram into the agent, the reply back to its
    source, media to a queue, the agent's consent timer on the loop's clock."""

    def __init__(self, agent: LiteAgent) -> None:
        self.agent = agent
        self.events: list[object] = []
        self.media: asyncio.Queue[tuple[str | None, bytes]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        out = self.agent.receive(udp_path(addr[0], addr[1]), data,
                                 asyncio.get_running_loop().time())
        if out.reply is not None:
            assert self.transport is not None
            self.transport.sendto(out.reply, addr)
        if out.media is not None:
            self.media.put_nowait((out.session, out.media))
        self.events.extend(out.events)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.agent.next_deadline()
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.events.extend(self.agent.timer(asyncio.get_running_loop().time()))
        self._arm()

    def send(self, session: str, data: bytes) -> None:
        path = self.agent.route(session)
        assert path is not None and self.transport is not None
        self.transport.sendto(data, (path[1], path[2]))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
async def edge(loopback_netns: None) -> AsyncIterator[tuple[LiteEdge, int]]:
    loop = asyncio.get_running_loop()
    agent = LiteAgent(consent_timeout=1.5)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: LiteEdge(agent), local_addr=("127.0.0.1", 0))
    yield protocol, transport.get_extra_info("sockname")[1]
    protocol.close()


@pytest.fixture
def aioice_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice gathers from every interface except 127.0.0.1, the only one here; and checks
    # consent every 5 s, which we shorten so that a test can watch consent both ways.
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)


async def _full_agent(port: int, creds: Credentials, *, controlling: bool,
                      remote_is_lite: bool) -> Connection:
    conn = Connection(ice_controlling=controlling, use_ipv6=False)
    conn.remote_is_lite = remote_is_lite  # what a=ice-lite in our answer tells a browser
    await conn.gather_candidates()
    conn.remote_username, conn.remote_password = creds.ufrag, creds.pwd
    await conn.add_remote_candidate(Candidate(
        foundation="1", component=1, transport="udp", priority=2130706431,
        host="127.0.0.1", port=port, type="host"))
    await conn.add_remote_candidate(None)
    return conn


@pytest.mark.usefixtures("aioice_on_loopback")
@pytest.mark.parametrize(("controlling", "remote_is_lite"), [
    (True, True),  # a browser facing a=ice-lite: regular nomination
    (True, False),  # aggressive nomination (USE-CANDIDATE on every check)
    (False, True),  # starts controlled: our 487 makes it take control
])
async def test_aioice_full_agent_connects_to_the_lite_agent(
        edge: tuple[LiteEdge, int], controlling: bool, remote_is_lite: bool) -> None:
    lite, port = edge
    creds = new_credentials()
    conn = await _full_agent(port, creds, controlling=controlling,
                             remote_is_lite=remote_is_lite)
    session = lite.agent.register(creds, Credentials(conn.local_username,
                                                      conn.local_password))
    try:
        await asyncio.wait_for(conn.connect(), 10)
        theirs = ("udp", "127.0.0.1", conn.local_candidates[0].port)
        assert lite.events[0] == PathValidated(session, theirs)
        assert Nominated(session, theirs) in lite.events
        assert lite.agent.route(session) == theirs
        if not controlling:
            assert lite.agent.counters.role_conflicts >= 1

        # Media both ways over the pair ICE chose.
        await conn.send(RTP)
        assert await asyncio.wait_for(lite.media.get(), 5) == (session, RTP)
        lite.send(session, DTLS)
        assert await asyncio.wait_for(conn.recv(), 5) == DTLS

        # aioice's consent checks keep consent; then it goes away and consent is lost.
        await asyncio.sleep(2.5)
        assert not any(isinstance(e, ConsentLost) for e in lite.events)
        checks_before_close = lite.agent.counters.valid_checks
        assert checks_before_close > 5
    finally:
        await conn.close()
    for _ in range(40):
        if any(isinstance(e, ConsentLost) for e in lite.events):
            break
        await asyncio.sleep(0.1)
    assert lite.events[-1] == ConsentLost(session, theirs)
    assert lite.agent.route(session) is None
    assert lite.agent.counters.bad_integrity == lite.agent.counters.unknown_ufrag == 0


@pytest.mark.usefixtures("aioice_on_loopback")
async def test_two_aioice_agents_share_one_lite_port(edge: tuple[LiteEdge, int]) -> None:
    lite, port = edge
    conns, sessions = [], []
    try:
        for _ in range(2):
            creds = new_credentials()
            conn = await _full_agent(port, creds, controlling=True, remote_is_lite=True)
            sessions.append(lite.agent.register(
                creds, Credentials(conn.local_username, conn.local_password)))
            conns.append(conn)
        await asyncio.wait_for(asyncio.gather(*(c.connect() for c in conns)), 10)
        for conn, session in zip(conns, sessions, strict=True):
            payload = RTP + session.encode()
            await conn.send(payload)
            assert await asyncio.wait_for(lite.media.get(), 5) == (session, payload)
            lite.send(session, DTLS + session.encode())
            assert await asyncio.wait_for(conn.recv(), 5) == DTLS + session.encode()
    finally:
        for conn in conns:
            await conn.close()
