"""The SIP leg and the voice bridge, end to end: SDK caller -> appliance -> sipp desk phone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance_sdk import Call, MediaServerClient
from tests.e2e.audio_probe import TaggedAudioTrack, TagReader
from tests.e2e.conftest import free_udp_ports
from tests.sipp_runner import Sipp, start_sipp

pytestmark = pytest.mark.e2e

USERDATA = json.dumps({"id": "A123456789"})


async def desk_phone(tmp_path: Path, scenario: str) -> Sipp:
    """sipp as the agent's desk phone, echoing every RTP packet it receives."""
    return await start_sipp(
        f"desk/{scenario}", tmp_path, "-rtp_echo", "-mp", str(free_udp_ports(4)), timeout="40s"
    )


async def place_call(appliance: Any, **kwargs: Any) -> tuple[MediaServerClient, Call,
                                                               TaggedAudioTrack, TagReader]:
    client = await MediaServerClient.connect(appliance.url)
    track = TaggedAudioTrack()
    reader = TagReader()
    kwargs.setdefault("medium", 0)
    call = await client.make_video_call(5678, 9333, USERDATA, audio_track=track, **kwargs)
    call.frame_observers["audio"].append(reader)
    return client, call, track, reader


@contextlib.asynccontextmanager
async def desk_call(
    tmp_path: Path, aps: Any, make_appliance: Any, scenario: str,
    sip: dict[str, Any] | None = None, **call_kwargs: Any,
) -> AsyncIterator[tuple[Call, TaggedAudioTrack, TagReader, Sipp]]:
    """sipp as the desk phone, an appliance pointed at it, and an SDK call placed to it;
    everything is closed again however the test ends."""
    sipp = await desk_phone(tmp_path, scenario)
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address, **(sip or {})})
    client, call, track, reader = await place_call(appliance, **call_kwargs)
    try:
        yield call, track, reader, sipp
    finally:
        await client.close()
        sipp.kill()


async def sipp_ok(sipp: Sipp, timeout: float = 25) -> None:
    code = await sipp.exit_code(timeout)
    assert code == 0, sipp.diagnostics()


