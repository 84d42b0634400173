"""The issue-12 spike (appliance/edges/lite_transport.py, decision record 0006): aiortc's
DTLS-SRTP and our SrtpFastPath over ONE shared UDP socket answering as ICE-lite.

- STUN, cross-checked both ways against aioice's implementation (the reference the
  "browser" here runs), and fuzzed: the parser raises only StunError, the demux nothing.
- The sans-IO demux: nomination, a browser that moves, consent and connect deadlines, a
  spoofed source that would take another call's path, the bounds.
- End to end (loopback netns): aiortc peer connections as browsers (full ICE, controlling)
  offer; the appliance side answers through the shared port; DTLS connects, SRTP flows
  both ways on two calls at once over one socket; strangers get nothing; a browser whose
  network vanishes is released by consent freshness.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aioice.ice
import pytest
from aioice import stun
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from aiortc.sdp import candidate_from_sdp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.edges.lite_transport import (
    Answer,
    LiteConnection,
    LiteDemux,
    LiteSettings,
    Refused,
    SharedUdpPort,
    StunError,
    binding_success,
    check_lite_hooks,
    offer_without_candidates,
    parse_binding_request,
    use_lite_transport,
)
from appliance.edges.rtc_adapter import (
    CandidatePolicy,
    SilentTrack,
    SrtpFastPath,
    apply_candidate_policy,
    make_configuration,
    sender_ssrc,
)
from appliance.media import rtp
from tests.fuzz_scale import scaled

UFRAG = "Lite0ufragAAAAAA"
PASSWORD = "lite0password0000000000A"
REMOTE = "brws"
A = ("127.0.0.1", 40001)
B = ("127.0.0.1", 40002)


def check(ufrag: str = UFRAG, password: str = PASSWORD, *, nominate: bool = False,
          controlling: bool = True, remote: str = REMOTE) -> bytes:
    """A connectivity check as aioice (the full agent under aiortc) builds one."""
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{ufrag}:{remote}"
    msg.attributes["PRIORITY"] = 1853824767
    if controlling:
        msg.attributes["ICE-CONTROLLING"] = 0x1122334455667788
        if nominate:
            msg.attributes["USE-CANDIDATE"] = None
    else:
        msg.attributes["ICE-CONTROLLED"] = 0x1122334455667788
    msg.add_message_integrity(password.encode())  # and FINGERPRINT after it
    return bytes(msg)


# -- STUN against the reference --------------------------------------------------------


def test_aioice_check_parses_and_authenticates() -> None:
    data = check(nominate=True)
    request = parse_binding_request(data)
    assert request.username == f"{UFRAG}:{REMOTE}"
    assert request.use_candidate and request.controlling and not request.controlled
    assert request.priority == 1853824767
    assert request.transaction_id == stun.parse_message(data).transaction_id
    assert request.authentic(PASSWORD.encode())
    assert not request.authentic(b"another0password0000000")
    assert not parse_binding_request(check(controlling=False)).controlling


@pytest.mark.parametrize("addr", [("127.0.0.1", 50123), ("203.0.113.9", 1),
                                  ("2001:db8::7", 65535), ("::1", 9)])
def test_our_answer_is_what_aioice_accepts(addr: tuple[str, int]) -> None:
    txid = os.urandom(12)
    reply = binding_success(txid, addr, PASSWORD.encode())
    message = stun.parse_message(reply)  # raises if FINGERPRINT is wrong
    assert message.message_class == stun.Class.RESPONSE
    assert message.message_method == stun.Method.BINDING
    assert message.transaction_id == txid
    assert message.attributes["XOR-MAPPED-ADDRESS"] == addr
    assert message.check_message_integrity(PASSWORD.encode())
    assert not message.check_message_integrity(b"another0password0000000")


def test_a_check_without_fingerprint_or_integrity_is_refused() -> None:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{UFRAG}:{REMOTE}"
    msg.add_message_integrity(PASSWORD.encode())  # aioice adds FINGERPRINT too
    parse_binding_request(bytes(msg))
    del msg.attributes["FINGERPRINT"]
    with pytest.raises(StunError):
        parse_binding_request(bytes(msg))  # no FINGERPRINT
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{UFRAG}:{REMOTE}"
    msg.add_fingerprint()
    with pytest.raises(StunError):
        parse_binding_request(bytes(msg))  # no MESSAGE-INTEGRITY
    data = bytearray(check())
    data[-1] ^= 1
    with pytest.raises(StunError):
        parse_binding_request(bytes(data))  # FINGERPRINT mismatch


@pytest.mark.fuzz
@settings(max_examples=scaled(400, 20_000), deadline=None)
@given(data=st.binary(max_size=1600))
def test_stun_parser_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(StunError):
        parse_binding_request(data)
    demux = LiteDemux()
    demux.add_call(0.0, UFRAG, PASSWORD)
    assert isinstance(demux.on_stun(0.0, data, A), Refused | Answer)


@pytest.mark.fuzz
@settings(max_examples=scaled(400, 20_000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(nominate=st.booleans(), edits=st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 255), st.integers(0, 3)), max_size=6),
    v6=st.booleans())
def test_mutated_checks_never_raise(nominate: bool, edits: list[tuple[int, int, int]],
                                    v6: bool) -> None:
    data = bytearray(check(nominate=nominate))
    for pos, value, op in edits:
        if op == 0 and pos < len(data):
            data[pos] = value
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data[pos:pos] = bytes([value]) * (value % 9)
        elif op == 3 and len(data) > 3:
            data[2:4] = value.to_bytes(2, "big")  # the length field
    with contextlib.suppress(StunError):
        parse_binding_request(bytes(data))
    demux = LiteDemux()
    demux.add_call(0.0, UFRAG, PASSWORD)
    outcome = demux.on_stun(0.0, bytes(data), ("2001:db8::1", 5) if v6 else A)
    if isinstance(outcome, Answer):  # a mutation that kept the check valid
        assert stun.parse_message(outcome.reply).check_message_integrity(PASSWORD.encode())


# -- the sans-IO demux -----------------------------------------------------------------


def demux_with_call(**kw: float) -> LiteDemux:
    demux = LiteDemux(LiteSettings(**kw))  # type: ignore[arg-type]
    demux.add_call(0.0, UFRAG, PASSWORD)
    return demux


def test_nomination_routing_and_consent() -> None:
    demux = demux_with_call()
    assert demux.route(A) is None
    first = demux.on_stun(1.0, check(), A)
    assert isinstance(first, Answer) and not first.selected
    assert demux.route(A) == UFRAG and demux.selected(UFRAG) is None  # learnt, not chosen
    nominated = demux.on_stun(1.1, check(nominate=True), A)
    assert isinstance(nominated, Answer) and nominated.selected
    assert demux.selected(UFRAG) == A
    again = demux.on_stun(5.0, check(), A)  # a consent check: no USE-CANDIDATE
    assert isinstance(again, Answer) and not again.selected
    assert demux.expired(34.9) == []  # 30 s after the last valid check, not the first
    assert demux.expired(35.0) == [(UFRAG, "consent expired")]
    assert demux.route(A) is None and not demux.has_call(UFRAG)


def test_never_nominated_is_released() -> None:
    demux = demux_with_call(connect_timeout=10.0)
    assert isinstance(demux.on_stun(1.0, check(), A), Answer)
    assert demux.expired(9.9) == []
    assert demux.expired(10.0) == [(UFRAG, "no nomination")]


def test_a_browser_that_moves_keeps_its_call() -> None:
    demux = demux_with_call()
    demux.on_stun(1.0, check(nominate=True), A)
    moved = demux.on_stun(2.0, check(nominate=True), B)
    assert isinstance(moved, Answer) and moved.selected and demux.selected(UFRAG) == B
    assert demux.route(A) == UFRAG  # its late packets from the old address still count
    assert demux.expired(31.5) == []  # consent now runs on B


def test_what_is_refused() -> None:
    demux = demux_with_call()
    assert demux.on_stun(0, check(password="wrong0password000000000"), A) == Refused(
        "bad integrity")
    assert demux.on_stun(0, check(ufrag="nobodyAAAAAAAAAA"), A) == Refused("unknown ufrag")
    assert demux.on_stun(0, check(controlling=False), A) == Refused("peer not controlling")
    assert demux.on_stun(0, b"\x00\x01\x00\x00" + b"\x00" * 16, A) == Refused("malformed")
    demux.set_remote_ufrag(UFRAG, REMOTE)
    assert demux.on_stun(0, check(remote="othr"), A) == Refused("wrong remote ufrag")
    assert demux.route(A) is None  # nothing refused taught us an address


def test_a_spoofed_source_cannot_take_a_live_path() -> None:
    demux = demux_with_call()
    other = "Lite0ufragBBBBBB"
    demux.add_call(0.0, other, PASSWORD)
    demux.on_stun(1.0, check(nominate=True), A)
    # The attacker has its own valid call, and writes the victim's address as its source.
    assert demux.on_stun(1.5, check(other, nominate=True), A) == Refused("address taken")
    assert demux.route(A) == UFRAG
    # An address that is only learnt (not selected) may move to the call that proves it.
    demux.on_stun(2.0, check(), B)
    assert isinstance(demux.on_stun(2.5, check(other, nominate=True), B), Answer)
    assert demux.route(B) == other


def test_bounds_on_checks_addresses_and_calls() -> None:
    demux = demux_with_call(check_rate=10.0, check_burst=5.0, max_addresses=4, max_calls=2)
    demux.on_stun(0.0, check(nominate=True), A)
    outcomes = [demux.on_stun(0.0, check(), ("127.0.0.1", 41000 + i)) for i in range(10)]
    assert outcomes.count(Refused("check rate")) == 6  # burst 5, one taken by the first
    routed = [a for a in [A] + [("127.0.0.1", 41000 + i) for i in range(10)]
              if demux.route(a) == UFRAG]
    assert len(routed) == 4 and A in routed  # the selected path is never evicted
    demux.add_call(0.0, "Lite0ufragCCCCCC", PASSWORD)
    with pytest.raises(ValueError):
        demux.add_call(0.0, "Lite0ufragDDDDDD", PASSWORD)
    with pytest.raises(ValueError):
        demux_with_call().add_call(0.0, "bad:ufrag", PASSWORD)


def test_hooks_and_interface_still_match_aiortc() -> None:
    check_lite_hooks()


def test_offer_without_candidates() -> None:
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=candidate:1 1 udp 1 10.0.0.1 5 typ host"
           "\r\na=candidate:2 1 udp 1 x.local 6 typ host\r\na=end-of-candidates\r\n")
    assert offer_without_candidates(sdp) == (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=end-of-candidates\r\n")


# -- end to end: aiortc browsers over one shared socket ---------------------------------

LOOPBACK = CandidatePolicy.from_strings(["127.0.0.1"])


@dataclass
class Call:
    browser: RTCPeerConnection
    appliance: RTCPeerConnection
    conn: LiteConnection
    answer: str
    browser_addr: tuple[str, int]
    frames: int = 0  # audio frames the browser decoded from what the appliance sent
    fast: SrtpFastPath | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def _eventually(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def place_call(port: SharedUdpPort) -> Call:
    browser = RTCPeerConnection(make_configuration([]))
    transceiver = browser.addTransceiver(AudioStreamTrack(), direction="sendrecv")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                     if c.mimeType == "audio/PCMU"])
    apply_candidate_policy(browser, LOOPBACK)
    await browser.setLocalDescription(await browser.createOffer())

    appliance = RTCPeerConnection(make_configuration([]))
    offer = offer_without_candidates(browser.localDescription.sdp)
    await appliance.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    appliance.addTrack(SilentTrack("audio"))
    (conn,) = await use_lite_transport(appliance, port)
    await appliance.setLocalDescription(await appliance.createAnswer())
    answer = appliance.localDescription.sdp
    await browser.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await _eventually(lambda: appliance.connectionState == browser.connectionState
                      == "connected", 10, "DTLS on both sides")
    (browser_ice,) = [t.receiver.transport.transport._connection
                      for t in browser.getTransceivers()]
    call = Call(browser, appliance, conn, answer, browser_ice._nominated[1].local_addr)
    call.fast = SrtpFastPath(appliance, on_rtp=lambda packet: None)

    async def count_frames() -> None:
        track = transceiver.receiver.track
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                call.frames += 1

    call.tasks.append(asyncio.create_task(count_frames()))
    return call


async def send_audio(call: Call, packets: int) -> None:
    """PCMU through the appliance's fast path: protect + sendto on the shared socket."""
    assert call.fast is not None
    ssrc = sender_ssrc(call.appliance, "audio")
    for seq in range(packets):
        call.fast.send_rtp(rtp.build(0, seq == 0, seq, seq * 160, ssrc, b"\xff" * 160))
        await asyncio.sleep(0.02)


