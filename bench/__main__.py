"""`python -m bench run [options]`: the capacity bench (see docs/capacity.md).

    tests/in-loopback-netns.sh .venv/bin/python -m bench run
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from bench import analysis, system
from bench.run import DEFAULT_STEPS, TRANSPORTS, Options


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}") from None
    if not steps or any(s <= 0 for s in steps) or list(steps) != sorted(set(steps)):
        raise argparse.ArgumentTypeError("steps must be positive and increasing")
    return steps


def _transports(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    if not chosen or not set(chosen) <= set(TRANSPORTS):
        raise argparse.ArgumentTypeError(f"transports are {', '.join(TRANSPORTS)}: {text!r}")
    return chosen


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ramp calls against the appliance (and the baseline)")
    run.add_argument("--steps", type=_steps, default=DEFAULT_STEPS,
                     help="concurrent calls per step, increasing; earlier calls stay up "
                          f"(default {','.join(map(str, DEFAULT_STEPS))})")
    run.add_argument("--hold", type=float, default=20.0,
                     help="seconds each step is measured (default 20)")
    run.add_argument("--settle", type=float, default=5.0,
                     help="seconds between a step's setup and its measurement (default 5)")
    run.add_argument("--idle", type=float, default=3.0,
                     help="seconds the idle worker is measured before the first step")
    run.add_argument("--workers", type=int, default=1,
                     help="media workers, one per core from core 0 up (default 1)")
    run.add_argument("--callers", type=int, default=0,
                     help="load-generator processes (default: one per core left over)")
    run.add_argument("--no-baseline", action="store_true",
                     help="skip the media.relay='aiortc' baseline phase")
    run.add_argument("--results-dir", type=Path, default=None,
                     help="where report.json, summary.md and plot.png go "
                          "(default bench/results/<timestamp>)")
    run.add_argument("--cache-dir", type=Path, default=Options.cache_dir,
                     help="pre-encoded media cache (default bench/results/cache)")
    run.add_argument("--address", default="127.0.0.1",
                     help="address the callers announce in ICE (default 127.0.0.1)")
    run.add_argument("--record", action="store_true",
                     help="record every call (offer record: 1): measures the recorder's cost")
    run.add_argument("--audio", choices=("PCMU", "OPUS"), default="PCMU",
                     help="the customer's voice codec: PCMU is relayed to the desk phone "
                          "untouched, OPUS makes the appliance transcode (default PCMU)")
    run.add_argument("--transports", type=_transports, default=("udp",),
                     help="the callers' ICE transport, one phase of ours each: udp, tcp "
                          "(every leg over ICE-TCP, RFC 6544) or udp,tcp to compare them in "
                          "one run (default udp; the baseline runs over UDP)")
    run.add_argument("--no-janus", action="store_true",
                     help="skip the Janus phase (run by default when Debian's janus is "
                          "installed: the same calls on Janus 1.1.2, ours / Janus per core)")
    run.add_argument("--generator", choices=("native", "python"), default="native",
                     help="how the callers send and count media: native (the native loop, "
                          "where it is built; ICE-TCP legs stay Python) or python")
    run.add_argument("--setup-concurrency", type=int, default=8,
                     help="calls being set up at once, over all caller processes")
    run.add_argument("--setup-timeout", type=float, default=45.0)
    run.add_argument("--stop-after-failures", type=int, default=2,
                     help="failing steps after which a phase's ramp stops (default 2)")
    rerun = sub.add_parser("report", help="judge a finished run again (e.g. other criteria) "
                                          "and rewrite its summary.md, plot.png, report.json")
    rerun.add_argument("results_dir", type=Path)
    for command in (run, rerun):
        command.add_argument("--max-loss", type=float, default=1.0,
                             help="loss %% a step may have (default 1)")
        command.add_argument("--max-lag", type=float, default=20.0,
                             help="worker loop lag p99 (ms) a step may have (default 20)")
        command.add_argument("--headroom", type=float, default=0.8,
                             help="core fraction used when extrapolating capacity (default 0.8)")
    return top


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    criteria = analysis.Criteria(max_loss_pct=args.max_loss, max_lag_p99_ms=args.max_lag,
                                 headroom_cores=args.headroom)
    if args.command == "report":  # no packets: no namespace needed
        from bench.run import rewrite

        rewrite(args.results_dir, criteria)
        return
    if args.workers < 1 or args.callers < 0:
        sys.exit("bench: --workers must be >= 1 and --callers >= 0")
    try:
        loopback = ipaddress.ip_address(args.address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # Pointing the callers at another box means leaving loopback: see docs/capacity.md.
        sys.exit(f"bench: --address {args.address!r} is not a loopback address")
    system.ensure_loopback_namespace(argv)
    options = Options(
        steps=args.steps, hold=args.hold, settle=args.settle, idle=args.idle,
        workers=args.workers, callers=args.callers, baseline=not args.no_baseline,
        results_dir=args.results_dir, cache_dir=args.cache_dir, address=args.address,
        audio=args.audio,
        record=args.record, transports=args.transports, generator=args.generator,
        janus=not args.no_janus,
        setup_concurrency=args.setup_concurrency, setup_timeout=args.setup_timeout,
        stop_after_failures=args.stop_after_failures,
        criteria=criteria,
    )
    from bench.run import main as run_main

    run_main(options)


if __name__ == "__main__":
    main()
