"""The `appliance` command: run, aps, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from appliance import config as cfg

log = logging.getLogger("appliance")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s supervisor %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    from appliance.aps.server import run_forever

    _setup_logging("INFO")
    run_forever(args.host, args.port, args.db)


def cmd_demo(args: argparse.Namespace) -> None:
    """The appliance and the reference AP-S together, on this machine."""
    import uvloop

    from appliance.aps.server import serve as serve_aps
    from supervisor.main import serve

    config = _load(args.config)
    _setup_logging(config.appliance.log_level)
    aps_host, _, aps_port = config.aps.url.removeprefix("http://").partition(":")
    aps_db = config.data_path / "aps" / "aps.sqlite3"

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        aps = await serve_aps(aps_host or "127.0.0.1", int(aps_port.rstrip("/") or 8480), aps_db)
        host = config.signalling.listen
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        print(
            "\nDemo running:\n"
            f"  signalling (WebSocket) : wss://{shown}:{config.signalling.port}/\n"
            f"  reference AP-S         : {config.aps.url}  (call records: {config.aps.url}/cdr)\n"
            f"  data directory         : {config.data_path}\n"
            "  desk phone             : none yet; calls stop after DTLSconnect until the\n"
            "                           SIP leg lands (see the issues)\n"
            "  place a call from Python: see README.md, 'Place a test call'\n"
            "Stop with Ctrl-C.\n",
            flush=True,
        )
        try:
            await serve(config, stop)
        finally:
            await aps.cleanup()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the appliance (supervisor + media workers)")
    run.add_argument("--config", help="TOML config file (default: built-in defaults)")
    run.set_defaults(func=cmd_run)

    aps = sub.add_parser("aps", help="run the reference AP-S (application server)")
    aps.add_argument("--host", default="127.0.0.1")
    aps.add_argument("--port", type=int, default=8480)
    aps.add_argument("--db", default=str(Path("data") / "aps" / "aps.sqlite3"))
    aps.set_defaults(func=cmd_aps)

    demo = sub.add_parser("demo", help="appliance + reference AP-S on this machine")
    demo.add_argument("--config", default=None)
    demo.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
