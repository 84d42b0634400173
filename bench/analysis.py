"""Verdicts: did a step pass, who ran out first, and what the capacity per core is.

A step passes with loss < 1 %, event-loop lag p99 < 20 ms and no failed call. The capacity
is the largest passing step over the number of worker cores, but only when the appliance
is what stopped the ramp. When the load generator ran out first (its CPU near 100 %, or it
sent late) a number it did not see is not claimed: the capacity is extrapolated from the
worker's CPU per call instead, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SENT_FPS = 30  # the callers' video frame rate
MIN_FPS_SHARE = 0.9  # below this share of it, a step is flagged (not failed)


@dataclass(frozen=True)
class Criteria:
    max_loss_pct: float = 1.0
    max_lag_p99_ms: float = 20.0
    # Extrapolation budget per worker core: 20 % is left for setup bursts, RTCP and GC.
    headroom_cores: float = 0.8
    saturated_cores: float = 0.9  # a process (or core) this busy is at its limit
    max_tick_lag_ms: float = 20.0  # the generator's pacer ran this late: it sends late

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def judge_step(step: dict[str, Any], workers: int, criteria: Criteria,
               cores_shared: bool) -> dict[str, Any]:
    reasons = []
    loss = step["loss_pct"]
    if loss is None:
        reasons.append("no media measured")
    elif loss >= criteria.max_loss_pct:
        reasons.append(f"loss {loss:.2f} % >= {criteria.max_loss_pct} %")
    lag = step["worker"]["loop_lag_p99_ms"]  # None: no event loop (Janus)
    if lag is not None and lag >= criteria.max_lag_p99_ms:
        reasons.append(f"loop lag p99 {lag:.1f} ms >= {criteria.max_lag_p99_ms} ms")
    if step["failed_calls"]:
        reasons.append(f"{step['failed_calls']} call(s) failed")

    appliance_signs = []
    worker_cores = step["worker"]["cores"]
    if worker_cores >= criteria.saturated_cores * workers:
        appliance_signs.append(f"worker CPU {worker_cores:.2f} of {workers} core(s)")
    if lag is not None and lag >= criteria.max_lag_p99_ms:
        appliance_signs.append(f"worker loop lag p99 {lag:.1f} ms")
    if step["udp_drops"].get("worker", 0) > 0:
        appliance_signs.append(f"{step['udp_drops']['worker']} datagrams dropped on the "
                               "worker's sockets")

    gen = step["generator"]
    generator_signs = []
    busiest = max(gen["cores_by_process"], default=0.0)
    if busiest >= criteria.saturated_cores:
        generator_signs.append(f"a caller process used {busiest:.2f} core")
    gen_cores = len(gen["cores_busy"])
    if gen_cores and not cores_shared \
            and gen["load_side_cores"] >= criteria.saturated_cores * gen_cores:
        generator_signs.append(f"the load side (callers, sipp, supervisor, runner) used "
                               f"{gen['load_side_cores']:.2f} of {gen_cores} core(s)")
    if gen["tick_lag_ms_p99"] >= criteria.max_tick_lag_ms:
        generator_signs.append(f"pacer tick lag p99 {gen['tick_lag_ms_p99']:.1f} ms (sends late)")
    if gen["periods_skipped"] > 0:
        generator_signs.append(f"{gen['periods_skipped']} send periods skipped (fell behind)")
    for role in ("generator", "sipp"):
        if step["udp_drops"].get(role, 0) > 0:
            generator_signs.append(f"{step['udp_drops'][role]} datagrams dropped on the "
                                   f"{role}'s sockets")
    # Not a criterion (the product's contract is loss, lag and failures), but a relay that
    # keeps every packet and still delivers fewer frames than were sent is saturated in a
    # way a viewer sees: a re-encoding relay drops frames instead of packets.
    warnings = []
    for kind in ("user_video", "agent_video"):
        fps = step["media"][kind]["frames_per_s_per_stream"]
        if fps is not None and fps < MIN_FPS_SHARE * SENT_FPS:
            warnings.append(f"{kind} arrives at {fps:.0f} fps of {SENT_FPS} sent")
    return {
        "pass": not reasons,
        "reasons": reasons,
        "warnings": warnings,
        "appliance_saturated": bool(appliance_signs),
        "appliance_signs": appliance_signs,
        "generator_saturated": bool(generator_signs),
        "generator_signs": generator_signs,
    }


def extrapolate(step: dict[str, Any], idle_cores: float, workers: int,
                criteria: Criteria) -> float | None:
    """Calls one worker core would carry at `headroom_cores` busy, from this step's CPU
    per call (net of what the idle worker uses)."""
    net = step["worker"]["cpu_per_call_net"]
    if net <= 0:
        return None
    return max(0.0, (criteria.headroom_cores - idle_cores / workers) / net)


def capacity(steps: list[dict[str, Any]], workers: int, idle_cores: float,
             criteria: Criteria) -> dict[str, Any]:
    passing = [s for s in steps if s["verdict"]["pass"]]
    best = max(passing, key=lambda s: s["calls"], default=None)
    # The first failing step above the best passing one is what stopped the ramp.
    above = [s for s in steps if not s["verdict"]["pass"]
             and (best is None or s["calls"] > best["calls"])]
    stopper = min(above, key=lambda s: s["calls"], default=None)
    clean = [s for s in passing if not s["verdict"]["generator_saturated"]]
    basis = max(clean or passing or steps, key=lambda s: s["calls"], default=None)
    extrapolated = extrapolate(basis, idle_cores, workers, criteria) if basis else None
    observed_calls = best["calls"] if best else 0
    observed = observed_calls / workers

    if stopper is None:
        gen_limited = best is not None and best["verdict"]["generator_saturated"]
        source = "load generator" if gen_limited else "not reached"
        why = (best["verdict"]["generator_signs"] if gen_limited
               else ["every step passed: the ramp ended before any limit"])
    else:
        v = stopper["verdict"]
        if v["appliance_saturated"]:
            source = "appliance"
            why = v["reasons"] + v["appliance_signs"]
            if v["generator_saturated"]:
                why += ["(the load generator was saturated too: "
                        + "; ".join(v["generator_signs"]) + ")"]
        elif v["generator_saturated"]:
            source = "load generator"
            why = v["reasons"] + v["generator_signs"]
        else:
            source = "unclear"
            why = v["reasons"] + ["neither the appliance nor the generator showed saturation"]
    if source == "appliance" or extrapolated is None:
        per_core, how = observed, "observed"
    else:
        # Not seen: the generator (or the ramp) ran out first. Never claim less than seen.
        per_core, how = max(observed, math.floor(extrapolated)), "extrapolated"
    return {
        "capacity_per_core": per_core,
        "basis": how,
        "observed_calls": observed_calls,
        "observed_per_core": observed,
        "extrapolated_per_core": round(extrapolated, 1) if extrapolated is not None else None,
        "extrapolated_from_calls": basis["calls"] if basis else None,
        "cpu_per_call_net_at_basis": basis["worker"]["cpu_per_call_net"] if basis else None,
        "limit_source": source,
        "limit_step_calls": stopper["calls"] if stopper else None,
        "limit_why": why,
        "capacity_step_calls": best["calls"] if best else None,
    }


def comparison(ours: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Our figures as a ratio to the baseline's: capacity, and CPU per call at the largest
    load both carried (the same number of calls on both)."""
    a_cap = ours["capacity"]["capacity_per_core"]
    b_cap = baseline["capacity"]["capacity_per_core"]
    at, ours_cpu, base_cpu = _cpu_at_common_step(ours, baseline)
    at_capacity = [phase["capacity"]["capacity_step_calls"] for phase in (ours, baseline)]
    cpu_at_capacity = [
        next((s["worker"]["cpu_per_call_net"] for s in phase["steps"] if s["calls"] == calls),
             None)
        for phase, calls in zip((ours, baseline), at_capacity, strict=True)]
    a_ext = ours["capacity"]["extrapolated_per_core"]
    b_ext = baseline["capacity"]["extrapolated_per_core"]
    return {
        "capacity_ratio": round(a_cap / b_cap, 1) if b_cap else None,
        # From CPU per call alone: defined even when the baseline passed no step.
        "extrapolated_capacity_ratio": round(a_ext / b_ext, 1) if a_ext and b_ext else None,
        "cpu_per_call_ratio": round(base_cpu / ours_cpu, 1) if ours_cpu > 0 else None,
        "cpu_compared_at_calls": at,
        # Each at its own capacity step: what a full core of each costs per call.
        "cpu_per_call_ratio_at_capacity": (
            round(cpu_at_capacity[1] / cpu_at_capacity[0], 1)
            if None not in cpu_at_capacity and cpu_at_capacity[0] > 0 else None),
        "capacity_steps": at_capacity,
        "ours_cpu_per_call_net": ours_cpu,
        "baseline_cpu_per_call_net": base_cpu,
    }