async def hang_up(call: Call) -> None:
    for task in call.tasks:
        task.cancel()
    if call.fast is not None:
        call.fast.detach()
    await call.browser.close()
    await call.appliance.close()


def udp_sockets() -> list[str]:
    """Every UDP socket in this (private) network namespace, one line each."""
    out = subprocess.run(["ss", "-Hunap"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture
async def tcp_placeholder() -> AsyncIterator[int]:
    # The worker's ICE-TCP port: announced in the answer; its listener is not in the spike.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.e2e
async def test_two_calls_share_one_udp_socket(tcp_placeholder: int) -> None:
    port = await SharedUdpPort.open("127.0.0.1", tcp_port=tcp_placeholder)
    calls: list[Call] = []
    try:
        calls = [await place_call(port), await place_call(port)]
        assert port.calls == 2
        for call in calls:
            session, _, media = call.answer.partition("\r\nm=")
            assert "a=ice-lite" in session.split("\r\n")
            candidates = [x for x in media.split("\r\n") if x.startswith("a=candidate:")]
            assert len(candidates) == 2, candidates
            udp, tcp = (c.split() for c in candidates)
            assert udp[2:8] == ["udp", udp[3], "127.0.0.1", str(port.port), "typ", "host"]
            assert tcp[2:] == ["tcp", tcp[3], "127.0.0.1", str(tcp_placeholder), "typ",
                               "host", "tcptype", "passive"]
            assert int(udp[3]) > int(tcp[3])
            assert f"a=ice-ufrag:{call.conn.local_username}" in media
            browser_ice = call.browser.getTransceivers()[0].receiver.transport.transport
            assert browser_ice._connection.remote_is_lite
            pair = call.conn._nominated[1]
            assert pair.protocol is port and pair.remote_addr == call.browser_addr
        assert calls[0].browser_addr != calls[1].browser_addr

        await asyncio.gather(*(send_audio(call, 60) for call in calls))
        await _eventually(lambda: all(c.frames >= 40 for c in calls), 5, "frames decoded")
        for call in calls:
            assert call.fast is not None
            assert call.fast.sent == 60 and call.fast.received >= 40  # the browser's audio
            assert call.fast.unprotect_errors == 0
        # One UDP socket for both appliance calls: the rest are the two browsers' own.
        sockets = udp_sockets()
        assert [s for s in sockets if f":{port.port} " in s] and len(
            [s for s in sockets if f":{port.port} " in s]) == 1, sockets
        browser_ports = {c.browser_addr[1] for c in calls}
        others = [s for s in sockets if f":{port.port} " not in s]
        assert len(others) == 2 and all(
            any(f":{p} " in s for p in browser_ports) for s in others), sockets
        assert port.counters.checks >= 4 and port.counters.unknown_source == 0
    finally:
        for call in calls:
            await hang_up(call)
        assert port.calls == 0  # every closed call left the demux
        await port.close()


@pytest.mark.e2e
async def test_strangers_get_nothing_and_the_call_goes_on() -> None:
    port = await SharedUdpPort.open("127.0.0.1")
    call = await place_call(port)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.bind(("127.0.0.1", 0))
        stranger.setblocking(False)
        target = ("127.0.0.1", port.port)
        hostile = [
            # The live call's ufrags (on-path strangers can read them), not its password.
            check(call.conn.local_username, "wrong0password000000000", nominate=True,
                  remote=str(call.conn.remote_username)),
            check(call.conn.local_username, call.conn.local_password, nominate=True),
            check("nobodyAAAAAAAAAA", nominate=True),
            b"\x00\x01\x00\x00" + os.urandom(40),
            b"\x16\xfe\xfd" + os.urandom(60),  # DTLS-looking, from nobody's address
            b"\x80\x00" + os.urandom(100),  # SRTP-looking
            b"\x01" * 1600,  # over the datagram bound
        ]
        for data in hostile:
            stranger.sendto(data, target)
        await send_audio(call, 30)
        with pytest.raises(BlockingIOError):
            stranger.recv(2048)  # not one byte back: no reflection, no error answers
        refused = port.counters.refused
        assert refused.get("bad integrity") == 1 and refused.get("unknown ufrag") == 1
        assert refused.get("wrong remote ufrag") == 1
        assert refused.get("malformed") == 1 and port.counters.unknown_source == 2
        assert port.counters.oversized == 1
        await _eventually(lambda: call.frames >= 20, 5, "frames after the strangers")
        assert call.appliance.connectionState == "connected"
        assert call.fast is not None and call.fast.unprotect_errors == 0
    finally:
        stranger.close()
        await hang_up(call)
        await port.close()


@contextlib.contextmanager
def udp_dropped_from(source_port: int) -> object:
    """The browser's network vanishes: nft drops every UDP datagram it sends."""
    table = f"lite{source_port}"
    rules = [f"add table inet {table}",
             f"add chain inet {table} out {{ type filter hook output priority 0 ; }}",
             f"add rule inet {table} out udp sport {source_port} drop"]
    for rule in rules:
        subprocess.run(["nft", *rule.split()], check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


@pytest.mark.e2e
async def test_consent_expiry_releases_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test browser checks consent every ~0.5 s (aioice: 5 s), so this runs in seconds.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.5)
    port = await SharedUdpPort.open("127.0.0.1",
                                    settings=LiteSettings(consent_timeout=2.0, tick=0.1))
    call = await place_call(port)
    states: list[str] = []
    call.appliance.on("connectionstatechange", lambda: states.append(
        call.appliance.connectionState))
    try:
        await asyncio.sleep(3.0)  # longer than the timeout: consent checks keep it alive
        assert call.appliance.connectionState == "connected" and call.conn.failure is None
        with udp_dropped_from(call.browser_addr[1]):
            dropped_at = time.monotonic()
            await _eventually(lambda: "failed" in states, 6, "the appliance side to fail")
            took = time.monotonic() - dropped_at
        # The last check got through up to one consent interval (0.6 s) before the drop.
        assert 2.0 - 0.6 - 0.1 <= took <= 4.0, took
        # What the leg sees first is "failed" (then aiortc closes a pc whose DTLS closed).
        assert states[0] == "failed", states
        assert call.conn.failure == "consent expired"
        assert port.counters.consent_failures == 1 and port.calls == 0
        assert call.conn._nominated == {}  # the fast path sends nothing more
        assert call.fast is not None
        sent = call.fast.sent
        call.fast.send_rtp(rtp.build(0, False, 1, 1, 1, b"\xff" * 160))
        assert call.fast.sent == sent
    finally:
        await hang_up(call)
        await port.close()


def test_ipv6_loopback_literal_is_answerable() -> None:
    # What the kernel hands us for an IPv6 source (a 4-tuple, maybe scoped) still answers.
    reply = binding_success(os.urandom(12), ("fe80::1%lo", 5000), PASSWORD.encode())
    assert stun.parse_message(reply).attributes["XOR-MAPPED-ADDRESS"][0] == str(
        ipaddress.ip_address("fe80::1"))


@pytest.mark.e2e
async def test_an_answer_never_checked_fails_and_trickled_candidates_go_nowhere() -> None:
    port = await SharedUdpPort.open("127.0.0.1",
                                    settings=LiteSettings(connect_timeout=0.5, tick=0.1))
    browser = RTCPeerConnection(make_configuration([]))
    browser.addTransceiver("audio")
    apply_candidate_policy(browser, LOOPBACK)
    await browser.setLocalDescription(await browser.createOffer())
    appliance = RTCPeerConnection(make_configuration([]))
    try:
        offer = browser.localDescription.sdp
        # As a browser that trickles: no end-of-candidates in its offer.
        trickling = offer_without_candidates(offer).replace("a=end-of-candidates\r\n", "")
        await appliance.setRemoteDescription(RTCSessionDescription(trickling, "offer"))
        (conn,) = await use_lite_transport(appliance, port)
        await appliance.setLocalDescription(await appliance.createAnswer())
        # The leg forwards the browser's trickled `ice` actions: kept, never contacted.
        line = next(x for x in offer.splitlines() if x.startswith("a=candidate:"))
        candidate = candidate_from_sdp(line.removeprefix("a=candidate:"))
        candidate.sdpMid = "0"
        await appliance.addIceCandidate(candidate)
        assert [c.port for c in conn.remote_candidates] == [candidate.port]
        # The browser never gets the answer, so nobody checks: the connect deadline ends it.
        await _eventually(lambda: appliance.connectionState == "failed", 3, "connect timeout")
        assert conn.failure == "no nomination" and port.counters.connect_failures == 1
        assert port.counters.checks == 0 and port.calls == 0
        assert len([s for s in udp_sockets() if f":{port.port} " in s]) == 1
    finally:
        await browser.close()
        await appliance.close()
        await port.close()
