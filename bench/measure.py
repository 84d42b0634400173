"""Snapshots of everything a step is judged on, and the figures between two of them.

A snapshot is taken at the start and at the end of a step's hold period: CPU seconds of
each process (psutil), per-core busy time, the appliance's /status, UDP drops per role, and
each generator process's per-call counters. The step's figures are the differences, so
call setup and the settle time never count against the steady state.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench import system
from bench.control import ChildProcess
from bench.desk import DeskPhones
from bench.stack import ApplianceUnderTest

STREAM_KINDS = ("user_audio", "user_video", "agent_video")
# What each received stream is, for people reading the report.
STREAM_MEANING = {
    "user_audio": "customer hears the desk phone (PCMU echoed by sipp through the appliance)",
    "user_video": "customer sees the agent's camera (relayed by the appliance)",
    "agent_video": "agent sees the customer's camera (relayed by the appliance)",
}


@dataclass
class Processes:
    """Who is who, for CPU accounting."""

    workers: dict[int, int]  # worker index -> pid
    supervisor: int
    callers: list[ChildProcess]
    desk: DeskPhones
    runner: int = field(default_factory=os.getpid)

    def groups(self) -> dict[str, list[int]]:
        return {
            "worker": list(self.workers.values()),
            "supervisor": [self.supervisor] if self.supervisor > 0 else [],
            "generator": [c.pid for c in self.callers],
            "sipp": [self.desk.pid],
            "runner": [self.runner],
        }


async def take(procs: Processes, appliance: ApplianceUnderTest,
               reset_generator_lag: bool = True) -> dict[str, Any]:
    callers = await asyncio.gather(
        *(c.request("snapshot", reset_lags=reset_generator_lag) for c in procs.callers))
    status = await appliance.status_async()
    groups = procs.groups()
    return {
        "t": time.monotonic(),
        "callers": callers,
        "status": status,
        "cpu": {
            "workers": {str(i): system.cpu_seconds([pid]) for i, pid in procs.workers.items()},
            "workers_user_system": system.cpu_split(procs.workers.values()),
            "supervisor": system.cpu_seconds([procs.supervisor]),
            "generator": [system.cpu_seconds([c.pid]) for c in procs.callers],
            "sipp": system.cpu_seconds([procs.desk.pid]),
            "runner": system.cpu_seconds([procs.runner]),
        },
        "core_busy": system.core_busy_seconds(),
        "core_steal": system.core_steal_seconds(),
        "core_total": system.core_total_seconds(),
        "udp_drops": system.udp_drops(groups),
        "udp_rcvbuf_errors": system.udp_receive_errors(),
        "rss": {str(i): _rss(pid) for i, pid in procs.workers.items()},
    }


def _total(workers: Any, key: str) -> int | None:
    values = [w[key] for w in workers if w.get(key) is not None]
    return sum(values) if values else None


def _rss(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def _calls(snapshot: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {c["i"]: c for caller in snapshot["callers"] for c in caller["calls"]}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def summarize_setup(results: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95/max of each setup time over the calls placed in a step."""
    out: dict[str, Any] = {}
    for key in ("user_dtls", "sip_answer", "agent_dtls", "total"):
        values = [r["setup_ms"][key] for r in results if key in r.get("setup_ms", {})]
        out[key] = {"p50": _pct(values, 0.5), "p95": _pct(values, 0.95),
                    "max": round(max(values), 1) if values else None, "n": len(values)}
    return out


def setup_burst(results: list[dict[str, Any]], seconds: float, concurrency: int,
                workers: int, lag_p99_ms: list[float]) -> dict[str, Any]:
    """How fast a step's new calls were set up (ICE + DTLS of both legs + SIP, the desk
    phone's ringing included), and the worker's loop lag meanwhile."""
    ok = sum(1 for r in results if r["state"] == "up")
    per_s = ok / seconds if seconds > 0 and results else 0.0
    return {"calls": ok, "failed": len(results) - ok, "seconds": round(seconds, 2),
            "per_s": round(per_s, 2), "per_s_per_worker": round(per_s / max(1, workers), 2),
            "concurrency": concurrency,
            "lag_p99_ms_max": round(max(lag_p99_ms), 1) if lag_p99_ms else 0.0}


