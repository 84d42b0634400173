"""aiortc/aioice private hooks: this test fails the day one of them moves."""

import asyncio
import contextlib
import time

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamError

from appliance import native
from appliance.edges.lite_transport import LiteConnection
from appliance.edges.rtc_adapter import (
    CandidatePolicy,
    HostAddress,
    SilentTrack,
    SrtpFastPath,
    apply_candidate_policy,
    check_hooks,
    make_configuration,
    sender_ssrc,
    srtp_keys,
)
from appliance.media import rtp


async def test_private_hooks_are_where_we_expect_them() -> None:
    check_hooks()


def test_host_address_forms() -> None:
    assert HostAddress.parse("127.0.0.1") == HostAddress("127.0.0.1", "127.0.0.1")
    assert HostAddress.parse("10.0.0.5=203.0.113.7") == HostAddress("10.0.0.5", "203.0.113.7")
    with pytest.raises(ValueError):
        HostAddress.parse("not-an-address")


def test_configuration_never_falls_back_to_a_public_stun_server() -> None:
    assert make_configuration([]).iceServers == []


async def test_gathers_exactly_the_policy_addresses_in_the_port_range() -> None:
    pc = RTCPeerConnection(make_configuration([]))
    pc.addTransceiver("audio")
    apply_candidate_policy(pc, CandidatePolicy.from_strings(["127.0.0.1"], 47000, 47010))
    await pc.setLocalDescription(await pc.createOffer())
    lines = [ln for ln in pc.localDescription.sdp.splitlines() if ln.startswith("a=candidate")]
    await pc.close()
    assert len(lines) == 1
    fields = lines[0].split()
    assert fields[4] == "127.0.0.1" and 47000 <= int(fields[5]) <= 47010
    await asyncio.sleep(0)


async def test_announced_address_differs_from_bound_one_behind_nat() -> None:
    pc = RTCPeerConnection(make_configuration([]))
    pc.addTransceiver("audio")
    apply_candidate_policy(pc, CandidatePolicy.from_strings(["127.0.0.1=192.0.2.10"]))
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    assert " 192.0.2.10 " in sdp and " 127.0.0.1 " not in sdp.split("a=candidate", 1)[1]


async def test_check_hooks_also_checks_the_lite_transport(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # aiortc's RTCIceTransport awaits get_event(): a LiteConnection without it must fail here.
    monkeypatch.delattr(LiteConnection, "get_event")
    with pytest.raises(AssertionError, match="get_event"):
        check_hooks()


async def test_the_fast_path_sends_on_aioices_pair_and_the_browser_decodes() -> None:
    # Today's default transport: aioice's nominated CandidatePair has no send(), so the fast
    # path sends on a dup of its socket (run in the loopback-only namespace: it connects).
    policy = CandidatePolicy.from_strings(["127.0.0.1"])
    browser, ours = (RTCPeerConnection(make_configuration([])) for _ in range(2))
    transceiver = browser.addTransceiver("audio", direction="sendrecv")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                     if c.mimeType == "audio/PCMU"])
    apply_candidate_policy(browser, policy)
    frames = 0

    async def count_frames() -> None:
        nonlocal frames
        with contextlib.suppress(MediaStreamError):
            while True:
                await transceiver.receiver.track.recv()
                frames += 1

    counter = None
    fast = None
    try:
        await browser.setLocalDescription(await browser.createOffer())
        await ours.setRemoteDescription(browser.localDescription)
        ours.addTrack(SilentTrack("audio"))
        apply_candidate_policy(ours, policy)
        await ours.setLocalDescription(await ours.createAnswer())
        await browser.setRemoteDescription(ours.localDescription)
        for _ in range(500):
            if ours.connectionState == browser.connectionState == "connected":
                break
            await asyncio.sleep(0.01)
        assert ours.connectionState == "connected"
        counter = asyncio.create_task(count_frames())
        fast = SrtpFastPath(ours, on_rtp=lambda packet: None)
        assert not hasattr(fast._conn._nominated[1], "send")  # aioice's own pair
        ssrc = sender_ssrc(ours, "audio")
        for seq in range(40):
            fast.send_rtp(rtp.build(0, seq == 0, seq, seq * 160, ssrc, b"\xff" * 160))
            await asyncio.sleep(0.02)
        for _ in range(100):
            if frames >= 25:
                break
            await asyncio.sleep(0.02)
        assert fast.sent == 40 and frames >= 25, frames
    finally:
        if counter is not None:
            counter.cancel()
        if fast is not None:
            fast.detach()
        await browser.close()
        await ours.close()


