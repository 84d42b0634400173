"""Worker CPU per audio call: PCMU passthrough vs Opus transcoding, measured side by side.

    tests/in-loopback-netns.sh .venv/bin/python -m bench.voice_cpu --calls 10 --seconds 20

Starts the reference AP-S, sipp as an echoing desk phone (one UAS serving every call) and
the appliance with ONE worker, places N calls with the SDK, holds them, and reads the
worker's CPU time (psutil) over the hold period. Reports core-seconds per second per call,
after subtracting the idle worker measured first in the same run. Must run inside a
loopback-only network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

from appliance.aps.server import serve as serve_aps
from appliance.client import MediaServerClient
from tests.e2e.audio_probe import TaggedAudioTrack, TagReader
from tests.e2e.conftest import Appliance, free_port, free_udp_ports, write_toml
from tests.sipp_runner import start_sipp


def _worker_cpu(appliance: Appliance) -> float:
    pid = appliance.worker_pid(0)
    assert pid is not None
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _measure(appliance: Appliance, seconds: float) -> float:
    """Core-seconds per second of the worker over `seconds`."""
    start_cpu, start = _worker_cpu(appliance), time.monotonic()
    await asyncio.sleep(seconds)
    return (_worker_cpu(appliance) - start_cpu) / (time.monotonic() - start)


async def run(calls: int, seconds: float, workdir: Path) -> dict[str, object]:
    aps = await serve_aps("127.0.0.1", 0, workdir / "aps.sqlite3")
    aps_url = "http://{}:{}".format(*aps.addresses[0][:2])
    sipp = await start_sipp(
        "desk/desk_echo.xml", workdir, "-rtp_echo", "-mp", str(free_udp_ports(4)),
        timeout=f"{int(seconds * 3 + 60)}s", calls=2 * calls,
    )
    data = workdir / "appliance"
    data.mkdir()
    port = free_port()
    write_toml(data / "appliance.toml", {
        "appliance": {"id": "bench", "data_dir": str(data), "log_level": "WARNING"},
        "signalling": {"listen": "127.0.0.1", "port": port},
        "workers": {"count": 1, "channels_per_worker": calls * 2 + 2},
        "aps": {"url": aps_url},
        "sip": {"proxy": sipp.address, "base_port": free_udp_ports(2)},
    })
    appliance = Appliance(data / "appliance.toml", data / "appliance.log", port)
    appliance.start()
    results: dict[str, object] = {"calls": calls, "seconds": seconds}
    try:
        await asyncio.sleep(2)
        idle = await _measure(appliance, 5)
        results["idle_worker_cores"] = round(idle, 4)
        for codec in ("PCMU", "OPUS"):
            client = await MediaServerClient.connect(appliance.url)
            readers = []
            placed = []
            for i in range(calls):
                track, reader = TaggedAudioTrack(), TagReader()
                call = await client.make_video_call(
                    5678, 9333, json.dumps({"id": f"{codec}{i}"}), medium=0,
                    audio=codec, audio_track=track,
                )
                call.frame_observers["audio"].append(reader)
                placed.append(call)
                readers.append((track, reader))
            for call in placed:
                await call.wait_for("Join", timeout=30)
            await asyncio.sleep(2)
            busy = await _measure(appliance, seconds)
            per_call = (busy - idle) / calls
            frames = sum(r.loud_frames for _, r in readers)
            results[codec] = {
                "worker_cores": round(busy, 4),
                "core_seconds_per_second_per_call": round(per_call, 5),
                "audio_frames_heard_by_callers": frames,
            }
            if codec == "PCMU":
                reports = [r.report(t) for t, r in readers]
                results[codec]["loss_pct_max"] = max(r.loss_pct for r in reports)  # type: ignore[index]
                results[codec]["rtt_ms_median"] = sorted(  # type: ignore[index]
                    r.rtt_ms_median for r in reports)[len(reports) // 2]
            print(f"{codec}: {results[codec]}", flush=True)
            for call in placed:
                await call.hangup()
            await client.close()
            await asyncio.sleep(2)
    finally:
        appliance.stop()
        sipp.kill()
        await aps.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(args.calls, args.seconds, Path(tmp)))
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