def step_figures(a: dict[str, Any], b: dict[str, Any], calls_target: int,
                 idle: dict[str, Any], gen_cores: list[int], worker_cores: list[int],
                 setup_results: list[dict[str, Any]], lag_p99_seen: list[float]
                 ) -> dict[str, Any]:
    dt = b["t"] - a["t"]
    workers = {k: (b["cpu"]["workers"][k] - a["cpu"]["workers"].get(k, 0.0)) / dt
               for k in b["cpu"]["workers"]}
    worker_total = sum(workers.values())
    (ua, sa), (ub, sb) = a["cpu"]["workers_user_system"], b["cpu"]["workers_user_system"]
    kernel_share = (sb - sa) / max(1e-9, (ub - ua) + (sb - sa))
    idle_total = sum(idle["worker_cores"].values())
    calls_a, calls_b = _calls(a), _calls(b)
    up = [i for i, c in calls_a.items() if c["state"] == "up" and i in calls_b]

    # -- media at the receivers ---------------------------------------------------------
    media: dict[str, Any] = {}
    silent: dict[int, list[str]] = {}  # call -> the streams that received nothing
    lost_total = expected_total = 0
    for kind in STREAM_KINDS:
        received = expected = frames = octets = 0
        jitters: list[float] = []
        for i in up:
            ra, rb = calls_a[i]["rx"].get(kind), calls_b[i]["rx"].get(kind)
            if rb is None or calls_b[i]["state"] != "up":
                continue
            ra = ra or [0, 0, 0.0, 0, 0]
            d_received, d_expected = rb[0] - ra[0], rb[1] - ra[1]
            if d_received <= 0:
                silent.setdefault(i, []).append(kind)
            received += d_received
            expected += max(d_expected, d_received)
            frames += rb[3] - ra[3]
            octets += rb[4] - ra[4]
            jitters.append(rb[2])
        lost = expected - received
        lost_total += lost
        expected_total += expected
        n = len(jitters)
        media[kind] = {
            "meaning": STREAM_MEANING[kind],
            "streams": n,
            "packets": received,
            "lost": lost,
            "loss_pct": round(100 * lost / expected, 3) if expected else None,
            "jitter_ms_mean": round(statistics.fmean(jitters), 3) if jitters else None,
            "jitter_ms_max": round(max(jitters), 3) if jitters else None,
            "packets_per_s_per_stream": round(received / dt / n, 1) if n else None,
            # Video frames end with the marker bit; an audio packet is its own 20 ms frame.
            "frames_per_s_per_stream": (round(frames / dt / n, 2) if kind != "user_audio"
                                        else round(received / dt / n, 2)) if n else None,
            "kbit_per_s_per_stream": round(octets * 8 / dt / 1000 / n, 1) if n else None,
        }
    loss_pct = round(100 * lost_total / expected_total, 3) if expected_total else None

    # -- failures -----------------------------------------------------------------------
    new_indexes = {r["i"] for r in setup_results}
    failures: list[dict[str, Any]] = []
    for r in setup_results:
        if r["state"] != "up":
            failures.append({"call": r["i"], "when": "setup", "why": r["failure"]})
    for i, c in calls_b.items():
        before = calls_a.get(i)
        if c["state"] == "failed" and i not in new_indexes and before is not None \
                and before["state"] == "up":
            failures.append({"call": i, "when": "hold", "why": c["failure"]})
        elif c["state"] == "failed" and i in new_indexes and before is not None \
                and before["state"] == "up":
            failures.append({"call": i, "when": "settle", "why": c["failure"]})
    for i in sorted(silent):
        if calls_b[i]["state"] == "up":
            failures.append({"call": i, "channels": calls_b[i].get("channels"),
                             "legs": calls_b[i].get("legs"), "when": "hold",
                             "why": f"received nothing: {', '.join(silent[i])}"})

    # -- the appliance ------------------------------------------------------------------
    status_workers = {str(w["index"]): w for w in b["status"]["workers"]}
    rss_delta = sum(b["rss"][k] - idle["rss"].get(k, 0) for k in b["rss"])
    # None when the relay under test has no event loop to lag (Janus: threads in C).
    lags99 = [w["loop_lag_p99_ms"] for w in status_workers.values()
              if w.get("loop_lag_p99_ms") is not None]
    lags50 = [w["loop_lag_p50_ms"] for w in status_workers.values()
              if w.get("loop_lag_p50_ms") is not None]
    lag_p99 = max(lags99) if lags99 else None
    lag_p50 = max(lags50) if lags50 else None
    calls_up = len(up)
    per_call = calls_up or calls_target

    # -- the load generator -------------------------------------------------------------
    gen_cpu = [(y - x) / dt for x, y in zip(a["cpu"]["generator"], b["cpu"]["generator"],
                                            strict=True)]
    busy = [(yb - xb) / max(1e-9, yt - xt) for xb, yb, xt, yt in zip(
        a["core_busy"], b["core_busy"], a["core_total"], b["core_total"], strict=True)]
    steal = [(y - x) / dt for x, y in zip(a["core_steal"], b["core_steal"], strict=True)]
    sipp_cores = (b["cpu"]["sipp"] - a["cpu"]["sipp"]) / dt
    runner_cores = (b["cpu"]["runner"] - a["cpu"]["runner"]) / dt
    supervisor_cores = (b["cpu"]["supervisor"] - a["cpu"]["supervisor"]) / dt
    # Everything of ours that runs on the generator's cores (the supervisor is pinned there
    # too when a core is left over); the rest of those cores' busy time is someone else's.
    load_side = sum(gen_cpu) + sipp_cores + runner_cores + supervisor_cores
    others_on_gen = max(0.0, sum(busy[c] for c in gen_cores) - load_side)
    others_on_workers = max(0.0, sum(busy[c] for c in worker_cores) - worker_total)
    tick = [c["tick_lag_ms"] for c in b["callers"]]
    tx_skipped = sum(c["tx_skipped"] for c in calls_b.values()) - sum(
        c["tx_skipped"] for c in calls_a.values())
    sent = sum(c["tx"] for c in calls_b.values()) - sum(c["tx"] for c in calls_a.values())
    drops = {k: b["udp_drops"][k] - a["udp_drops"].get(k, 0) for k in b["udp_drops"]}
    return {
        "calls": calls_target,
        "calls_measured": calls_up,
        "seconds": round(dt, 2),
        "worker": {
            "cores": round(worker_total, 4),
            "cores_by_worker": {k: round(v, 4) for k, v in workers.items()},
            "kernel_share": round(kernel_share, 3),
            "cpu_per_call": round(worker_total / per_call, 5),
            "cpu_per_call_net": round((worker_total - idle_total) / per_call, 5),
            "rss_bytes": sum(b["rss"].values()),
            "memory_per_call_bytes": round(rss_delta / per_call),
            "loop_lag_p50_ms": lag_p50,
            "loop_lag_p99_ms": lag_p99,
            "loop_lag_p99_ms_max_seen": max(lag_p99_seen, default=lag_p99),
            # None where the relay under test does not count them (Janus).
            "packets_received": _total(status_workers.values(), "packets_received"),
            "packets_sent": _total(status_workers.values(), "packets_sent"),
            "decoders_created": _total(status_workers.values(), "decoders_created"),
            # The media port's counters since the worker started: which transport the
            # calls really used, and frames the TCP writers dropped (a slow reader).
            "ice_tcp_connections": sum(w.get("ice_tcp_connections", 0)
                                       for w in status_workers.values()),
            "ice_tcp_drops": sum(w.get("ice_tcp_drops", 0) for w in status_workers.values()),
            "core_busy": [round(busy[c], 3) for c in worker_cores],
        },
        "supervisor_cores": round(supervisor_cores, 4),
        "media": media,
        "loss_pct": loss_pct,
        "failed_calls": len({f["call"] for f in failures}),
        "failures": failures[:20],
        "setup_ms": summarize_setup(setup_results),
        "generator": {
            "cores_by_process": [round(x, 4) for x in gen_cpu],
            "cores": round(sum(gen_cpu), 4),
            "cpu_per_call": round(sum(gen_cpu) / per_call, 5),
            "sipp_cores": round(sipp_cores, 4),
            "runner_cores": round(runner_cores, 4),
            "load_side_cores": round(load_side, 4),
            "cores_busy": [round(busy[c], 3) for c in gen_cores],
            "tick_lag_ms_p99": max((t["p99"] for t in tick), default=0.0),
            "tick_lag_ms_max": max((t["max"] for t in tick), default=0.0),
            "packets_sent": sent,
            "packets_per_s": round(sent / dt),
            "periods_skipped": tx_skipped,
            # How the callers sent and counted: "native" (bench.native_leg) or "python".
            "media_path": sorted({path for c in b["callers"] for path in c.get("generator", [])}),
        },
        "udp_drops": drops,
        # Not ours: other processes on the machine and the hypervisor. Non-zero means the
        # machine was not quiet and the figures are noisier than they look.
        "machine_noise": {
            "other_cores_on_worker_cores": round(others_on_workers, 3),
            "other_cores_on_generator_cores": round(others_on_gen, 3),
            "steal_cores": round(sum(steal), 3),
        },
        "udp_rcvbuf_errors": b["udp_rcvbuf_errors"] - a["udp_rcvbuf_errors"],
    }