def rejudge(result: dict[str, Any], criteria: Criteria) -> dict[str, Any]:
    """Judge a finished run's figures again (other criteria, or a newer verdict logic):
    the measurements stay, verdicts, capacities and the comparison are recomputed."""
    workers = result["options"]["workers"]
    shared = result["layout"]["cores_shared"]
    for phase in result["phases"].values():
        for step in phase["steps"]:
            step["verdict"] = judge_step(step, workers, criteria, shared)
        idle = sum((phase["idle"] or {}).get("worker_cores", {}).values())
        phase["capacity"] = capacity(phase["steps"], workers, idle, criteria) \
            if phase["steps"] else None
    result["options"]["criteria"] = criteria.as_dict()
    compare_phases(result)
    return result


def _cpu_at_common_step(a: dict[str, Any], b: dict[str, Any]
                        ) -> tuple[int | None, float, float]:
    """CPU per call (net of idle) of both phases at the largest step both passed; at each
    one's first step when they passed none in common (`calls` None then)."""
    a_steps = {s["calls"]: s for s in a["steps"] if s["verdict"]["pass"]}
    b_steps = {s["calls"]: s for s in b["steps"] if s["verdict"]["pass"]}
    common = sorted(set(a_steps) & set(b_steps))
    if common:
        at = common[-1]
        return (at, a_steps[at]["worker"]["cpu_per_call_net"],
                b_steps[at]["worker"]["cpu_per_call_net"])
    return (None, a["steps"][0]["worker"]["cpu_per_call_net"],
            b["steps"][0]["worker"]["cpu_per_call_net"])


