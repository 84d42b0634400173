"""aiortc/aioice private hooks: this test fails the day one of them moves."""

import asyncio
import contextlib

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamError

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
