"""The `appliance` command: run, aps, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.core import config as cfg
from appliance.core import logsafe

if TYPE_CHECKING:
    from reference_aps.server import AgentLinks

log = logging.getLogger("appliance")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s supervisor %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logsafe.install()


def _load(path: str | None) -> cfg.Config:
    try:
        return cfg.load(path)
    except cfg.ConfigError as exc:
        sys.exit(f"appliance: {exc}")


def cmd_run(args: argparse.Namespace) -> None:
    from supervisor.main import run

    config = _load(args.config)
    _setup_logging(config.appliance.log_level)
    run(config)


def cmd_aps(args: argparse.Namespace) -> None:
    from reference_aps.server import run_forever, security_options

    _setup_logging("INFO")
    run_forever(args.host, args.port, args.db, **security_options(args))


def cmd_demo(args: argparse.Namespace) -> None:
    """The appliance and the reference AP-S together, on this machine."""
    import uvloop

    from deskphone.phone import DeskPhone
    from reference_aps.server import serve as serve_aps
    from supervisor.main import serve

    config = _load(args.config)
    _setup_logging(config.appliance.log_level)
    aps_host, _, aps_port = config.aps.url.removeprefix("http://").partition(":")
    aps_db = config.data_path / "aps" / "aps.sqlite3"
    host = config.signalling.listen
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    api_token, agent = _demo_aps_security(
        config, f"https://{shown}:{config.signalling.port}/AgentVideo.html")

    def print_agent_link(roomkey: int, url: str) -> None:
        print(f"  agent page for call {roomkey}: {url}", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        aps = await serve_aps(aps_host or "127.0.0.1", int(aps_port.rstrip("/") or 8480), aps_db,
                              api_token=api_token, agent=agent, on_verified=print_agent_link)
        # The agent's desk phone, simulated: rings 2 s, answers, echoes the caller's voice.
        phone_host, _, phone_port = config.sip.proxy.rpartition(":")
        phone = await DeskPhone.start((phone_host, int(phone_port)), ring_seconds=2.0,
                                      mode="answer", rtp_address=phone_host)
        print(
            "\nDemo running:\n"
            f"  signalling (WebSocket) : wss://{shown}:{config.signalling.port}/\n"
            f"  reference AP-S         : {config.aps.url}  (call records: {config.aps.url}/cdr"
            f" with Authorization: Bearer $(cat {config.aps.api_token_file}))\n"
            f"  data directory         : {config.data_path}\n"
            f"  desk phone (simulated) : sip:9333@{config.sip.proxy} rings 2 s, answers and\n"
            "                           echoes your voice back\n"
            f"  customer page          : https://{shown}:{config.signalling.port}/VideoCall.html"
            "?caller=5678&callee=9333&userdata=%7B%22id%22%3A%22A123456789%22%7D\n"
            f"  agent page             : https://{shown}:{config.signalling.port}/AgentVideo.html"
            "?roomkey=... (printed below for each call)\n"
            f"  operator status        : appliance status --config {args.config or ''}"
            f" (metrics: http://{config.admin.listen}:{config.admin.port}/metrics)\n"
            "Stop with Ctrl-C.\n",
            flush=True,
        )
        try:
            await serve(config, stop)
        finally:
            await phone.close()
            await aps.cleanup()

    uvloop.run(main())


def _demo_aps_security(config: cfg.Config, agent_page: str) -> tuple[str, AgentLinks]:
    """The demo's AP-S API token (the appliance reads the same file) and agent links."""
    from appliance.core.token_file import TokenFileError, load_or_create_token
    from appliance.edges.aps_client import api_token_path
    from reference_aps.server import AgentLinks

    token_path = api_token_path(config) or config.data_path / "aps" / "api-token"
    config.aps.api_token_file = str(token_path)
    secret_file = config.aps.agent_token_secret_file
    try:
        api_token = load_or_create_token(token_path)
        secret = load_or_create_token(Path(secret_file)).encode() if secret_file else None
    except TokenFileError as exc:
        sys.exit(f"appliance: {exc}")
    return api_token, AgentLinks(page_url=agent_page, secret=secret)