def transport_comparison(udp: dict[str, Any], tcp: dict[str, Any]) -> dict[str, Any]:
    """Our relay with every leg over ICE-TCP beside it over UDP, in one run: the worker's
    CPU per call at the same load, and the setup times (offer sent -> DTLS connected) of
    every call placed in the steps both phases ran (setups slow down as calls pile up, so
    a phase that ramped further must not be compared on its extra steps)."""
    at, udp_cpu, tcp_cpu = _cpu_at_common_step(udp, tcp)
    both = {s["calls"] for s in udp["steps"]} & {s["calls"] for s in tcp["steps"]}

    def samples(phase: dict[str, Any], key: str) -> list[float]:
        return [s[key] for s in phase.get("setups", []) if s["step"] in both and key in s]

    def setup(phase: dict[str, Any], key: str) -> float | None:
        values = sorted(samples(phase, key))
        return round(values[len(values) // 2], 1) if values else None

    return {
        "cpu_compared_at_calls": at,
        "udp_cpu_per_call_net": udp_cpu,
        "tcp_cpu_per_call_net": tcp_cpu,
        "tcp_cpu_ratio": round(tcp_cpu / udp_cpu, 2) if udp_cpu > 0 else None,
        "udp_capacity_per_core": (udp["capacity"] or {}).get("capacity_per_core"),
        "tcp_capacity_per_core": (tcp["capacity"] or {}).get("capacity_per_core"),
        "offer_to_dtls_p50_ms": {"udp": setup(udp, "user_dtls"), "tcp": setup(tcp, "user_dtls")},
        "agent_offer_to_dtls_p50_ms": {"udp": setup(udp, "agent_dtls"),
                                       "tcp": setup(tcp, "agent_dtls")},
        "setup_compared_over_steps": sorted(both),
        "calls_placed": {"udp": len(samples(udp, "user_dtls")),
                         "tcp": len(samples(tcp, "user_dtls"))},
    }


def compare_phases(result: dict[str, Any]) -> None:
    """The run's comparisons, from whichever phases it has: ours against the baseline
    (both over UDP), and ours over ICE-TCP against ours over UDP."""
    phases = result["phases"]
    if "packet" in phases and "aiortc" in phases:
        result["comparison"] = comparison(phases["packet"], phases["aiortc"])
    if "packet" in phases and "janus" in phases:  # the C reference, on the same work
        result["janus_comparison"] = comparison(phases["packet"], phases["janus"])
    if "packet" in phases and "packet-tcp" in phases:
        result["transport_comparison"] = transport_comparison(phases["packet"],
                                                              phases["packet-tcp"])
