"""The User call up to DTLS against the real appliance processes and the reference AP-S."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from typing import Any

import pytest

from appliance.core import protocol as p
from appliance_sdk import Call, MediaServerClient
from tests.e2e.conftest import eventually, free_port

pytestmark = pytest.mark.e2e

USERDATA = json.dumps({"id": "A123456789"})


async def connect(appliance: Any) -> MediaServerClient:
    return await MediaServerClient.connect(appliance.url)


async def call_up(client: MediaServerClient, **kwargs: Any) -> Call:
    kwargs.setdefault("medium", 0)
    call = await client.make_video_call(5678, 9333, kwargs.pop("userdata", USERDATA), **kwargs)
    await call.wait_for("dtls_connect", timeout=15)
    return call


async def next_unrouted(client: MediaServerClient, timeout: float = 5) -> p.Release:
    event = await asyncio.wait_for(client.unrouted.get(), timeout)
    assert isinstance(event.action, p.Release), event
    return event.action


async def remote_packets_received(call: Call) -> int:
    """What the appliance says (RTCP receiver reports) it received of our audio."""
    sender = call.pc.getSenders()[0]
    stats = await sender.getStats()
    for stat in stats.values():
        if stat.type == "remote-inbound-rtp":
            return int(stat.packetsReceived)
    return 0


async def test_sdk_call_reaches_dtls_connect(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with await connect(appliance) as client:
        started = time.monotonic()
        call = await client.make_video_call(5678, 9333, USERDATA, medium=2)
        alert = await call.wait_for("alert")
        answer = await call.wait_for("answer")
        ice = await call.wait_for("ice")
        dtls = await call.wait_for("dtls_connect", timeout=15)
        setup = time.monotonic() - started
        print(f"offer -> DTLSconnect on loopback: {setup * 1000:.0f} ms")
        channel = alert.action.channel
        assert channel >= 1
        for event in (alert, answer, ice, dtls):
            assert (event.action.dialogid, event.action.ref) == (call.dialogid, call.ref)
            assert event.action.channel == channel
        assert answer.action.medium == 2 and answer.action.answer.type == "answer"
        assert " 127.0.0.1 " in ice.action.ice.candidate
        assert dtls.action.medium == "video"
        # AP-S holds the call-detail record with this appliance's id and channel.
        rows = sqlite3.connect(aps.db_path).execute(
            "SELECT appliance_id, channel, caller, callee, live FROM calls"
        ).fetchall()
        assert rows == [("ms-test", channel, 5678, 9333, 1)]
        await call.hangup()
        await eventually(
            lambda: sqlite3.connect(aps.db_path)
            .execute("SELECT live, cause FROM calls").fetchone() == (0, 16),
            timeout=5,
        )


async def test_channels_exhausted_gives_cause_34(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url, workers={"count": 2, "channels_per_worker": 1})
    async with await connect(appliance) as client:
        first = await call_up(client)
        second = await call_up(client, userdata=json.dumps({"id": "B2"}))
        assert {first.channel, second.channel} == {1, 2}  # one on each worker
        third = await client.make_video_call(5678, 9333, json.dumps({"id": "C3"}), medium=0)
        release = (await third.wait_for("release")).action
        assert (release.channel, release.cause, release.causestring) == (
            0, 34, "no circuit available"
        )
        wire = p.encode(release)
        assert b'"channel":0' in wire
        # A browser release frees its channel at once for the next call.
        await first.hangup()
        fourth = await call_up(client, userdata=json.dumps({"id": "D4"}))
        assert fourth.channel == first.channel


async def test_closed_websocket_frees_the_channel(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url, workers={"count": 1, "channels_per_worker": 1})
    client = await connect(appliance)
    await call_up(client)
    await client.close()
    async with await connect(appliance) as again:
        await eventually(lambda: appliance.count_in_log(r"channel 1: released") >= 1, 5)
        await call_up(again)


async def test_dtls_never_completing_is_a_connect_timeout(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(aps.url, media={"dtls_timeout": 2.0})
    async with await connect(appliance) as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        # A browser that goes silent: it never answers ICE checks nor starts DTLS.
        await call.pc.close()
        answered = await call.wait_for("answer")
        released = await call.wait_for("release", timeout=10)
        release = released.action
        waited = released.at - answered.at
        assert (release.cause, release.causestring) == (16, "Connect Timeout")
        assert release.channel == answered.action.channel
        assert 1.5 <= waited <= 3.5, waited


async def test_lifetime_releases_the_call(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with await connect(appliance) as client:
        call = await call_up(client, lifetime=1)
        connected = time.monotonic()
        release = (await call.wait_for("release", timeout=5)).action
        assert (release.cause, release.causestring) == (16, "lifetime expired")
        assert 0.8 <= time.monotonic() - connected <= 2.5


async def test_bad_frames_get_clear_replies_and_the_connection_stays_up(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(aps.url)
    good_offer = {
        "action": "offer", "dialogid": 7, "ref": 8, "medium": 0, "ua_family": "t",
        "ua_version": "1", "ua_os": "t", "offer": {"type": "offer", "sdp": "v=0\r\n"},
    }
    cases: list[tuple[str, int, str, tuple[int | None, int | None]]] = [
        ("{this is not json", 95, "malformed JSON", (None, None)),
        (json.dumps({**good_offer, "a_very_long_key_name": 1}), 100, "too long", (7, 8)),
        (json.dumps({**good_offer, "nickname": "n" * 129}), 100, "'nickname' too long", (7, 8)),
        (json.dumps({"action": "teleport", "dialogid": 7, "ref": 8}), 97, "teleport", (7, 8)),
        (json.dumps({"action": "offer", "dialogid": 7, "ref": 8}), 96, "missing", (7, 8)),
        (
            json.dumps({"action": "ice", "dialogid": 9, "ref": 10,
                        "ice": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}}),
            98, "ice before offer", (9, 10),
        ),
        (
            json.dumps({"action": "DTMF", "dialogid": 9, "ref": 10, "value": "5"}),
            98, "DTMF before offer", (9, 10),
        ),
    ]
    async with await connect(appliance) as client:
        for frame, cause, text, ids in cases:
            await client.send_raw(frame)
            release = await next_unrouted(client)
            assert release.cause == cause, (frame[:60], release)
            assert text in release.causestring, (frame[:60], release)
            got = (
                None if release.dialogid is p.UNSET else release.dialogid,
                None if release.ref is p.UNSET else release.ref,
            )
            assert got == ids
        # The same connection then places a good call, and a second offer for the same
        # dialogid+ref is refused without disturbing it.
        call = await call_up(client, dialogid=11, ref=12)
        await client.send_raw(
            json.dumps({**good_offer, "dialogid": 11, "ref": 12})
        )
        dup = (await call.wait_for("release")).action
        assert dup.cause == 98 and "second offer" in dup.causestring
        assert call.pc.connectionState == "connected"


async def test_verify_error_and_invalid_suid(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with await connect(appliance) as client:
        refused = await client.make_video_call(5678, 9333, "no identity here", medium=0)
        release = (await refused.wait_for("release")).action
        assert release.causestring == "verify error" and release.cause == 21
        first = await call_up(client, suid="session-1")
        again = await client.make_video_call(5678, 9333, USERDATA, medium=0, suid="session-1")
        release = (await again.wait_for("release")).action
        assert release.causestring == "invalid suid"
        assert first.pc.connectionState == "connected"


async def test_aps_down_gives_a_clear_release(make_appliance: Any) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    appliance = make_appliance(nobody)
    async with await connect(appliance) as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        release = (await call.wait_for("release", timeout=10)).action
        assert (release.cause, release.causestring) == (41, "verify error: AP-S unavailable")
        assert release.channel >= 1
    assert "AP-S unavailable" in appliance.log()


async def test_killed_worker_comes_back_and_other_calls_go_on(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(aps.url, workers={"count": 2, "channels_per_worker": 1})
    async with await connect(appliance) as client:
        survivor = await call_up(client)
        victim = await call_up(client, userdata=json.dumps({"id": "B2"}))
        assert (survivor.channel, victim.channel) == (1, 2)
        await asyncio.sleep(2)  # let RTCP receiver reports start
        before = await remote_packets_received(survivor)
        assert before > 0
        old_pid = appliance.worker_pid(1)
        assert old_pid is not None
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        release = (await victim.wait_for("release", timeout=5)).action
        assert release.cause == 41 and release.causestring == "media worker failed"
        assert release.channel == 2
        ups = appliance.count_in_log(r"worker 1 is up")

        await eventually(lambda: appliance.count_in_log(r"worker 1 is up") > ups, 5)
        back_after = time.monotonic() - killed_at
        print(f"worker back {back_after * 1000:.0f} ms after kill -9")
        assert back_after < 2.0, back_after
        new_pid = appliance.worker_pid(1)
        assert new_pid is not None and new_pid != old_pid
        # The call on worker 0 never noticed: still connected, still received.
        await asyncio.sleep(2.5)
        after = await remote_packets_received(survivor)
        assert after > before, (before, after)
        assert survivor.pc.connectionState == "connected"
        assert not any(e.name == "release" for e in survivor.history)
        # The dead worker's call record is closed at AP-S by the supervisor.
        await eventually(
            lambda: sqlite3.connect(aps.db_path).execute(
                "SELECT cause FROM calls WHERE channel=2 AND live=0").fetchone() == (41,),
            timeout=5,
        )
        # The restarted worker takes calls again.
        fresh = await call_up(client, userdata=json.dumps({"id": "C3"}))
        assert fresh.channel == 2


async def test_sigterm_releases_every_live_call(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    async with await connect(appliance) as client:
        calls = [
            await call_up(client, userdata=json.dumps({"id": f"U{i}"})) for i in range(3)
        ]
        assert appliance.process is not None
        appliance.process.send_signal(signal.SIGTERM)
        for call in calls:
            release = (await call.wait_for("release", timeout=15)).action
            assert (release.cause, release.causestring) == (41, "appliance shutting down")
            assert release.channel == call.channel
        code = await asyncio.get_running_loop().run_in_executor(
            None, appliance.process.wait, 20
        )
        assert code == 0
    live = sqlite3.connect(aps.db_path).execute("SELECT count(*) FROM calls WHERE live=1")
    assert live.fetchone() == (0,)
