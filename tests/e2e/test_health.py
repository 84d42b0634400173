"""The operator's view: /metrics, `appliance status`, degraded workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance_sdk import MediaServerClient
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
            [sys.executable, "-m", "launcher.cli", "status", "--url", appliance.admin_url],
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


def worker_status(appliance: Any, index: int) -> dict[str, Any]:
    return status(appliance)["workers"][index]


async def test_a_silent_worker_gets_no_new_calls_until_it_speaks_again(
    aps: Any, make_appliance: Any
) -> None:
    # Issue 10, finding 8: a SIGSTOPped worker stayed "ready" and kept getting calls.
    appliance = make_appliance(
        aps.url, workers={"count": 2, "channels_per_worker": 4},
        admin={"heartbeat_timeout": 2.0, "hung_restart_after": 60.0},
    )
    await eventually(lambda: all(w["pid"] for w in status(appliance)["workers"]), 5)
    pid = appliance.worker_pid(1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        seen_after = await eventually(lambda: worker_status(appliance, 1)["silent"], 5)
        print(f"stopped worker seen silent after {seen_after:.2f} s")
        assert seen_after <= 2.5, seen_after
        shown = worker_status(appliance, 1)
        assert not shown["ready"] and shown["quiet_s"] >= 2.0
        assert worker_status(appliance, 0)["silent"] is False
        families = metrics(appliance)
        core = str(shown["core"])
        assert families[("appliance_worker_silent", (("core", core), ("worker", "1")))] == 1
        assert "worker 1 silent" in appliance.log()
        async with await MediaServerClient.connect(appliance.url) as client:
            # Worker 1 has every channel free: without the heartbeat it would get these.
            calls = [await client.make_video_call(5678, 9333, json.dumps({"id": f"S{i}"}),
                                                  medium=0) for i in range(3)]
            for call in calls:
                await call.wait_for("dtls_connect", timeout=15)
            assert all(1 <= call.channel <= 4 for call in calls), [c.channel for c in calls]
            os.kill(pid, signal.SIGCONT)
            back_after = await eventually(lambda: not worker_status(appliance, 1)["silent"], 5)
            print(f"worker back {back_after:.2f} s after SIGCONT")
            assert worker_status(appliance, 1)["ready"]
            assert appliance.worker_pid(1) == pid  # back by itself, not restarted
            late = await client.make_video_call(5678, 9333, json.dumps({"id": "S9"}), medium=0)
            await late.wait_for("dtls_connect", timeout=15)
            assert late.channel >= 5
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_hung_worker_is_restarted_and_its_calls_released(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(
        aps.url, workers={"count": 2, "channels_per_worker": 4, "restart_delay": 0.1},
        admin={"heartbeat_timeout": 2.0, "hung_restart_after": 4.0},
    )
    await eventually(lambda: all(w["pid"] and w["ready"] and not w["silent"]
                                 for w in status(appliance)["workers"]), 10)
    async with await MediaServerClient.connect(appliance.url) as client:
        # The first call goes to worker 0, the second to worker 1 (the one with more free).
        survivor = await client.make_video_call(5678, 9333, json.dumps({"id": "H1"}), medium=0)
        await survivor.wait_for("dtls_connect", timeout=15)
        victim = await client.make_video_call(5678, 9333, json.dumps({"id": "H2"}), medium=0)
        await victim.wait_for("dtls_connect", timeout=15)
        assert survivor.channel <= 4 < victim.channel, (survivor.channel, victim.channel)
        old_pid = appliance.worker_pid(1)
        assert old_pid is not None
        stopped_at = asyncio.get_running_loop().time()
        os.kill(old_pid, signal.SIGSTOP)
        try:
            release = (await victim.wait_for("release", timeout=10)).action
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old_pid, signal.SIGCONT)
        released_after = asyncio.get_running_loop().time() - stopped_at
        print(f"hung worker's call released {released_after:.2f} s after SIGSTOP")
        assert (release.cause, release.causestring) == (41, "media worker failed")
        # Quiet counts from the last message (stats twice a second): up to 0.5 s before the stop.
        assert 3.4 <= released_after <= 6.0, released_after
        assert "worker 1 hung" in appliance.log()
        await eventually(lambda: appliance.worker_pid(1) not in (None, old_pid), 5)
        await eventually(lambda: worker_status(appliance, 1)["ready"], 10)
        assert worker_status(appliance, 1)["restarts"] == 1
        assert not worker_status(appliance, 1)["silent"]
        # The call on the healthy worker never noticed.
        assert not any(e.name == "release" for e in survivor.history)