def cmd_status(args: argparse.Namespace) -> None:
    """A readable table of the running appliance (from its admin port)."""
    import json
    import urllib.request

    if args.url:
        url = args.url.rstrip("/")
    else:
        admin = _load(args.config).admin
        url = f"http://{admin.listen}:{admin.port}"
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=5) as response:
            status = json.load(response)
    except OSError as exc:
        sys.exit(f"appliance: cannot read {url}/status: {exc}")
    print(render_status(status))


def render_status(status: dict) -> str:  # type: ignore[type-arg]
    lines = [f"appliance {status['appliance']}   cores busy: "
             + "  ".join(f"{i}:{p:.0f}%" for i, p in enumerate(status["cores_percent"]))]
    header = (f"{'worker':>6} {'pid':>7} {'core':>4} {'state':>9} {'calls':>9} {'cpu':>6} "
              f"{'mem MB':>7} {'lag p50/p99 ms':>15} {'placed':>7} {'failed':>6} "
              f"{'restarts':>8} {'pkts in/out':>17} {'decoders':>8}")
    lines += ["", header, "-" * len(header)]
    for w in status["workers"]:
        state = "silent" if w.get("silent") else (
            "degraded" if w["degraded"] else ("up" if w["ready"] else "down"))
        lines.append(
            f"{w['index']:>6} {w['pid'] or '-':>7} {w['core']:>4} {state:>9} "
            f"{w['channels_busy']:>4}/{w['channels_total']:<4} {w['cpu_cores']:>6.2f} "
            f"{w['rss_bytes'] / 1e6:>7.0f} "
            f"{w['loop_lag_p50_ms']:>7.1f}/{w['loop_lag_p99_ms']:<7.1f} "
            f"{w['calls_placed']:>7} {w['calls_failed']:>6} {w['restarts']:>8} "
            f"{w['packets_received']:>8}/{w['packets_sent']:<8} {w['decoders_created']:>8}"
        )
    lines += ["", f"live calls: {len(status['calls'])}"]
    for c in status["calls"]:
        lines.append(f"  channel {c['channel']:>4}  worker {c['worker']}  {c['module']:<5}  "
                     f"dialogid {c['dialogid']} ref {c['ref']}  up {c['age_s']:.0f} s")
    return "\n".join(lines)


def cmd_peer_key(args: argparse.Namespace) -> None:
    from supervisor.peer_keys import main_peer_key

    sys.exit(main_peer_key(["--config", args.config] if args.config else []))


def main(argv: list[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else argv
    # These two parse their own options (they are also run on their own, by the supervisor).
    if args_list[:1] == ["convert"]:
        from appliance.recording.convert import main_convert

        sys.exit(main_convert(args_list[1:]))
    if args_list[:1] == ["decrypt"]:
        from appliance.recording.crypto import main_decrypt

        sys.exit(main_decrypt(args_list[1:]))
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the appliance (supervisor + media workers)")
    run.add_argument("--config", help="TOML config file (default: built-in defaults)")
    run.set_defaults(func=cmd_run)

    aps = sub.add_parser("aps", help="run the reference AP-S (application server)")
    aps.add_argument("--host", default="127.0.0.1")
    aps.add_argument("--port", type=int, default=8480)
    aps.add_argument("--db", default=str(Path("data") / "aps" / "aps.sqlite3"))
    from reference_aps.server import add_security_arguments

    add_security_arguments(aps)  # API token file, agent-token secret, TTL, agent page URL
    aps.set_defaults(func=cmd_aps)

    demo = sub.add_parser("demo", help="appliance + reference AP-S on this machine")
    demo.add_argument("--config", default=None)
    demo.set_defaults(func=cmd_demo)

    status = sub.add_parser("status", help="show workers, cores and live calls")
    status.add_argument("--config", default=None, help="read the admin address from here")
    status.add_argument("--url", default=None, help="admin base URL, e.g. http://127.0.0.1:9090")
    status.set_defaults(func=cmd_status)

    # Listed for --help; main() hands their arguments to their own parsers.
    sub.add_parser("convert", help="the Convertor: mux, encrypt and verify one recording")
    sub.add_parser("decrypt", help="decrypt a recording: --roomkey N [--key-file F] FILE")

    peer_key = sub.add_parser("peer-key",
                              help="print this appliance's public key for peers' [peers]")
    peer_key.add_argument("--config", default=None)
    peer_key.set_defaults(func=cmd_peer_key)

    args = parser.parse_args(args_list)
    args.func(args)


if __name__ == "__main__":
    main()
