"""`make run`'s demo is a complete call: appliance + reference AP-S + simulated desk phone."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance_sdk import MediaServerClient
from tests.e2e.audio_probe import TaggedAudioTrack, TagReader
from tests.e2e.conftest import ROOT, free_port, free_udp_ports, write_toml

pytestmark = pytest.mark.e2e


async def test_demo_call_rings_answers_and_echoes(tmp_path: Path) -> None:
    port, aps_port, admin = free_port(), free_port(), free_port()
    sip_base, phone_port = free_udp_ports(2), free_udp_ports(1)
    config = tmp_path / "demo.toml"
    write_toml(config, {
        "appliance": {"data_dir": str(tmp_path / "data")},
        "signalling": {"listen": "127.0.0.1", "port": port},
        "workers": {"count": 1},
        "aps": {"url": f"http://127.0.0.1:{aps_port}"},
        "sip": {"base_port": sip_base, "proxy": f"127.0.0.1:{phone_port}"},
        "admin": {"port": admin},
    })
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "demo", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
    )
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 30
        banner = b""
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            banner += line
            if not line or line.startswith(b"READY"):
                break
        assert b"VideoCall.html" in banner and b"desk phone (simulated)" in banner, banner
        async with await MediaServerClient.connect(f"wss://127.0.0.1:{port}/") as client:
            track, reader = TaggedAudioTrack(), TagReader()
            call = await client.make_video_call(5678, 9333, json.dumps({"id": "A1"}), medium=0,
                                                audio_track=track)
            call.frame_observers["audio"].append(reader)
            await call.wait_for("Join", timeout=20)
            await asyncio.sleep(2)
            report = reader.report(track)
            assert report.received > 50 and report.loss_pct < 5, report
            await call.hangup()
    finally:
        demo.terminate()
        demo.wait(20)
        log.close()
    assert "call 5678 -> 9333: answered" in (tmp_path / "demo.log").read_text()
