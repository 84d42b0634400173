"""The run's readable outputs: summary.md (the headline and where the limit came from) and
plot.png (CPU per call, loss and loop lag against concurrent calls, ours and baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"packet": "#1f77b4", "packet-tcp": "#2ca02c", "aiortc": "#d62728",
           "janus": "#9467bd"}
NOISE_CORES = 0.1  # other processes' use of our cores above which the summary warns


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} %"


def _step_at(phase: dict[str, Any], calls: int | None) -> dict[str, Any] | None:
    return next((s for s in phase["steps"] if s["calls"] == calls), None)


def _capacity_text(phase: dict[str, Any]) -> str:
    cap = phase["capacity"]
    if cap is None:
        return "no step measured"
    if cap["basis"] == "observed":
        return f"**{cap['capacity_per_core']:g}** calls per core (observed)"
    return (f"**{cap['capacity_per_core']:g}** calls per core (EXTRAPOLATED from "
            f"{100 * cap['cpu_per_call_net_at_basis']:.2f} % of a core per call at "
            f"{cap['extrapolated_from_calls']} calls; {cap['observed_per_core']:g} observed)")


def _limit_text(phase: dict[str, Any]) -> str:
    cap = phase["capacity"]
    if cap is None:
        return "-"
    source = cap["limit_source"]
    where = f" at {cap['limit_step_calls']} calls" if cap["limit_step_calls"] else ""
    headline = {
        "appliance": f"the appliance{where}",
        "load generator": f"the LOAD GENERATOR{where}: the appliance was not saturated; "
                          "the capacity is extrapolated from CPU per call",
        "not reached": "not reached: every step passed; the capacity is extrapolated",
        "unclear": f"unclear{where}",
    }.get(source, source)
    return f"{headline} ({'; '.join(cap['limit_why'])})"


def write_summary(result: dict[str, Any], path: Path) -> None:
    m, layout, o = result["machine"], result["layout"], result["options"]
    phases = result["phases"]
    lines = [
        f"# Capacity bench {result['started']}",
        "",
        f"{m['cpu_model']}, {m['cores_logical']} cores; worker(s) on core(s) "
        f"{layout['worker_cores']}, load generator on {layout['generator_cores']}"
        + (" (shared with the workers!)" if layout["cores_shared"] else "")
        + f". Python {m['python']}, aiortc {m['aiortc']}. {o['workers']} worker(s); steps "
        f"{o['steps']}, {o['hold']:g} s held each. A call = customer leg ({o['audio']} + VP8 "
        "640x480 30 fps) + agent video leg + sipp desk phone echoing the voice. The callers' "
        f"media: {o.get('generator', 'python')} (native: sent and counted by the native "
        "loop, ICE-TCP legs in Python).",
        "",
        "A step passes with loss < "
        f"{o['criteria']['max_loss_pct']:g} %, loop lag p99 < "
        f"{o['criteria']['max_lag_p99_ms']:g} ms and no failed call.",
        "",
    ]
    for phase in phases.values():
        lines.append(f"## {phase['name']}")
        lines.append("")
        lines.append(f"- Capacity: {_capacity_text(phase)}")
        lines.append(f"- Limit: {_limit_text(phase)}")
        cap = phase["capacity"]
        step = _step_at(phase, cap["capacity_step_calls"]) if cap else None
        if step is not None:
            w = step["worker"]
            lines.append(
                f"- At {step['calls']} calls: loss {_pct(step['loss_pct'])}, "
                + (f"loop lag p50/p99 {w['loop_lag_p50_ms']:.1f}/{w['loop_lag_p99_ms']:.1f} ms, "
                   if w["loop_lag_p99_ms"] is not None else "")
                + "worker CPU "
                f"{100 * w['cpu_per_call']:.2f} % of a core per call "
                f"({100 * w['cpu_per_call_net']:.2f} % net of idle), memory "
                f"{w['memory_per_call_bytes'] / 1024:.0f} KiB per call")
        bursts = [s["setup_burst"] for s in phase["steps"] if s.get("setup_burst", {}).get("calls")]
        if bursts:
            best = max(bursts, key=lambda b: b["per_s_per_worker"])
            lines.append(
                f"- Setup: up to {best['per_s_per_worker']:.1f} calls/s per worker core "
                f"({best['calls']} calls in {best['seconds']:.1f} s, {best['concurrency']} at "
                f"once, the desk phone ringing 1.5 s each; loop lag p99 up to "
                f"{best['lag_p99_ms_max']:.0f} ms meanwhile)")
        flagged = [f"{s['calls']} calls: " + "; ".join(s["verdict"]["warnings"])
                   for s in phase["steps"] if s["verdict"].get("warnings")]
        if flagged:
            lines.append("- Frames dropped by the relay (not a failure criterion): "
                         + " | ".join(flagged))
        lines += ["", _steps_table(phase), ""]
    noise = _noise(result)
    if noise:
        lines += [noise, ""]
    comp = result.get("comparison")
    if comp:
        lines += [
            "## Ours against the baseline",
            "",
            f"- Capacity per core: {comp['capacity_ratio']}x the baseline's"
            if comp["capacity_ratio"] is not None else
            "- Capacity per core: the baseline carried no step within the criteria; "
            f"from CPU per call alone ours is {comp['extrapolated_capacity_ratio']}x",
            f"- Worker CPU per call: the baseline needs {comp['cpu_per_call_ratio']}x ours "
            f"({100 * comp['baseline_cpu_per_call_net']:.2f} % vs "
            f"{100 * comp['ours_cpu_per_call_net']:.2f} % of a core"
            + (f", both at {comp['cpu_compared_at_calls']} calls)"
               if comp["cpu_compared_at_calls"] else ", at each one's first step)")
            + (f"; {comp['cpu_per_call_ratio_at_capacity']}x when each runs at its capacity "
               f"step ({comp['capacity_steps'][0]} vs {comp['capacity_steps'][1]} calls)"
               if comp.get("cpu_per_call_ratio_at_capacity") else ""),
            "",
        ]
    jc = result.get("janus_comparison")
    if jc:
        lines += [
            "## Ours against Janus 1.1.2",
            "",
            "- Capacity per core: "
            + (f"ours / Janus = **{jc['capacity_ratio']}x**" if jc["capacity_ratio"] is not None
               else "Janus passed no step")
            + (f" (from CPU per call alone: {jc['extrapolated_capacity_ratio']}x)"
               if jc["extrapolated_capacity_ratio"] is not None else ""),
            f"- Worker CPU per call: Janus needs {jc['cpu_per_call_ratio']}x ours "
            f"({100 * jc['baseline_cpu_per_call_net']:.2f} % vs "
            f"{100 * jc['ours_cpu_per_call_net']:.2f} % of a core"
            + (f", both at {jc['cpu_compared_at_calls']} calls)"
               if jc["cpu_compared_at_calls"] else ", at each one's first step)"),
            "- Janus's full call: two echotest VP8 streams + one SIP-plugin PCMU call to the "
            "same desk phone, the same media from the same callers; Janus runs pinned to the "
            "worker core(s) with its default threads (one per handle).",
            "",
        ]
    tcp = result.get("transport_comparison")
    if tcp:
        lines += _transport_lines(tcp)
    lines.append("Figures: report.json; plot: plot.png. How to read them: docs/capacity.md.")
    path.write_text("\n".join(lines) + "\n")


def _calls(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _transport_lines(tcp: dict[str, Any]) -> list[str]:
    at = tcp["cpu_compared_at_calls"]
    ratio = tcp["tcp_cpu_ratio"]
    setup, agent, n = (tcp["offer_to_dtls_p50_ms"], tcp["agent_offer_to_dtls_p50_ms"],
                       tcp["calls_placed"])
    return [
        "## Ours over ICE-TCP against ours over UDP",
        "",
        f"- Worker CPU per call: {100 * tcp['tcp_cpu_per_call_net']:.2f} % of a core over "
        f"TCP, {100 * tcp['udp_cpu_per_call_net']:.2f} % over UDP"
        + (f" ({ratio}x)" if ratio is not None else "")
        + (f", both at {at} calls" if at else ", at each one's first step"),
        f"- Capacity per core: {_calls(tcp['tcp_capacity_per_core'])} over TCP, "
        f"{_calls(tcp['udp_capacity_per_core'])} over UDP",
        f"- Offer sent -> DTLS connected, p50: customer leg {_ms(setup['tcp'])} over TCP, "
        f"{_ms(setup['udp'])} over UDP; agent leg {_ms(agent['tcp'])} / {_ms(agent['udp'])} "
        f"(medians of the {n['tcp']} / {n['udp']} calls placed in steps "
        f"{', '.join(map(str, tcp['setup_compared_over_steps']))})",
        "",
    ]


def _noise(result: dict[str, Any]) -> str:
    """A warning when processes other than the bench's ran on its cores (a shared machine):
    they take turns with the worker, which shows up as loop lag the appliance did not
    cause."""
    worst_worker = worst_gen = 0.0
    for phase in result["phases"].values():
        for step in phase["steps"]:
            noise = step["machine_noise"]
            worst_worker = max(worst_worker, noise["other_cores_on_worker_cores"])
            worst_gen = max(worst_gen, noise["other_cores_on_generator_cores"])
    if worst_worker < NOISE_CORES and worst_gen < NOISE_CORES:
        return ""
    return (f"**The machine was not quiet**: other processes used up to {worst_worker:.2f} "
            f"of the worker's core(s) and {worst_gen:.2f} of the generator's during the "
            "measured steps. Loop lag and the generator's timing suffer first; rerun on an "
            "idle machine before quoting these figures.")


def _steps_table(phase: dict[str, Any]) -> str:
    rows = ["| calls | worker cores | CPU/call | loss | jitter ms (audio/video) | fps "
            "(cust./agent) | lag p99 ms | setup p95 ms (DTLS/SIP/agent) | failed | generator "
            "| verdict |",
            "|---:|---:|---:|---:|---|---|---:|---|---:|---|---|"]
    for s in phase["steps"]:
        w, g, media, setup = s["worker"], s["generator"], s["media"], s["setup_ms"]

        def num(v: float | None, fmt: str = "{:.1f}") -> str:
            return "-" if v is None else fmt.format(v)

        jitter = "/".join(num(media[k]["jitter_ms_mean"]) for k in ("user_audio", "user_video"))
        fps = "/".join(num(media[k]["frames_per_s_per_stream"], "{:.0f}")
                       for k in ("user_video", "agent_video"))
        setups = "/".join(num(setup[k]["p95"], "{:.0f}")
                          for k in ("user_dtls", "sip_answer", "agent_dtls"))
        v = s["verdict"]
        gen = f"{g['cores']:.2f} cores" + (" SATURATED" if v["generator_saturated"] else "")
        rows.append(
            f"| {s['calls']} | {w['cores']:.3f} | {100 * w['cpu_per_call']:.2f} % | "
            f"{_pct(s['loss_pct'])} | {jitter} | {fps} | {num(w['loop_lag_p99_ms'])} | "
            f"{setups} | {s['failed_calls']} | {gen} | "
            f"{'pass' if v['pass'] else 'FAIL'} |")
    return "\n".join(rows)


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a rack server or in CI
    import matplotlib.pyplot as plt

    criteria = result["options"]["criteria"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    cpu_ax, loss_ax, lag_ax = axes
    for relay, phase in result["phases"].items():
        steps = phase["steps"]
        if not steps:
            continue
        # x = the calls really up during the hold (a failing step may carry fewer than
        # it asked for); hollow markers: the step failed, its figures are past the limit.
        calls = [s["calls_measured"] or s["calls"] for s in steps]
        colour = COLOURS.get(relay)
        series = (
            (cpu_ax, [100 * s["worker"]["cpu_per_call"] for s in steps]),
            (loss_ax, [s["loss_pct"] or 0.0 for s in steps]),
            (lag_ax, [float("nan") if s["worker"]["loop_lag_p99_ms"] is None
                      else s["worker"]["loop_lag_p99_ms"] for s in steps]),
        )
        passed = [s["verdict"]["pass"] for s in steps]
        for ax, values in series:
            ax.plot(calls, values, color=colour, label=phase["name"])
            ax.scatter([c for c, ok in zip(calls, passed, strict=True) if ok],
                       [v for v, ok in zip(values, passed, strict=True) if ok], color=colour,
                       zorder=3)
            ax.scatter([c for c, ok in zip(calls, passed, strict=True) if not ok],
                       [v for v, ok in zip(values, passed, strict=True) if not ok],
                       facecolors="white", edgecolors=colour, zorder=3)
        cap = phase["capacity"]
        if cap and cap["capacity_step_calls"]:
            for ax in axes:
                ax.axvline(cap["capacity_step_calls"], color=COLOURS.get(relay), alpha=0.25,
                           linestyle=":")
    cpu_ax.set_title("worker CPU per call")
    cpu_ax.set_ylabel("% of one core per call")
    cpu_ax.set_yscale("log")
    loss_ax.set_title("packet loss at the receivers")
    loss_ax.set_ylabel("loss %")
    loss_ax.axhline(criteria["max_loss_pct"], color="grey", linestyle="--", linewidth=1,
                    label=f"limit {criteria['max_loss_pct']:g} %")
    lag_ax.set_title("worker event-loop lag p99")
    lag_ax.set_ylabel("ms")
    lag_ax.axhline(criteria["max_lag_p99_ms"], color="grey", linestyle="--", linewidth=1,
                   label=f"limit {criteria['max_lag_p99_ms']:g} ms")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    calls_seen = sorted({s["calls_measured"] or s["calls"]
                         for p in result["phases"].values() for s in p["steps"]})
    for ax in axes:
        ax.set_xlabel("concurrent calls")
        ax.set_xscale("log", base=2)
        if calls_seen:
            ax.set_xticks(calls_seen)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cpu_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} %"))
    cpu_ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    loss_ax.set_ylim(bottom=0, top=max(loss_ax.get_ylim()[1], 1.5 * criteria["max_loss_pct"]))
    lag_ax.set_ylim(bottom=0)
    jc = result.get("janus_comparison")
    versus = ""
    if jc and (jc["capacity_ratio"] or jc["extrapolated_capacity_ratio"]):
        ratio = jc["capacity_ratio"] or jc["extrapolated_capacity_ratio"]
        versus = f"; ours / Janus per core {ratio}x" + ("" if jc["capacity_ratio"] else " (by CPU)")
    fig.suptitle(f"Capacity bench {result['started']} — {result['machine']['cpu_model']}, "
                 f"{result['options']['workers']} worker(s){versus}; dotted: capacity step; "
                 "hollow: failed step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
