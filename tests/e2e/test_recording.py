"""A recorded call end to end: capture, Convertor, encryption with the roomkey, AP-S reports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance_sdk import MediaServerClient
from tests.e2e.conftest import ROOT, eventually
from tests.e2e.test_voice import desk_phone, sipp_ok

pytestmark = pytest.mark.e2e

USERDATA = json.dumps({"id": "A123456789"})


def cdr(aps: Any, roomkey: int) -> dict[str, Any]:
    db = sqlite3.connect(aps.db_path)
    db.row_factory = sqlite3.Row
    row = db.execute("SELECT * FROM calls WHERE roomkey=?", (roomkey,)).fetchone()
    return dict(row) if row else {}


def decrypt(
    appliance: Any, roomkey: int, encrypted: Path, out: Path
) -> subprocess.CompletedProcess[str]:
    data = Path(appliance.sections["appliance"]["data_dir"])
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "decrypt", "--roomkey", str(roomkey),
         "--key-file", str(data / "recording-master.key"), "-o", str(out), str(encrypted)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def probe(path: Path) -> list[dict[str, Any]]:
    """Streams with their durations; Matroska keeps them in a DURATION tag (HH:MM:SS.f)."""
    shown = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries",
         "stream=codec_type,codec_name,duration:stream_tags=DURATION", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    )
    streams = json.loads(shown.stdout)["streams"]
    for stream in streams:
        tag = stream.get("tags", {}).get("DURATION")
        if stream.get("duration") in (None, "N/A") and tag:
            hours, minutes, seconds = tag.split(":")
            stream["duration"] = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return streams


async def test_recorded_call_is_encrypted_reported_and_playable(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address})
    customer = await MediaServerClient.connect(appliance.url)
    agent_client = await MediaServerClient.connect(appliance.url)
    try:
        user = await customer.make_video_call(5678, 9333, USERDATA, medium=2, record=1)
        recording = await user.wait_for("record_status", timeout=15)
        status = recording.action
        assert status.status == "start" and status.channel == user.channel
        assert re.fullmatch(rf"audio/\d{{8}}/{user.dialogid}{user.ref}_{user.channel:03d}\.wav",
                            status.record_file), status.record_file
        await user.wait_for("Join", timeout=15)
        roomkey = int(sqlite3.connect(aps.db_path).execute(
            "SELECT roomkey FROM calls").fetchone()[0])
        await eventually(lambda: cdr(aps, roomkey).get("record_file") == status.record_file, 5)
        agent = await agent_client.join_room(roomkey)
        await agent.wait_for("dtls_connect", timeout=15)
        await asyncio.sleep(6)
        await user.hangup()
        # The recording runs from record_status (DTLS up) to the hang-up.
        length = time.monotonic() - recording.at
        await sipp_ok(sipp)
    finally:
        await customer.close()
        await agent_client.close()
        sipp.kill()
    # EndCall comes once the Convertor has muxed, encrypted and verified the recording.
    await eventually(lambda: cdr(aps, roomkey).get("endcall_at") is not None, 60)
    final = cdr(aps, roomkey)["record_file"]
    assert final.endswith(".mkv.enc"), final
    recordings = Path(appliance.sections["appliance"]["data_dir"]) / "recordings"
    encrypted = recordings / final
    assert encrypted.exists()
    assert not (recordings / status.record_file).exists(), "plain capture left behind"

    plain = tmp_path / "call.mkv"
    done = decrypt(appliance, roomkey, encrypted, plain)
    assert done.returncode == 0, done.stderr
    streams = probe(plain)
    kinds = [s["codec_type"] for s in streams]
    assert kinds.count("audio") == 1 and kinds.count("video") == 2, streams
    print("recording length", round(length, 2), "streams", streams)
    for stream in streams:
        assert abs(float(stream["duration"]) - length) <= 0.1 * length, (stream, length)

    wrong = decrypt(appliance, roomkey + 1, encrypted, tmp_path / "wrong.mkv")
    assert wrong.returncode != 0 and not (tmp_path / "wrong.mkv").exists()
    tampered = tmp_path / "tampered.mkv.enc"
    data = bytearray(encrypted.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    flipped = decrypt(appliance, roomkey, tampered, tmp_path / "flipped.mkv")
    assert flipped.returncode != 0 and not (tmp_path / "flipped.mkv").exists()


async def test_worker_killed_mid_call_still_leaves_a_finished_recording(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address},
                               recording={"retry_delay": 0.5})
    client = await MediaServerClient.connect(appliance.url)
    try:
        user = await client.make_video_call(5678, 9333, USERDATA, medium=2, record=1)
        await user.wait_for("record_status", timeout=15)
        await user.wait_for("Join", timeout=15)
        await asyncio.sleep(4)
        roomkey = int(sqlite3.connect(aps.db_path).execute(
            "SELECT roomkey FROM calls").fetchone()[0])
        worker = appliance.worker_pid(0 if user.channel <= 2 else 1)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        release = (await user.wait_for("release", timeout=10)).action
        assert release.causestring == "media worker failed"
    finally:
        await client.close()
        sipp.kill()
    await eventually(lambda: str(cdr(aps, roomkey).get("record_file")).endswith(".mkv.enc"), 60)
    assert cdr(aps, roomkey)["endcall_at"] is not None
    final = cdr(aps, roomkey)["record_file"]
    encrypted = Path(appliance.sections["appliance"]["data_dir"]) / "recordings" / final
    plain = tmp_path / "killed.mkv"
    assert decrypt(appliance, roomkey, encrypted, plain).returncode == 0
    streams = probe(plain)
    assert {s["codec_type"] for s in streams} >= {"audio", "video"}
    assert all(float(s["duration"]) > 2.0 for s in streams), streams