async def test_the_fast_path_takes_exactly_what_demux_calls_srtp() -> None:
    # A datagram of every first byte, from the browser's own nominated socket to ours over
    # loopback (aioice's StunProtocol passes what is not STUN on to the wrapped
    # data_received): the 64 of demux's SRTP range reach SRTP (and fail authentication,
    # counted), the 192 others go to aiortc, and the call still decodes afterwards.
    policy = CandidatePolicy.from_strings(["127.0.0.1"])
    browser, ours = (RTCPeerConnection(make_configuration([])) for _ in range(2))
    transceiver = browser.addTransceiver("audio", direction="sendrecv")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                     if c.mimeType == "audio/PCMU"])
    apply_candidate_policy(browser, policy)
    frames = 0

    async def count_frames() -> None:
        nonlocal frames
        with contextlib.suppress(MediaStreamError):
            while True:
                await transceiver.receiver.track.recv()
                frames += 1

    counter = fast = None
    try:
        await browser.setLocalDescription(await browser.createOffer())
        await ours.setRemoteDescription(browser.localDescription)
        ours.addTrack(SilentTrack("audio"))
        apply_candidate_policy(ours, policy)
        await ours.setLocalDescription(await ours.createAnswer())
        await browser.setRemoteDescription(ours.localDescription)
        for _ in range(500):
            if ours.connectionState == browser.connectionState == "connected":
                break
            await asyncio.sleep(0.01)
        assert ours.connectionState == "connected"
        relayed: list[bytes] = []
        fast = SrtpFastPath(ours, on_rtp=relayed.append)
        chained: list[int] = []
        inner = fast._chain
        fast._chain = lambda data, component: (chained.append(data[0]), inner(data, component))
        pair = browser.getTransceivers()[0].receiver.transport.transport._connection._nominated[1]
        ours_addr = pair.remote_addr
        for first in range(256):
            pair.protocol.transport.sendto(bytes([first, 0]) + bytes(38), ours_addr)
        for _ in range(200):
            if len(chained) + fast.unprotect_errors >= 256:
                break
            await asyncio.sleep(0.01)
        assert fast.unprotect_errors == 64 and relayed == []
        assert sorted(chained) == [b for b in range(256) if not 128 <= b <= 191]
        counter = asyncio.create_task(count_frames())
        ssrc = sender_ssrc(ours, "audio")
        for seq in range(30):
            fast.send_rtp(rtp.build(0, seq == 0, seq, seq * 160, ssrc, b"\xff" * 160))
            await asyncio.sleep(0.02)
        for _ in range(100):
            if frames >= 15:
                break
            await asyncio.sleep(0.02)
        assert frames >= 15, frames
    finally:
        if counter is not None:
            counter.cancel()
        if fast is not None:
            fast.detach()
        await browser.close()
        await ours.close()


def test_a_use_auth_secret_entry_never_reaches_aiortc() -> None:
    # [media] ice_servers as the workers get it: the secret-file TURN entry is the pages'
    # credential source, not a server to log in to; a STUN entry and static TURN stay.
    config = make_configuration([
        {"urls": ["turn:127.0.0.1:3478?transport=tcp"], "username": None,
         "credential": None, "secret_file": "/etc/appliance/turn.secret", "ttl": 600},
        {"urls": "stun:127.0.0.1:3478", "username": None, "credential": None,
         "secret_file": "", "ttl": 600},
        {"urls": "turn:127.0.0.1:3479", "username": "u", "credential": "c"},
    ])
    assert [s.urls for s in config.iceServers] == ["stun:127.0.0.1:3478",
                                                   "turn:127.0.0.1:3479"]
    assert config.iceServers[1].username == "u" and config.iceServers[1].credential == "c"


def test_the_gather_timeout_is_bounded() -> None:
    for bad in (0, -1, 31):
        with pytest.raises(ValueError):
            CandidatePolicy(addresses=(), gather_timeout=bad)


