"""The worker's media port on UDP (appliance/edges/lite_transport.py, decision record 0006):
aiortc's DTLS-SRTP and our SrtpFastPath over ONE shared UDP socket answered as ICE-lite by
the real agent (appliance.ice.lite.LiteAgent; its STUN and demux are tested, against
aioice, in tests/unit/test_ice_*.py). ICE-TCP is tests/e2e/test_ice_tcp.py.

End to end (loopback netns): aiortc peer connections as browsers (full ICE, controlling)
offer; the appliance side answers through the port; DTLS connects, SRTP flows both ways on
two calls at once over one socket; strangers get at most an unsigned 401 and change
nothing; a browser whose network vanishes is released by consent freshness; an answer
nobody checks is released for "no nomination"; IPv4 sources on a dual-stack socket are
themselves; the deadlines run on one timer that is idle when nothing is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aioice.ice
import pytest
from aioice import stun
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from aiortc.sdp import candidate_from_sdp

from appliance.edges.lite_transport import (
    LiteConnection,
    LiteSettings,
    UdpPair,
    WorkerMediaPort,
    check_lite_hooks,
    offer_without_candidates,
    use_lite_transport,
)
from appliance.edges.rtc_adapter import (
    CandidatePolicy,
    HostAddress,
    SilentTrack,
    SrtpFastPath,
    apply_candidate_policy,
    make_configuration,
    sender_ssrc,
)
from appliance.media import rtp
from tests.e2e.ice_clients import check, free_tcp_port

LOOPBACK = CandidatePolicy.from_strings(["127.0.0.1"])
HERE = [HostAddress("127.0.0.1", "127.0.0.1")]
DTLS = bytes([23, 0xFE, 0xFD]) + bytes(30)  # an application-data record, by its header


async def test_hooks_and_interface_still_match_aiortc() -> None:
    check_lite_hooks()


def test_offer_without_candidates() -> None:
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=candidate:1 1 udp 1 10.0.0.1 5 typ host"
           "\r\na=candidate:2 1 udp 1 x.local 6 typ host\r\na=end-of-candidates\r\n")
    assert offer_without_candidates(sdp) == (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=end-of-candidates\r\n")


@pytest.mark.parametrize("bad", [
    {"consent_timeout": 0}, {"check_rate": -1}, {"max_tcp_per_address": 0},
    {"tcp_send_buffer": 1000}, {"tcp_max_frame": 10}, {"queue": 0},
])
def test_settings_out_of_bounds_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LiteSettings(**bad)  # type: ignore[arg-type]


# -- end to end: aiortc browsers over one shared socket ---------------------------------


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


async def place_call(port: WorkerMediaPort) -> Call:
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
    """PCMU through the appliance's fast path: protect + the selected pair's send."""
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


def sockets(kind: str) -> list[str]:
    """Every UDP (`-u`) or listening TCP (`-lt`) socket in this namespace, one line each."""
    out = subprocess.run(["ss", f"-Hn{kind}ap"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.e2e
async def test_two_calls_share_one_udp_socket_and_one_tcp_listener() -> None:
    port = await WorkerMediaPort.open(HERE, 0, free_tcp_port())
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
            assert udp[2:8] == ["udp", udp[3], "127.0.0.1", str(port.udp_port), "typ", "host"]
            assert tcp[2:] == ["tcp", tcp[3], "127.0.0.1", str(port.tcp_port), "typ",
                               "host", "tcptype", "passive"]
            assert int(udp[3]) > int(tcp[3])
            assert f"a=ice-ufrag:{call.conn.local_username}" in media
            browser_ice = call.browser.getTransceivers()[0].receiver.transport.transport
            assert browser_ice._connection.remote_is_lite
            pair = call.conn._nominated[1]
            assert isinstance(pair, UdpPair) and pair.remote_addr == call.browser_addr
            assert pair.path == ("udp", *call.browser_addr)
        assert calls[0].browser_addr != calls[1].browser_addr

        await asyncio.gather(*(send_audio(call, 60) for call in calls))
        await _eventually(lambda: all(c.frames >= 40 for c in calls), 5, "frames decoded")
        for call in calls:
            assert call.fast is not None
            assert call.fast.sent == 60 and call.fast.received >= 40  # the browser's audio
            assert call.fast.unprotect_errors == 0
        # One UDP socket for both appliance calls; the browsers have their own.
        udp = sockets("u")
        ours = [s for s in udp if f":{port.udp_port} " in s]
        assert len(ours) == 1, udp
        browser_ports = {c.browser_addr[1] for c in calls}
        others = [s for s in udp if f":{port.udp_port} " not in s]
        assert all(any(f":{p} " in s for s in others) for p in browser_ports), udp
        listening = sockets("lt")
        assert len([s for s in listening if f":{port.tcp_port} " in s]) == 1, listening
        stats = port.stats()
        assert stats["valid_checks"] >= 4 and stats["unknown_path_drops"] == 0
        assert stats["calls"] == 2 and stats["tcp_accepted"] == 0  # aioice has no TCP
    finally:
        for call in calls:
            await hang_up(call)
        assert port.calls == 0  # every closed call left the agent
        port.close()


@pytest.mark.e2e
async def test_strangers_get_at_most_an_unsigned_401_and_the_call_goes_on() -> None:
    port = await WorkerMediaPort.open(HERE, 0, 0)
    call = await place_call(port)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.bind(("127.0.0.1", 0))
        stranger.setblocking(False)
        target = ("127.0.0.1", port.udp_port)
        ufrag, remote = call.conn.local_username, str(call.conn.remote_username)
        hostile = [
            # The live call's ufrags (on-path strangers can read them), not its password.
            check(ufrag, "wrong0password000000000", nominate=True, remote=remote),
            # Its password too, but not the browser's ufrag: still nobody's check.
            check(ufrag, call.conn.local_password, nominate=True),
            check("nobodyAAAAAAAAAA", "wrong0password000000000", nominate=True),
            b"\x00\x01\x00\x00" + os.urandom(40),
            b"\x17\xfe\xfd" + os.urandom(60),  # DTLS-looking, from nobody's path
            b"\x80\x00" + os.urandom(100),  # SRTP-looking
            b"\x01" * 1600,  # over the datagram bound
        ]
        for data in hostile:
            stranger.sendto(data, target)
        await send_audio(call, 30)
        answers = []
        with contextlib.suppress(BlockingIOError):
            while True:
                answers.append(stun.parse_message(stranger.recv(2048)))
        # RFC 8489 section 9.1.3: a check we cannot authenticate gets a 401, unsigned
        # (no key to sign with); nothing else is answered, nothing signed, no success.
        assert len(answers) == 3, answers
        for answer in answers:
            assert answer.message_class == stun.Class.ERROR
            assert answer.attributes["ERROR-CODE"][0] == 401
            assert "MESSAGE-INTEGRITY" not in answer.attributes
        stats = port.stats()
        assert stats["bad_integrity"] == 1 and stats["unknown_ufrag"] == 2
        assert stats["malformed"] == 1 and stats["unknown_path_drops"] == 2
        assert stats["udp_oversized"] == 1
        await _eventually(lambda: call.frames >= 20, 5, "frames after the strangers")
        assert call.appliance.connectionState == "connected"
        assert call.fast is not None and call.fast.unprotect_errors == 0
        assert call.conn._nominated[1].remote_addr == call.browser_addr  # nothing moved
    finally:
        stranger.close()
        await hang_up(call)
        port.close()


@contextlib.contextmanager
def udp_dropped_from(source_port: int) -> Iterator[None]:
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
    port = await WorkerMediaPort.open(HERE, 0, 0, LiteSettings(consent_timeout=2.0))
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
        # The last check got through up to one consent interval (0.6 s) before the drop;
        # the deadline fires on its own timer, not on a tick.
        assert 2.0 - 0.6 - 0.05 <= took <= 2.5, took
        # What the leg sees first is "failed" (then aiortc closes a pc whose DTLS closed).
        assert states[0] == "failed", states
        assert call.conn.failure == "consent expired"
        assert port.stats()["consent_lost"] == 1 and port.calls == 0
        assert call.conn._nominated == {}  # the fast path sends nothing more
        assert call.fast is not None
        sent = call.fast.sent
        call.fast.send_rtp(rtp.build(0, False, 1, 1, 1, b"\xff" * 160))
        assert call.fast.sent == sent
    finally:
        await hang_up(call)
        port.close()


@pytest.mark.e2e
async def test_an_answer_never_checked_fails_and_trickled_candidates_go_nowhere() -> None:
    port = await WorkerMediaPort.open(HERE, 0, 0, LiteSettings(connect_timeout=0.5))
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
        started = time.monotonic()
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
        assert 0.45 <= time.monotonic() - started <= 1.5
        stats = port.stats()
        assert conn.failure == "no nomination" and stats["no_nomination"] == 1
        assert stats["checks"] == 0 and port.calls == 0
        assert len([s for s in sockets("u") if f":{port.udp_port} " in s]) == 1
        assert port._timer is None  # nothing left to wait for: no timer runs at all
    finally:
        await browser.close()
        await appliance.close()
        port.close()


@pytest.mark.e2e
async def test_tcp_only_announces_only_the_tcp_candidate() -> None:
    port = await WorkerMediaPort.open(HERE, 0, free_tcp_port())
    udp_only = await WorkerMediaPort.open(HERE, 0, 0)
    browser = RTCPeerConnection(make_configuration([]))
    browser.addTransceiver("audio")
    await browser.setLocalDescription(await browser.createOffer())
    appliances = [RTCPeerConnection(make_configuration([])) for _ in range(2)]
    try:
        offer = RTCSessionDescription(offer_without_candidates(browser.localDescription.sdp),
                                      "offer")
        await appliances[0].setRemoteDescription(offer)
        (conn,) = await use_lite_transport(appliances[0], port, tcp_only=True)
        assert [c.transport for c in conn._candidates] == ["tcp"]
        await appliances[0].setLocalDescription(await appliances[0].createAnswer())
        lines = [x for x in appliances[0].localDescription.sdp.split("\r\n")
                 if x.startswith("a=candidate:")]
        assert len(lines) == 1 and lines[0].split()[2:] == [
            "tcp", lines[0].split()[3], "127.0.0.1", str(port.tcp_port), "typ", "host",
            "tcptype", "passive"], lines
        assert "c=IN IP4 127.0.0.1" in appliances[0].localDescription.sdp
        await appliances[1].setRemoteDescription(offer)
        with pytest.raises(ValueError):
            await use_lite_transport(appliances[1], udp_only, tcp_only=True)
    finally:
        await browser.close()
        for pc in appliances:
            await pc.close()
        port.close()
        udp_only.close()


@pytest.mark.e2e
async def test_a_port_that_is_taken_is_an_oserror_and_leaves_nothing_bound() -> None:
    def ours() -> list[str]:  # this process's UDP and listening TCP sockets (earlier
        # tests in the same process may have left their own behind: compare, not count)
        return sorted(sockets("u") + sockets("lt"))

    before = ours()
    tcp = free_tcp_port()
    port = await WorkerMediaPort.open(HERE, 0, tcp)
    try:
        opened = ours()
        assert len(opened) == len(before) + 2, opened  # one UDP socket, one listener
        with pytest.raises(OSError):
            await WorkerMediaPort.open(HERE, port.udp_port, free_tcp_port())
        with pytest.raises(OSError):
            await WorkerMediaPort.open(HERE, 0, tcp)  # its UDP socket bound first
        await asyncio.sleep(0)
        assert ours() == opened  # the failed opens closed what they had bound
    finally:
        port.close()
    await asyncio.sleep(0)
    assert ours() == before


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.e2e
async def test_an_ipv4_source_on_a_dual_stack_socket_is_itself() -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback in this namespace")
    port = await WorkerMediaPort.open([HostAddress("::", "127.0.0.1")], 0, 0)
    browser = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()

    async def receive() -> bytes:
        return await asyncio.wait_for(loop.sock_recv(browser, 2048), 2)

    try:
        conn = port.connection()
        browser.bind(("127.0.0.1", 0))
        browser.setblocking(False)
        browser.sendto(check(conn.local_username, conn.local_password, nominate=True),
                       ("127.0.0.1", port.udp_port))
        answer = stun.parse_message(await receive())
        assert answer.message_class == stun.Class.RESPONSE
        assert answer.check_message_integrity(conn.local_password.encode())
        # Not ::ffff:127.0.0.1: the browser knows itself by its IPv4 address.
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == browser.getsockname()
        pair = conn._nominated[1]
        assert pair.path == ("udp", *browser.getsockname())
        await conn.send(DTLS)  # and what the call sends reaches it
        assert await receive() == DTLS
        browser.sendto(DTLS + b"back", ("127.0.0.1", port.udp_port))
        assert await asyncio.wait_for(conn.recv(), 2) == DTLS + b"back"
    finally:
        browser.close()
        port.close()