async def test_ring_then_answer_with_rtp_echo(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with desk_call(tmp_path, aps, make_appliance, "desk_echo.xml") as (
        call, track, reader, sipp
    ):
        await call.wait_for("dtls_connect", timeout=15)
        answer_sdp = (await call.wait_for("answer")).action.answer.sdp
        assert re.search(r"m=audio \d+ UDP/TLS/RTP/SAVPF 0\r\n", answer_sdp), answer_sdp
        # Ringing: the appliance's ringback tone reaches the browser before the answer.
        join = await call.wait_for("Join", timeout=10)
        assert join.action.medium == "audio" and join.action.type == "indication"
        assert join.action.channel == call.channel
        tone_frames = reader.loud_frames
        assert tone_frames > 25, "no ringback tone heard while the phone rang"
        assert not reader.arrivals, "our own audio came back before the phone answered"
        await asyncio.sleep(4)
        report = reader.report(track)
        print(f"echo through appliance + sipp: {report}")
        assert report.received > 150, report
        assert report.loss_pct < 2.0, report
        assert report.rtt_ms_median < 400, report
        await call.hangup()
        await sipp_ok(sipp)
    # The INVITE as the desk phone saw it.
    invite = sipp.messages.split("INVITE sip:", 1)[1].split("\n\n", 1)[0]
    roomkey = sqlite3.connect(aps.db_path).execute("SELECT roomkey FROM calls").fetchone()[0]
    uui = re.search(r"User-to-User: ([0-9a-f]+);encoding=hex", invite)
    assert uui is not None
    assert json.loads(bytes.fromhex(uui.group(1))) == {"roomkey": roomkey}
    assert re.search(r'From: "5678" <sip:5678@127\.0\.0\.1>;tag=', invite)
    assert re.search(r"To: <sip:9333@127\.0\.0\.1:\d+>", invite)
    assert "User-Agent: WebRTC Media Server" in invite
    row = sqlite3.connect(aps.db_path).execute(
        "SELECT answered_at IS NOT NULL, live FROM calls").fetchone()
    assert row[0] == 1


async def test_busy_desk_phone(tmp_path: Path, aps: Any, make_appliance: Any) -> None:
    async with desk_call(tmp_path, aps, make_appliance, "desk_busy.xml") as (
        call, _, _, sipp
    ):
        release = (await call.wait_for("release", timeout=15)).action
        assert release.cause == 17 and release.causestring == "user busy"
        await sipp_ok(sipp)


async def test_no_answer_cancels_with_cause_19(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with desk_call(tmp_path, aps, make_appliance, "desk_no_answer.xml",
                         sip={"ring_timeout": 2.0}) as (call, _, _, sipp):
        await call.wait_for("dtls_connect", timeout=15)
        started = time.monotonic()
        release = (await call.wait_for("release", timeout=10)).action
        assert (release.cause, release.causestring) == (19, "no answer")
        assert time.monotonic() - started < 4
        await sipp_ok(sipp)


async def test_early_media_reaches_the_browser_before_answer(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with desk_call(tmp_path, aps, make_appliance, "desk_early_media.xml") as (
        call, _track, reader, sipp
    ):
        await call.wait_for("dtls_connect", timeout=15)
        await call.wait_for("Join", timeout=10)
        joined = time.monotonic()
        early = [n for n, at in reader.arrivals.items() if at < joined]
        # 183 with SDP: the phone's media (here the echo of our voice) flowed before 200.
        assert len(early) > 40, f"only {len(early)} early-media frames before the answer"
        await call.hangup()
        await sipp_ok(sipp)


async def test_bye_from_the_phone_ends_the_call(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with desk_call(tmp_path, aps, make_appliance, "desk_phone_hangs_up.xml") as (
        call, _, _, sipp
    ):
        await call.wait_for("Join", timeout=15)
        leave = (await call.wait_for("Leave", timeout=10)).action
        assert leave.medium == "audio"
        release = (await call.wait_for("release", timeout=5)).action
        assert (release.cause, release.causestring) == (16, "normal release")
        await sipp_ok(sipp)


async def test_hold_and_resume_from_the_phone(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with desk_call(tmp_path, aps, make_appliance, "desk_hold.xml") as (
        call, _track, reader, sipp
    ):
        await call.wait_for("Join", timeout=15)
        answered = time.monotonic()
        release = (await call.wait_for("release", timeout=20)).action
        assert (release.cause, release.causestring) == (16, "normal release")
        arrivals = sorted(reader.arrivals.values())
        # Echo before hold (0..1.5 s), none while held (1.5..3 s), echo again after resume.
        before = [t for t in arrivals if t - answered < 1.3]
        held = [t for t in arrivals if 2.0 < t - answered < 2.8]
        after = [t for t in arrivals if t - answered > 3.6]
        assert len(before) > 20 and len(after) > 20, (len(before), len(after))
        assert len(held) < 5, len(held)
        await sipp_ok(sipp)


async def test_dtmf_both_ways(tmp_path: Path, aps: Any, make_appliance: Any) -> None:
    # RFC 4733 towards the phone; sipp echoes the events back, which is DTMF from the phone.
    async with desk_call(tmp_path, aps, make_appliance, "desk_echo.xml") as (
        call, _, _, sipp
    ):
        await call.wait_for("Join", timeout=15)
        await asyncio.sleep(0.3)
        for key in "5#":
            await call.send_dtmf(key)
            echoed = (await call.wait_for("DTMF", timeout=5)).action
            assert echoed.value == key and echoed.channel == call.channel
            await asyncio.sleep(0.5)
        await call.hangup()
        await sipp_ok(sipp)
    # What the phone got: telephone-event packets are in sipp's RTP echo, not its SIP log;
    # the round trip above is the proof. SIP INFO from the phone is the other way:
    async with desk_call(tmp_path, aps, make_appliance, "desk_info_dtmf.xml") as (
        call, _, _, sipp
    ):
        await call.wait_for("Join", timeout=15)
        key = (await call.wait_for("DTMF", timeout=5)).action
        assert key.value == "7"
        await call.hangup()
        await sipp_ok(sipp)


async def test_opus_caller_gets_two_way_audio(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    async with desk_call(tmp_path, aps, make_appliance, "desk_echo.xml", audio="OPUS") as (
        call, _track, reader, sipp
    ):
        answer_sdp = (await call.wait_for("answer", timeout=15)).action.answer.sdp
        assert re.search(r"a=rtpmap:\d+ opus/48000/2", answer_sdp)
        assert "PCMU" not in answer_sdp
        await call.wait_for("Join", timeout=15)
        before = reader.loud_frames
        await asyncio.sleep(3)
        # Our tone went Opus -> PCMU to the phone, came back PCMU -> Opus: sound, not silence.
        assert reader.loud_frames - before > 100, (before, reader.loud_frames)
        await call.hangup()
        await sipp_ok(sipp)
