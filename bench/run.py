"""The capacity run: ramp concurrent calls in steps against the appliance, then against the
aiortc baseline, and judge each step.

    tests/in-loopback-netns.sh .venv/bin/python -m bench run [--steps 1,2,4,...] [--hold 20]

One reference AP-S (in this process) and one sipp (the desk phones, echoing the voice)
serve the whole run. Per phase the appliance is started with one relay mode; its workers
are pinned by the supervisor (worker i on the i-th core) and everything else — the caller
processes, sipp, the supervisor and this runner — is pinned to the other cores, so the
load does not steal the worker's core. Calls of earlier steps stay up as a step adds more.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import analysis, measure, report, system
from bench.control import ChildProcess
from bench.desk import DeskPhones, start_desk_phones
from bench.media_cache import load_or_make_clip, load_or_make_opus, load_or_make_pcmu
from bench.stack import ApplianceUnderTest, JanusUnderTest, start_appliance
from reference_aps.server import serve as serve_aps
from tests.e2e.conftest import free_udp_ports

log = logging.getLogger("bench.run")

RELAYS = {"packet": "ours (packet relay)", "aiortc": "baseline (aiortc decode + re-encode)",
          "janus": "Janus (echotest x2 + SIP plugin, the C reference)"}
TRANSPORTS = ("udp", "tcp")  # what the callers' ICE uses: UDP, or ICE-TCP (RFC 6544)
# Doubling at first, then finer where a Python worker core is expected to run out.
DEFAULT_STEPS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 96, 128)
PROGRESS_EVERY = 5.0


@dataclass
class Options:
    steps: tuple[int, ...] = DEFAULT_STEPS
    hold: float = 20.0
    settle: float = 5.0
    idle: float = 3.0
    workers: int = 1
    callers: int = 0  # 0: one process per core left to the load generator
    baseline: bool = True
    results_dir: Path | None = None
    cache_dir: Path = system.ROOT / "bench" / "results" / "cache"
    address: str = "127.0.0.1"
    audio: str = "PCMU"  # the customer's codec; "OPUS" measures the transcoding path
    record: bool = False  # every call recorded (offer record: 1): the recorder's cost
    # Our relay is measured once per transport; the baseline over UDP only.
    transports: tuple[str, ...] = ("udp",)
    generator: str = "native"  # the callers' media: "native" (bench.native_leg) or "python"
    janus: bool = True  # a Janus phase when Debian's janus is installed (bench.janus)
    setup_concurrency: int = 8
    setup_timeout: float = 45.0
    stop_after_failures: int = 2  # one step past the limit shows the cliff on the plot
    criteria: analysis.Criteria = field(default_factory=analysis.Criteria)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["results_dir"] = str(self.results_dir)
        out["cache_dir"] = str(self.cache_dir)
        return out


def say(text: str) -> None:
    print(text, flush=True)


class Bench:
    def __init__(self, options: Options, out: Path) -> None:
        self.o = options
        self.out = out
        self.cores = system.usable_cores()
        self.worker_cores = sorted(set(system.supervisor_worker_cores(options.workers,
                                                                      self.cores)))
        spare = [c for c in self.cores if c not in self.worker_cores]
        # With no core left over the generator shares the workers' cores: reported, since
        # the worker's figures then include the contention.
        self.cores_shared = not spare
        self.gen_cores = spare or self.cores
        self.callers = options.callers or max(1, len(self.gen_cores))
        self.aps_db = out / "aps.sqlite3"
        self.aps_url = ""
        self.desk: DeskPhones | None = None

    async def run(self) -> dict[str, Any]:
        o = self.o
        say(f"bench: {len(self.cores)} usable core(s); worker(s) on core(s) "
            f"{self.worker_cores}, load generator on {self.gen_cores}"
            + (" (SHARED with the workers)" if self.cores_shared else ""))
        # This runner (and the in-process AP-S) belongs to the load side of the machine.
        system.pin_process(os.getpid(), self.gen_cores)
        t = time.monotonic()
        if o.audio == "OPUS":
            load_or_make_opus(o.cache_dir)
        else:
            load_or_make_pcmu(o.cache_dir)
        clip = load_or_make_clip(o.cache_dir)
        say(f"bench: media cache ready in {time.monotonic() - t:.1f} s: VP8 "
            f"{clip.params.width}x{clip.params.height} {clip.params.fps} fps, "
            f"{clip.bitrate / 1000:.0f} kbit/s, {clip.packets_per_second:.0f} packets/s, "
            f"keyframes at {list(clip.keyframes)}")
        aps = await serve_aps("127.0.0.1", 0, self.aps_db)
        host, port = aps.addresses[0][:2]
        self.aps_url = f"http://{host}:{port}"
        plan = [("packet", t) for t in o.transports] + ([("aiortc", "udp")] if o.baseline
                                                         else [])
        from bench import janus

        if o.janus and janus.INSTALLED:
            plan.append(("janus", "udp"))
        elif o.janus:
            say(f"bench: no Janus phase: {janus.WHY_NOT}")
        self.desk = await start_desk_phones(
            self.out / "sipp", calls=len(plan) * max(o.steps) + 16,
            media_port=free_udp_ports(4), cores=self.gen_cores)
        phases: dict[str, Any] = {}
        try:
            for relay, transport in plan:
                phases[phase_key(relay, transport)] = await self.phase(relay, transport)
        finally:
            await self.desk.stop()
            await aps.cleanup()
        result = {
            "started": self.out.name,
            "machine": system.machine_facts(),
            "layout": {
                "worker_cores": self.worker_cores,
                "generator_cores": self.gen_cores,
                "cores_shared": self.cores_shared,
                "caller_processes": self.callers,
                "pinned_to_generator_cores": ["caller processes", "sipp", "supervisor",
                                              "runner + AP-S"],
            },
            "options": o.as_dict(),
            "media": {"video": {**asdict(clip.params), "bitrate_actual": round(clip.bitrate),
                                "packets_per_s": round(clip.packets_per_second, 1),
                                "keyframes": list(clip.keyframes)},
                      "audio": {"codec": o.audio, "ptime_ms": 20, "packets_per_s": 50,
                                "transcoded_by_appliance": o.audio != "PCMU"},
                      "recorded": o.record},
            "phases": phases,
        }
        analysis.compare_phases(result)
        return result

    async def phase(self, relay: str, transport: str = "udp") -> dict[str, Any]:
        o = self.o
        assert self.desk is not None
        key = phase_key(relay, transport)
        name = RELAYS[relay] + (" over ICE-TCP" if transport == "tcp" else "")
        workdir = self.out / key
        aut: ApplianceUnderTest | JanusUnderTest
        if relay == "janus":
            say(f"\n== {name}: starting Janus on core(s) {self.worker_cores}")
            aut = await JanusUnderTest.start(workdir / "janus", self.worker_cores)
        else:
            say(f"\n== {name}: starting the appliance ({o.workers} worker(s), media.relay="
                f"{relay!r}, callers over {transport.upper()})")
            aut = await start_appliance(relay, workdir / "appliance", o.workers, max(o.steps),
                                        self.aps_url, self.desk.address, o.address,
                                        self.cores)
        callers: list[ChildProcess] = []
        steps: list[dict[str, Any]] = []
        setups: list[dict[str, Any]] = []  # every call's setup times, over all steps
        idle: dict[str, Any] = {}
        try:
            status = await aut.status_async()
            workers = {w["index"]: w["pid"] for w in status["workers"]}
            actual = sorted({w["core"] for w in status["workers"]})
            if actual != self.worker_cores:
                say(f"  note: the supervisor pinned workers to {actual}, "
                    f"expected {self.worker_cores}")
            if not self.cores_shared and relay != "janus":
                system.pin_process(aut.pid, self.gen_cores)  # the supervisor, not its workers
            callers = await self.start_callers(aut, key, transport, workdir)
            procs = measure.Processes(workers, aut.pid, callers, self.desk)
            idle = await self.idle(procs, aut)
            say(f"  idle worker: {sum(idle['worker_cores'].values()):.4f} cores, "
                f"RSS {sum(idle['rss'].values()) / 2**20:.0f} MiB")
            failures = 0
            placed = 0
            for number, target in enumerate(o.steps, 1):
                step = await self.step(number, target, placed, procs, aut, callers, idle,
                                       setups)
                placed = max(placed, target)
                steps.append(step)
                if not step["verdict"]["pass"]:
                    failures += 1
                    if failures >= o.stop_after_failures:
                        say(f"  stopping the ramp: {'; '.join(step['verdict']['reasons'])}")
                        break
        finally:
            await asyncio.gather(*(c.stop() for c in callers), return_exceptions=True)
            await asyncio.sleep(1)  # the appliance's BYEs reach sipp before it stops
            log_tail = aut.log_tail()
            await aut.stop()
        idle_total = sum(idle["worker_cores"].values()) if idle else 0.0
        cap = analysis.capacity(steps, o.workers, idle_total, o.criteria) if steps else None
        return {
            "relay": relay,
            "transport": transport,
            "name": name,
            "config": aut.sections,
            "setup_ms": measure.summarize_setup([{"setup_ms": s} for s in setups]),
            # Each call's setup times with the step that placed it (transport_comparison
            # pools the steps two phases have in common).
            "setups": setups,
            "idle": idle or None,
            "steps": steps,
            "capacity": cap,
            "appliance_log_tail": log_tail if not steps or not steps[-1]["verdict"]["pass"]
            else "",
        }

    async def start_callers(self, aut: ApplianceUnderTest | JanusUnderTest, key: str,
                            transport: str,
                            workdir: Path) -> list[ChildProcess]:
        o = self.o
        per = max(1, math.ceil(o.setup_concurrency / self.callers))
        starts = []
        for k in range(self.callers):
            janus = ["--janus-url", aut.url, "--desk", self.desk.address] \
                if isinstance(aut, JanusUnderTest) and self.desk is not None else []
            argv = [sys.executable, "-m", "bench.caller", "--url", aut.url, *janus,
                    "--aps-db", str(self.aps_db), "--cache-dir", str(o.cache_dir),
                    "--address", o.address, "--audio", o.audio,
                    *(["--record"] if o.record else []),
                    "--transport", transport.upper(), "--generator", o.generator,
                    # Unique per phase: AP-S sees every call of the run.
                    "--identity-prefix", f"B{key[:1].upper()}{transport[:1].upper()}{k}-",
                    "--setup-concurrency", str(per), "--setup-timeout", str(o.setup_timeout),
                    "--seed", str(k + 1)]
            starts.append(ChildProcess.start(f"caller{k}", argv, workdir / f"caller{k}.log",
                                             self.gen_cores))
        return list(await asyncio.gather(*starts))

    @staticmethod
    async def sample_lag(aut: ApplianceUnderTest, into: list[float]) -> None:
        """The workers' loop-lag p99 every half second, until cancelled."""
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):  # the status page is busy: next time
                status = await aut.status_async()
                lags = [w["loop_lag_p99_ms"] for w in status["workers"]
                        if w.get("loop_lag_p99_ms") is not None]
                if lags:
                    into.append(max(lags))

    async def idle(self, procs: measure.Processes, aut: ApplianceUnderTest) -> dict[str, Any]:
        await asyncio.sleep(1.0)
        cpu0 = {i: system.cpu_seconds([p]) for i, p in procs.workers.items()}
        t0 = time.monotonic()
        await asyncio.sleep(self.o.idle)
        dt = time.monotonic() - t0
        return {
            "seconds": round(dt, 2),
            "worker_cores": {str(i): round((system.cpu_seconds([p]) - cpu0[i]) / dt, 5)
                             for i, p in procs.workers.items()},
            "rss": {str(i): measure._rss(p) for i, p in procs.workers.items()},
        }

    async def step(self, number: int, target: int, placed: int, procs: measure.Processes,
                   aut: ApplianceUnderTest, callers: list[ChildProcess],
                   idle: dict[str, Any], setups: list[dict[str, Any]]) -> dict[str, Any]:
        o = self.o
        new = list(range(placed, target))
        say(f"-- step {number}: {target} call(s) ({len(new)} new)")
        t = time.monotonic()
        setup: list[dict[str, Any]] = []
        lag_in_setup: list[float] = []
        if new:
            # The worker's loop lag while it sets calls up: DTLS handshakes must not stall
            # the relaying of the calls already up.
            sampler = asyncio.create_task(self.sample_lag(aut, lag_in_setup))
            batches = [new[k::len(callers)] for k in range(len(callers))]
            try:
                replies = await asyncio.gather(*(
                    c.request("add", indexes=batch)
                    for c, batch in zip(callers, batches, strict=True) if batch))
            finally:
                sampler.cancel()
            setup = [r for reply in replies for r in reply["results"]]
            setups.extend({"step": target, **r["setup_ms"]} for r in setup
                          if r["state"] == "up")
        setup_s = time.monotonic() - t
        failed_setup = [r for r in setup if r["state"] != "up"]
        burst = measure.setup_burst(setup, setup_s, o.setup_concurrency, o.workers,
                                    lag_in_setup)
        say(f"   set up in {setup_s:.1f} s"
            + (f" ({burst['per_s']:.1f} calls/s, lag p99 up to "
               f"{burst['lag_p99_ms_max']:.0f} ms)" if new else "")
            + (f", {len(failed_setup)} FAILED: {failed_setup[0]['failure']}"
               if failed_setup else ""))
        await asyncio.sleep(o.settle)
        a = await measure.take(procs, aut)
        lag_seen: list[float] = []
        start = time.monotonic()
        next_progress = start + PROGRESS_EVERY
        while (now := time.monotonic()) < start + o.hold:
            await asyncio.sleep(min(1.0, start + o.hold - now))
            status = await aut.status_async()
            lags = [w["loop_lag_p99_ms"] for w in status["workers"]
                    if w.get("loop_lag_p99_ms") is not None]
            if lags:
                lag_seen.append(max(lags))
            if time.monotonic() >= next_progress and time.monotonic() < start + o.hold - 1:
                next_progress += PROGRESS_EVERY
                mid = await measure.take(procs, aut, reset_generator_lag=False)
                fig = measure.step_figures(a, mid, target, idle, self.gen_cores,
                                           self.worker_cores, [], lag_seen)
                say("   " + progress_line(fig, time.monotonic() - start, o.hold))
        b = await measure.take(procs, aut)
        step = measure.step_figures(a, b, target, idle, self.gen_cores, self.worker_cores,
                                    setup, lag_seen)
        step["setup_burst"] = burst
        step["verdict"] = analysis.judge_step(step, o.workers, o.criteria, self.cores_shared)
        v = step["verdict"]
        say("   " + progress_line(step, step["seconds"], o.hold) + "  =>  "
            + ("PASS" if v["pass"] else "FAIL: " + "; ".join(v["reasons"]))
            + ("  [generator saturated: " + "; ".join(v["generator_signs"]) + "]"
               if v["generator_saturated"] else ""))
        return step


