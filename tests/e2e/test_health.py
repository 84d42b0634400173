"""The operator's view: /metrics, `appliance status`, degraded workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.client import MediaServerClient
from tests.e2e.conftest import ROOT, eventually

pytestmark = pytest.mark.e2e


def metrics(appliance: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{appliance.admin_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def busy_channels(appliance: Any) -> float:
    return sum(v for (name, _), v in metrics(appliance).items()
               if name == "appliance_worker_channels_busy")


def status(appliance: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{appliance.admin_url}/status", timeout=5) as response:
        return json.load(response)


async def test_metrics_follow_calls_up_and_down(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(aps.url)
    await eventually(lambda: status(appliance)["workers"][0]["pid"] is not None, 5)
    families = metrics(appliance)
    names = {name for name, _ in families}
    for expected in ("appliance_worker_up", "appliance_worker_cpu_cores",
                     "appliance_worker_loop_lag_p99_ms", "appliance_worker_channels_busy",
                     "appliance_worker_restarts_total", "appliance_core_cpu_percent",
                     "appliance_worker_decoders_created_total", "appliance_calls"):
        assert expected in names, expected
    assert families[("appliance_worker_channels", (("core", "0"), ("worker", "0")))] == 2
    assert busy_channels(appliance) == 0
    async with await MediaServerClient.connect(appliance.url) as client:
        calls = [await client.make_video_call(5678, 9333, json.dumps({"id": f"M{i}"}),
                                              medium=0) for i in range(3)]
        for call in calls:
            await call.wait_for("dtls_connect", timeout=15)
        assert busy_channels(appliance) == 3
        # `appliance status` shows the live calls, readably.
        shown = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "status", "--url", appliance.admin_url],
            capture_output=True, text=True, timeout=20, cwd=ROOT,
        )
        assert shown.returncode == 0, shown.stderr
        assert "live calls: 3" in shown.stdout
        for call in calls:
            assert f"channel {call.channel:>4}" in shown.stdout
        await calls[0].hangup()
        await eventually(lambda: busy_channels(appliance) == 2, 5)
    await eventually(lambda: busy_channels(appliance) == 0, 5)


async def test_a_degraded_worker_gets_no_new_calls(aps: Any, make_appliance: Any) -> None:
    appliance = make_appliance(
        aps.url, workers={"count": 2, "channels_per_worker": 4},
        admin={"degraded_lag_ms": 100.0, "degraded_after": 0.0},
    )
    await eventually(lambda: all(w["pid"] for w in status(appliance)["workers"]), 5)
    pid = appliance.worker_pid(1)
    assert pid is not None
    # A worker whose loop stalls: frozen for 1.5 s, its lag probe then sees the stall.
    os.kill(pid, signal.SIGSTOP)
    await asyncio.sleep(1.5)
    os.kill(pid, signal.SIGCONT)
    await eventually(lambda: status(appliance)["workers"][1]["degraded"], 5)
    assert "degraded" in appliance.log()
    async with await MediaServerClient.connect(appliance.url) as client:
        calls = [await client.make_video_call(5678, 9333, json.dumps({"id": f"D{i}"}),
                                              medium=0) for i in range(3)]
        for call in calls:
            await call.wait_for("dtls_connect", timeout=15)
        # Every call went to worker 0 (channels 1-4), none to the degraded worker 1.
        assert all(1 <= call.channel <= 4 for call in calls), [c.channel for c in calls]
        # Once its loop is healthy again (the stall leaves the probe's window) it recovers.
        await eventually(lambda: not status(appliance)["workers"][1]["degraded"], 20)
        late = await client.make_video_call(5678, 9333, json.dumps({"id": "D9"}), medium=0)
        await late.wait_for("dtls_connect", timeout=15)
        assert late.channel >= 5