class _SilentTurnServer(asyncio.DatagramProtocol):
    """A TURN server's address on loopback that never answers: what arrives is kept."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)


async def _offer_candidates(policy: CandidatePolicy, turn_url: str) -> tuple[list[str], float]:
    pc = RTCPeerConnection(make_configuration([
        {"urls": turn_url, "username": "user", "credential": "pass"}]))
    try:
        pc.addTransceiver("audio")
        apply_candidate_policy(pc, policy)
        started = time.monotonic()
        await pc.setLocalDescription(await pc.createOffer())
        took = time.monotonic() - started
        return [ln for ln in pc.localDescription.sdp.splitlines()
                if ln.startswith("a=candidate")], took
    finally:
        await pc.close()


async def test_relay_gathering_only_where_the_policy_says_and_never_past_its_timeout() -> None:
    # Loopback only: the "TURN server" is a silent socket of ours. Without `relay` (the
    # workers' policy) it is never contacted; with it (the SDK's) an Allocate is sent, and
    # gathering gives up at gather_timeout with the host candidate alone.
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        _SilentTurnServer, local_addr=("127.0.0.1", 0))
    try:
        url = f"turn:127.0.0.1:{transport.get_extra_info('sockname')[1]}?transport=udp"
        lines, _ = await _offer_candidates(
            CandidatePolicy.from_strings(["127.0.0.1"]), url)
        await asyncio.sleep(0.2)
        assert len(lines) == 1 and " typ host" in lines[0] and server.received == []

        policy = CandidatePolicy(CandidatePolicy.from_strings(["127.0.0.1"]).addresses,
                                 relay=True, gather_timeout=0.5)
        lines, took = await _offer_candidates(policy, url)
        assert len(lines) == 1 and " typ host" in lines[0], lines
        assert 0.5 <= took < 2.0, took
        assert server.received and server.received[0][:2] == b"\x00\x03"  # Allocate request
    finally:
        transport.close()


@pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)
async def test_srtp_keys_give_native_sessions_that_speak_with_aiortcs() -> None:
    """The keys re-derived from a real DTLS handshake (srtp_keys) make native sessions
    equal to aiortc's own: each side's native tx is unprotected by the other side's aiortc
    rx, and the profile is the one negotiated (run in the loopback-only namespace)."""
    policy = CandidatePolicy.from_strings(["127.0.0.1"])
    a, b = (RTCPeerConnection(make_configuration([])) for _ in range(2))
    a.addTransceiver("audio", direction="sendrecv")
    apply_candidate_policy(a, policy)
    m = native.module()
    try:
        with pytest.raises(RuntimeError):
            srtp_keys(a)  # no DTLS yet
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        b.addTrack(SilentTrack("audio"))
        apply_candidate_policy(b, policy)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        for _ in range(500):
            if a.connectionState == b.connectionState == "connected":
                break
            await asyncio.sleep(0.01)
        assert a.connectionState == b.connectionState == "connected"
        keys_a, keys_b = srtp_keys(a), srtp_keys(b)
        assert keys_a.tx == keys_b.rx and keys_a.rx == keys_b.tx and keys_a.tx != keys_a.rx
        assert keys_a.profile == keys_b.profile == m.PROFILE_AEAD_AES_256_GCM  # aiortc's 1st
        packet = rtp.build(96, False, 7, 1234, 0x5151, b"\x10" + bytes(300))
        for sender, sent_with, receiver, received_with in ((a, keys_a, b, keys_b),
                                                           (b, keys_b, a, keys_a)):
            # Native out, aiortc in; then aiortc out, native in.
            native_tx = m.Srtp(sent_with.profile, sent_with.tx, True)
            aiortc_rx = receiver.getTransceivers()[0].receiver.transport._rx_srtp
            assert aiortc_rx.unprotect(native_tx.protect(packet)) == packet
            aiortc_tx = sender.getTransceivers()[0].sender.transport._tx_srtp
            native_rx = m.Srtp(received_with.profile, received_with.rx, False)
            other = rtp.build(96, False, 9, 1, 0x6262, b"\x10" + bytes(50))
            assert native_rx.unprotect(aiortc_tx.protect(other)) == other
    finally:
        await a.close()
        await b.close()