def phase_key(relay: str, transport: str) -> str:
    """report.json's name for a phase: the relay, with "-tcp" when the callers use TCP."""
    return relay if transport == "udp" else f"{relay}-{transport}"


def progress_line(fig: dict[str, Any], elapsed: float, hold: float) -> str:
    w, g = fig["worker"], fig["generator"]
    loss = "n/a" if fig["loss_pct"] is None else f"{fig['loss_pct']:.2f} %"
    fps = [fig["media"][k]["frames_per_s_per_stream"] for k in ("user_video", "agent_video")]
    return (f"t={elapsed:4.0f}/{hold:.0f} s  calls up {fig['calls_measured']:>3}  "
            f"loss {loss}  worker {w['cores']:.3f} cores ({100 * w['cpu_per_call']:.2f} %/call)"
            + (f"  lag p50/p99 {w['loop_lag_p50_ms']:.1f}/{w['loop_lag_p99_ms']:.1f} ms  "
               if w["loop_lag_p99_ms"] is not None else "  ")
            +
            f"video fps {'/'.join('-' if f is None else f'{f:.0f}' for f in fps)}  "
            f"generator {g['cores']:.2f} cores")


def main(options: Options) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = options.results_dir or (system.ROOT / "bench" / "results" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    options.results_dir = out
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    say(f"bench: results in {out}")
    started = time.monotonic()
    result = asyncio.run(Bench(options, out).run())
    result["duration_s"] = round(time.monotonic() - started, 1)
    write_outputs(result, out)
    return out


def write_outputs(result: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    report.write_summary(result, out / "summary.md")
    report.write_plot(result, out / "plot.png")
    say("\n" + (out / "summary.md").read_text())
    say(f"bench: report.json, summary.md and plot.png in {out}")


def rewrite(out: Path, criteria: analysis.Criteria) -> None:
    """`python -m bench report DIR`: judge a finished run again and rewrite its outputs."""
    result = json.loads((out / "report.json").read_text())
    write_outputs(analysis.rejudge(result, criteria), out)
