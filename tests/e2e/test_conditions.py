"""System messages from what the appliance measures: congestion, delay, a silent microphone."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiortc.mediastreams import AudioStreamTrack

from appliance_sdk import Call, MediaServerClient
from tests.e2e.conftest import eventually
from tests.e2e.impaired_link import impair
from tests.e2e.test_voice import desk_phone, sipp_ok

pytestmark = pytest.mark.e2e

USERDATA = json.dumps({"id": "A123456789"})
FAST = {"hold_s": 1.0, "clear_s": 2.0, "silent_mic_s": 2.0}
ENGLISH = {"language": "en", "level": "warning", "position": "top", "displaytime": 5}


async def message_ids(call: Call, timeout: float) -> set[int]:
    """Message ids that arrive on `call` within `timeout` seconds."""
    ids: set[int] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            event = await call.wait_for("message", timeout=remaining)
        except TimeoutError:
            break
        ids.add(int(event.action.message.split()[0]))
        assert event.action.level == "warning" and event.action.position == "top"
    return ids


async def wait_message(call: Call, wanted: int, timeout: float = 12) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
        event = await call.wait_for("message", timeout=remaining)
        if int(event.action.message.split()[0]) == wanted:
            return
    raise AssertionError(f"no message {wanted}")


async def room_with_agent(aps: Any, appliance: Any) -> tuple[MediaServerClient, Call, Call]:
    client = await MediaServerClient.connect(appliance.url)
    user = await client.make_video_call(5678, 9333, USERDATA, medium=2)
    await user.wait_for("Join", timeout=20)
    roomkey = sqlite3.connect(aps.db_path).execute("SELECT roomkey FROM calls").fetchone()[0]
    agent = await client.join_room(roomkey)
    await agent.wait_for("dtls_connect", timeout=15)
    await eventually(lambda: user.frames_received.get("video", 0) > 10, 10)
    return client, user, agent


async def test_congested_agent_camera_pauses_its_video_and_voice_goes_on(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address}, conditions=FAST,
                               messages=ENGLISH)
    client, user, agent = await room_with_agent(aps, appliance)
    try:
        link = impair(agent.pc)
        link.send_loss = 0.35
        await wait_message(agent, 503)
        await wait_message(user, 504)
        # Video from the agent stops reaching the customer; the customer's voice does not.
        await asyncio.sleep(1.0)
        video, audio = user.frames_received.get("video", 0), user.frames_received["audio"]
        await asyncio.sleep(1.5)
        assert user.frames_received.get("video", 0) - video <= 2
        assert user.frames_received["audio"] - audio > 50
        link.clear()
        await wait_message(agent, 520)
        await wait_message(user, 520)
        await eventually(lambda: user.frames_received.get("video", 0) > video + 10, 8)
        await user.hangup()
        await sipp_ok(sipp)
    finally:
        await client.close()
        sipp.kill()


async def test_delay_and_downlink_congestion_of_the_customer(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address}, conditions=FAST,
                               messages=ENGLISH)
    client, user, agent = await room_with_agent(aps, appliance)
    try:
        link = impair(user.pc)
        link.send_jitter_s = 0.5  # the customer's uplink delays packets unevenly
        await wait_message(user, 501)
        await wait_message(agent, 502)
        link.clear()
        await wait_message(user, 520)
        link.receive_loss = 0.4  # now the customer's downlink loses what we send it
        await wait_message(user, 505, timeout=12)
        await wait_message(agent, 506)
        link.clear()
        await wait_message(user, 520, timeout=15)
        await user.hangup()
        await sipp_ok(sipp)
    finally:
        await client.close()
        sipp.kill()


async def test_silent_microphone_gets_510(tmp_path: Path, aps: Any, make_appliance: Any) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address}, conditions=FAST,
                               messages=ENGLISH)
    async with await MediaServerClient.connect(appliance.url) as client:
        silent = await client.make_video_call(5678, 9333, USERDATA, medium=0,
                                              audio_track=AudioStreamTrack())
        await silent.wait_for("dtls_connect", timeout=15)
        event = await silent.wait_for("message", timeout=10)
        assert event.action.message.startswith("510 No sound is reaching us")
        await silent.hangup()
    await sipp_ok(sipp)
    # A caller whose microphone works never gets it.
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address}, conditions=FAST,
                               messages=ENGLISH)
    async with await MediaServerClient.connect(appliance.url) as client:
        talking = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        await talking.wait_for("dtls_connect", timeout=15)
        assert 510 not in await message_ids(talking, 4)
        await talking.hangup()
    await sipp_ok(sipp)
