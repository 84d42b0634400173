"""Janus as the bench will drive it (bench/janus.py): one VP8 echo stream through
janus.plugin.echotest and one PCMU call through janus.plugin.sip to the sipp desk phone
(bench/desk.py), media sent and counted with `SrtpFastPath` as the bench's callers do.
Every packet stays on 127.0.0.1:

    tests/in-loopback-netns.sh .venv/bin/python -m pytest -q tests/bench/test_janus.py
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from appliance.edges.rtc_adapter import SilentTrack, SrtpFastPath, sender_ssrc
from bench import janus, system
from bench.caller import CALLEE, CALLER, payload_types
from bench.desk import DeskPhones, start_desk_phones
from bench.media_cache import VideoParams, load_or_make_clip, load_or_make_pcmu
from bench.pacer import Pacer, TxAudio, TxVideo
from tests.sipp_runner import free_udp_port

if not janus.INSTALLED:
    pytest.skip(janus.WHY_NOT, allow_module_level=True)

pytestmark = pytest.mark.timeout(60)

ECHOED = 20  # packets that must come back on each stream


@pytest.fixture(autouse=True)
def _require_loopback_netns() -> None:
    if not system.loopback_only():
        pytest.fail("this test moves media: run it in the loopback-only network namespace "
                    "(tests/in-loopback-netns.sh)")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[janus.JanusServer]:
    base = random.randrange(20000, 30000, 2)
    existed = await janus.link_exists(janus.ICE_INTERFACE)
    started = await janus.JanusServer.start(tmp_path / "janus", None, free_tcp_port(),
                                            (base, base + 199))
    assert await janus.link_exists(janus.ICE_INTERFACE)
    try:
        yield started
    finally:
        await started.stop()
    # The device goes with the last server that needed it (one made by someone else stays).
    assert await janus.link_exists(janus.ICE_INTERFACE) == existed


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[DeskPhones]:
    phones = await start_desk_phones(tmp_path / "desk", calls=1, media_port=free_udp_port(),
                                     cores=None)
    try:
        yield phones
    finally:
        await phones.stop()


def candidates(sdp: str) -> list[str]:
    return re.findall(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", sdp, re.MULTILINE)


class Meter:
    """What comes back on one leg: packets by payload type, and their SSRCs."""

    def __init__(self) -> None:
        self.by_pt: Counter[int] = Counter()
        self.ssrcs: set[int] = set()

    def __call__(self, packet: bytes) -> None:
        self.by_pt[packet[1] & 0x7F] += 1
        self.ssrcs.add(int.from_bytes(packet[8:12], "big"))


async def connected(pc: RTCPeerConnection, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pc.connectionState != "connected":
        assert pc.connectionState not in ("failed", "closed"), pc.connectionState
        assert time.monotonic() < deadline, f"not connected: {pc.connectionState}"
        await asyncio.sleep(0.02)


async def test_echotest_and_sip_call_echo_rtp_through_janus(
        tmp_path: Path, server: janus.JanusServer, desk: DeskPhones) -> None:
    cache = tmp_path / "media"
    clip = load_or_make_clip(cache, VideoParams(seconds=1, keyframe_interval=15))
    voice = load_or_make_pcmu(cache)
    info = await server.info()
    assert {janus.ECHOTEST, janus.SIP} == set(info["plugins"])
    assert set(info["transports"]) == {"janus.transport.http"}

    video_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    audio_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    tracks = [SilentTrack("video"), SilentTrack("audio")]
    video_pc.addTransceiver(tracks[0], direction="sendrecv")
    audio_pc.addTransceiver(tracks[1], direction="sendrecv")
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    paths: list[SrtpFastPath] = []
    session = await janus.JanusSession.create(server.url)
    handles: list[int] = []
    try:
        handles.append(await janus.echotest_call(session, video_pc))
        handles.append(await janus.sip_call(
            session, audio_pc, f"sip:{CALLEE}@127.0.0.1:{desk.port}",
            f"sip:{CALLER}@127.0.0.1"))
        for pc in (video_pc, audio_pc):
            # Janus gathered on 127.0.0.1 only (its ICE device), and so did we.
            assert set(candidates(pc.remoteDescription.sdp)) == {"127.0.0.1"}
            assert set(candidates(pc.localDescription.sdp)) == {"127.0.0.1"}
        await asyncio.gather(connected(video_pc), connected(audio_pc))
        assert system.loopback_only()

        vp8 = payload_types(video_pc.remoteDescription.sdp)["video"]["VP8"]
        pcmu = payload_types(audio_pc.remoteDescription.sdp)["audio"]["PCMU"]
        assert pcmu == 0
        video_rx, audio_rx = Meter(), Meter()
        video_fast = SrtpFastPath(video_pc, video_rx)
        audio_fast = SrtpFastPath(audio_pc, audio_rx)
        paths += [video_fast, audio_fast]
        rng = random.Random(7)
        now = loop.time()
        video_tx = TxVideo(video_fast.send_rtp, sender_ssrc(video_pc, "video"), vp8,
                           clip.frames, clip.params.fps, now, rng)
        audio_tx = TxAudio(audio_fast.send_rtp, sender_ssrc(audio_pc, "audio"), pcmu, voice,
                           160, now, rng)
        pacer.add(video_tx)
        pacer.add(audio_tx)
        pacer.start()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and (video_rx.by_pt[vp8] <= 3 * ECHOED
                                               or audio_rx.by_pt[pcmu] <= 3 * ECHOED):
            await asyncio.sleep(0.1)
        pacer.stop()

        detail = (f"video sent {video_tx.sent} back {dict(video_rx.by_pt)}; audio sent "
                  f"{audio_tx.sent} back {dict(audio_rx.by_pt)}; sipp: {desk.errors()}")
        assert video_rx.by_pt[vp8] > ECHOED, detail
        assert audio_rx.by_pt[pcmu] > ECHOED, detail
        assert video_fast.unprotect_errors == audio_fast.unprotect_errors == 0, detail
        # Janus sends the echo on the SSRCs it announced in its answers, not ours.
        for pc, rx in ((video_pc, video_rx), (audio_pc, audio_rx)):
            announced = {int(s) for s in re.findall(r"^a=ssrc:(\d+) ",
                                                    pc.remoteDescription.sdp, re.MULTILINE)}
            assert rx.ssrcs <= announced, (rx.ssrcs, announced)
        assert session.webrtc_up(handles[0]) and session.webrtc_up(handles[1])
    finally:
        pacer.stop()
        for path in paths:
            path.detach()
        for handle in handles:
            await janus.hangup(session, handle)
        await session.close()
        for pc in (video_pc, audio_pc):
            with contextlib.suppress(Exception):
                await pc.close()
        for track in tracks:
            track.stop()
    # The desk phone got its BYE: sipp finished its one call.
    await asyncio.wait_for(desk.proc.wait(), 10)
    assert desk.proc.returncode == 0, desk.errors()
