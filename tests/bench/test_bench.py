"""The capacity bench: a short real run (both phases, two small steps) whose report must
hold real figures, plus the pieces it is built from checked on their own.

    tests/in-loopback-netns.sh .venv/bin/python -m pytest tests/bench -q
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import native
from appliance.media.quality import vp8_keyframe_size
from bench import analysis, native_path, system
from bench.media_cache import VP8_S_BIT, VideoParams, load_or_make_clip, packetize
from bench.pacer import TxVideo
from bench.rtp_stats import RxStream

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rtp(seq: int, ts: int, marker: bool = False, ssrc: int = 1234) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | 96, seq & 0xFFFF, ts, ssrc)


# -- the pieces ------------------------------------------------------------------------------


def test_packetize_marks_the_first_fragment_and_keeps_every_byte() -> None:
    frame = bytes(range(256)) * 10
    payloads = packetize(frame, 1100)
    assert len(payloads) == 3
    assert [p[0] for p in payloads] == [VP8_S_BIT, 0, 0]
    assert b"".join(p[1:] for p in payloads) == frame
    assert max(len(p) for p in payloads) <= 1101


def test_cached_clip_is_real_vp8_640x480_with_regular_keyframes(tmp_path: Path) -> None:
    params = VideoParams(seconds=2, keyframe_interval=30)
    clip = load_or_make_clip(tmp_path, params)
    again = load_or_make_clip(tmp_path, params)  # from disk this time
    assert again.frames == clip.frames
    assert clip.keyframes == (0, 30)
    # The appliance's own keyframe parser sees the picture size in each keyframe's first
    # packet: the packetization is what a browser sends.
    for index in clip.keyframes:
        assert vp8_keyframe_size(clip.frames[index].payloads[0]) == (640, 480)
    assert vp8_keyframe_size(clip.frames[1].payloads[0]) is None
    assert 400_000 < clip.bitrate < 1_600_000


def test_rx_stream_counts_loss_frames_and_wraparound() -> None:
    stream = RxStream(90000)
    now = 100.0
    seqs = [65533, 65534, 65535, 0, 2, 3]  # 1 lost, across the wrap
    for k, seq in enumerate(seqs):
        stream.packet(rtp(seq, 3000 * k, marker=k % 2 == 1), now + k / 30)
    assert stream.received == 6
    assert stream.expected == 7
    assert stream.frames == 3
    assert stream.jitter_ms < 0.01  # perfectly paced


def test_rx_stream_jitter_follows_rfc3550() -> None:
    stream = RxStream(8000)
    stream.packet(rtp(1, 0), 0.0)
    stream.packet(rtp(2, 160), 0.030)  # 10 ms late: D = 80 units, J = 80/16
    assert stream.jitter == pytest.approx(5.0)


def test_pli_jumps_to_the_next_keyframe() -> None:
    clip = load_or_make_clip(Path(ROOT / "bench" / "results" / "cache"))
    sent: list[bytes] = []
    video = TxVideo(sent.append, 42, 96, clip.frames, 30, 0.0, random.Random(3))
    video.emit(0.2)  # a few frames in: no longer on a keyframe
    assert sent
    video.keyframe_request(1.0)
    sent.clear()
    video.emit(0.25)
    payload = sent[0][12:]
    assert vp8_keyframe_size(payload) == (640, 480)
    assert sent[-1][1] & 0x80  # the marker ends the frame


def _step(calls: int, passed: bool, worker_cores: float, generator: bool = False,
          lag: float = 1.0) -> dict[str, Any]:
    return {
        "calls": calls,
        "worker": {"cpu_per_call_net": worker_cores / calls, "loop_lag_p99_ms": lag,
                   "cores": worker_cores},
        "verdict": {"pass": passed, "reasons": [] if passed else ["loss 5 %"],
                    "appliance_saturated": not passed and not generator,
                    "appliance_signs": [], "generator_saturated": generator,
                    "generator_signs": ["a caller process used 0.95 core"] if generator else []},
    }


def test_capacity_is_observed_when_the_appliance_stops_the_ramp() -> None:
    steps = [_step(8, True, 0.2), _step(16, True, 0.4), _step(32, False, 0.95)]
    cap = analysis.capacity(steps, 1, 0.0, analysis.Criteria())
    assert (cap["capacity_per_core"], cap["basis"], cap["limit_source"]) == (
        16, "observed", "appliance")


def test_capacity_is_extrapolated_when_the_generator_runs_out_first() -> None:
    steps = [_step(8, True, 0.2), _step(16, True, 0.4, generator=True),
             _step(32, False, 0.5, generator=True)]
    cap = analysis.capacity(steps, 1, 0.0, analysis.Criteria())
    assert cap["limit_source"] == "load generator"
    assert cap["basis"] == "extrapolated"
    # From the last step the generator kept up with: 0.8 core / 0.025 core per call.
    assert cap["extrapolated_from_calls"] == 8
    assert cap["capacity_per_core"] == 32


# -- a real run ------------------------------------------------------------------------------


@pytest.mark.timeout(320)
@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")
def test_short_bench_run_reports_real_figures(tmp_path: Path) -> None:
    if not system.loopback_only():
        pytest.fail("the bench must run in a loopback-only network namespace: "
                    "tests/in-loopback-netns.sh .venv/bin/python -m pytest tests/bench")
    out = tmp_path / "results"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--steps", "1,2", "--hold", "4",
         "--settle", "2", "--idle", "1", "--stop-after-failures", "9",
         "--transports", "udp,tcp", "--no-janus", "--results-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "step 2: 2 call(s)" in run.stdout  # progress on the terminal

    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["cores_logical"] >= 1 and report["machine"]["cpu_model"]
    assert report["machine"]["aiortc"] and report["machine"]["python"]
    assert report["machine"]["loopback_only_namespace"] is True
    assert set(report["phases"]) == {"packet", "packet-tcp", "aiortc"}
    for key, phase in report["phases"].items():
        relay = phase["relay"]
        assert phase["config"]["media"]["relay"] == relay
        assert key == relay + ("-tcp" if phase["transport"] == "tcp" else "")
        assert [s["calls"] for s in phase["steps"]] == [1, 2], relay
        for step in phase["steps"]:
            where = f"{relay} at {step['calls']} call(s)"
            assert step["failed_calls"] == 0, (where, step["failures"])
            assert step["worker"]["cores"] > 0, where
            assert step["worker"]["cpu_per_call"] > 0, where
            assert step["generator"]["cores"] > 0 and step["generator"]["packets_sent"] > 0
            for kind, media in step["media"].items():
                assert media["packets"] > 0, (where, kind)
                assert media["streams"] == step["calls"], (where, kind)
            # Both video directions arrived as frames: customer -> agent, agent -> customer.
            assert step["media"]["user_video"]["frames_per_s_per_stream"] > 0, where
            assert step["media"]["agent_video"]["frames_per_s_per_stream"] > 0, where
            setup = step["setup_ms"]
            for key in ("user_dtls", "sip_answer", "agent_dtls"):
                assert setup[key]["n"] == 1 and setup[key]["p50"] > 0, (where, key)
            # The desk phone answers after ringing 1.5 s: the SIP figure is real.
            assert setup["sip_answer"]["p50"] > 1400, where
            assert isinstance(step["verdict"]["pass"], bool)
        assert phase["capacity"]["limit_source"]
        assert phase["capacity"]["capacity_per_core"] is not None
    # The product relays without decoding; the baseline really decodes.
    assert all(s["worker"]["decoders_created"] == 0 for s in report["phases"]["packet"]["steps"])
    assert report["phases"]["aiortc"]["steps"][-1]["worker"]["decoders_created"] > 0
    assert report["comparison"]["cpu_per_call_ratio"] > 1
    # Over TCP the same relay, every leg on the worker's TCP port: compared in this run.
    tcp = report["transport_comparison"]
    assert tcp["calls_placed"] == {"udp": 2, "tcp": 2}
    assert tcp["udp_cpu_per_call_net"] > 0 and tcp["tcp_cpu_per_call_net"] > 0
    assert tcp["offer_to_dtls_p50_ms"]["tcp"] > 0 and tcp["offer_to_dtls_p50_ms"]["udp"] > 0
    # The callers' media on the native loop over UDP; ICE-TCP legs send from Python.
    udp_path = ["native"] if native.AVAILABLE else ["python"]
    assert report["phases"]["packet"]["steps"][-1]["generator"]["media_path"] == udp_path
    assert report["phases"]["packet-tcp"]["steps"][-1]["generator"]["media_path"] == ["python"]
    for key, connections in (("packet", 0), ("packet-tcp", 4)):  # 2 calls of 2 legs
        steps = report["phases"][key]["steps"]
        assert all(s["worker"]["decoders_created"] == 0 for s in steps)
        assert steps[-1]["worker"]["ice_tcp_connections"] == connections, key

    assert (out / "plot.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = (out / "summary.md").read_text()
    assert "calls per core" in summary and "baseline" in summary
    assert "Ours over ICE-TCP against ours over UDP" in summary
    print(f"bench run took {elapsed:.0f} s")


@pytest.mark.timeout(200)
@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")
def test_the_janus_phase_places_the_same_calls_and_compares(tmp_path: Path) -> None:
    from bench import janus

    if not janus.INSTALLED:
        pytest.skip(janus.WHY_NOT)
    if not system.loopback_only():
        pytest.fail("run in the loopback-only namespace: tests/in-loopback-netns.sh ...")
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--steps", "1,2", "--hold", "3",
         "--settle", "1", "--idle", "1", "--no-baseline", "--results-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["phases"]) == {"packet", "janus"}
    for step in report["phases"]["janus"]["steps"]:
        assert step["failed_calls"] == 0, step["failures"]
        assert step["worker"]["cores"] > 0  # the janus process, pinned to the worker core
        assert step["worker"]["loop_lag_p99_ms"] is None  # no event loop to lag
        for kind, media in step["media"].items():  # echoed video x2, the desk phone's voice
            assert media["packets"] > 0 and media["streams"] == step["calls"], kind
    comparison = report["janus_comparison"]
    assert comparison["cpu_per_call_ratio"] > 0 and comparison["cpu_compared_at_calls"] == 2
    summary = (out / "summary.md").read_text()
    assert "Ours against Janus 1.1.2" in summary and "ours / Janus" in summary


@pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)
def test_the_native_path_micro_bench_relays_every_packet_on_both_paths() -> None:
    if not system.loopback_only():
        pytest.fail("run in the loopback-only namespace: tests/in-loopback-netns.sh ...")
    results = native_path.measure(500)
    for path in ("native", "python"):
        figures = results[path]
        assert figures["received"] == 500 and figures["us_per_packet"] > 0, (path, figures)
    stats = results["native"]["stats"]
    assert stats["relayed"] == 500 and stats["handed_up"] == 0 and stats["send_errors"] == 0
    assert results["python_over_native"] is not None and results["srtp_profile"]
