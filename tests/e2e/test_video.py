"""The agent's video leg with the SDK on both sides: room join, relay, feedback, quality."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appliance_sdk import Call, MediaServerClient
from tests.e2e.conftest import eventually
from tests.e2e.test_voice import desk_phone, sipp_ok

pytestmark = pytest.mark.e2e

USERDATA = json.dumps({"id": "A123456789"})


def status(appliance: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{appliance.admin_url}/status", timeout=5) as response:
        return json.load(response)


def roomkey_of(aps: Any, call: Call) -> int:
    row = sqlite3.connect(aps.db_path).execute(
        "SELECT roomkey FROM calls WHERE dialogid=? AND ref=?", (call.dialogid, call.ref)
    ).fetchone()
    return int(row[0])


def count_keyframes_sent(call: Call) -> list[int]:
    """Counts keyframes the SDK's video sender is asked for (by PLI/FIR from the MS)."""
    sender = next(s for s in call.pc.getSenders() if s.track and s.track.kind == "video")
    counter = [0]
    original = sender._send_keyframe

    def counting() -> None:
        counter[0] += 1
        original()

    sender._send_keyframe = counting  # type: ignore[method-assign]
    return counter


async def test_unknown_roomkey_is_refused(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with await MediaServerClient.connect(appliance.url) as agent:
        call = await agent.join_room(123456789012)
        release = (await call.wait_for("release")).action
        assert (release.cause, release.causestring) == (21, "invalid roomkey")
        assert release.channel == 0


async def test_agent_joins_and_video_is_relayed_without_decoding(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address})
    customer = await MediaServerClient.connect(appliance.url)
    agent_client = await MediaServerClient.connect(appliance.url)
    try:
        user = await customer.make_video_call(5678, 9333, USERDATA, medium=2)
        await user.wait_for("Join", timeout=20)  # the desk phone answered
        keyframes = count_keyframes_sent(user)
        roomkey = roomkey_of(aps, user)

        agent = await agent_client.join_room(roomkey)
        await agent.wait_for("dtls_connect", timeout=15)
        video_join = (await user.wait_for("Join", timeout=5)).action
        assert (video_join.medium, video_join.peerchannel) == ("video", agent.channel)
        agent_join = (await agent.wait_for("Join", timeout=5)).action
        assert agent_join.peerchannel == user.channel
        # Same worker as the customer's call: the room's video never crosses processes.
        placed = {c["channel"]: c["worker"] for c in status(appliance)["calls"]}
        assert placed[agent.channel] == placed[user.channel]

        # A second agent page for the same room is refused, the first stays.
        intruder = await agent_client.join_room(roomkey)
        refused = (await intruder.wait_for("release")).action
        assert refused.causestring == "room already has an agent"

        # Both sides decode the other's camera (their own aiortc decoders, not ours).
        await eventually(lambda: agent.frames_received.get("video", 0) > 20, 10)
        await eventually(lambda: user.frames_received.get("video", 0) > 20, 10)

        # PLI from the agent's receiver reaches the customer's encoder as a keyframe request.
        await asyncio.sleep(1.2)  # past the 1/s limit of the join-time request
        before = keyframes[0]
        receiver = next(t.receiver for t in agent.pc.getTransceivers() if t.kind == "video")
        stats = await receiver.getStats()
        media_ssrc = next(s.ssrc for s in stats.values() if s.type == "inbound-rtp")
        await receiver._send_rtcp_pli(media_ssrc)
        await eventually(lambda: keyframes[0] > before, 3)

        # App data both ways.
        await user.send_peerdata("hello agent", value="v1")
        got = (await agent.wait_for("peerdata", timeout=5)).action
        assert (got.type, got.peerdata, got.value, got.peerchannel) == (
            "command", "hello agent", "v1", user.channel)
        await agent.send_peerdata("hello customer")
        got = (await user.wait_for("peerdata", timeout=5)).action
        assert (got.peerdata, got.peerchannel) == ("hello customer", agent.channel)

        # Quality every 5 s, from the forwarded packets.
        mine = (await user.wait_for("my_resolution", timeout=12)).action
        peer = (await user.wait_for("peer_resolution", timeout=2)).action
        print("my_resolution", mine, "peer", peer)
        assert (mine.width, mine.height) == (320, 240), mine
        assert mine.video_bitrate > 0 and mine.framerate > 5 and mine.audio_bitrate > 0, mine
        assert mine.channel == user.channel and peer.channel == agent.channel
        assert peer.width == 320 and peer.audio_bitrate > 0, peer  # agent video + phone voice
        agent_mine = (await agent.wait_for("my_resolution", timeout=6)).action
        assert agent_mine.video_bitrate > 0 and agent_mine.channel == agent.channel

        # The worker relayed hundreds of packets and created no decoder. The counts are the
        # workers' last report (once a second): wait for the one that passes the mark.
        await eventually(lambda: sum(w["packets_received"]
                                     for w in status(appliance)["workers"]) > 500, 10)
        workers = status(appliance)["workers"]
        assert all(w["decoders_created"] == 0 for w in workers), workers

        # The agent leaves: the customer is told, the voice goes on.
        await agent.hangup()
        leave = (await user.wait_for("Leave", timeout=5)).action
        assert leave.medium == "video"
        await asyncio.sleep(1)
        assert not user.ended

        # A new agent page can join again; then the customer hangs up and it is released.
        again = await agent_client.join_room(roomkey)
        await again.wait_for("dtls_connect", timeout=15)
        await user.hangup()
        assert (await again.wait_for("Leave", timeout=5)).action.peerchannel == user.channel
        release = (await again.wait_for("release", timeout=5)).action
        assert (release.cause, release.causestring) == (16, "normal release")
        await sipp_ok(sipp)
    finally:
        await customer.close()
        await agent_client.close()
        sipp.kill()
