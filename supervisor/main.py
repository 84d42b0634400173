"""`appliance run`: bring up the supervisor, its workers and the public port; stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import msgspec
from aiohttp import web

from appliance import config as cfg
from appliance.tls import ensure_certificate, server_context
from supervisor.app import Supervisor
from supervisor.front import build_app

log = logging.getLogger("appliance.supervisor")


def prepare_data_dir(config: cfg.Config) -> str:
    """Create the data directory layout; write the effective config the workers read."""
    data = config.data_path
    for sub in ("run", "tls", "recordings"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    effective = data / "run" / "effective-config.json"
    tmp = effective.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(config))
    os.replace(tmp, effective)
    sock = data / "run" / "bus.sock"
    if sock.exists():  # left by a previous run that was killed
        sock.unlink()
    return str(effective)


async def serve(config: cfg.Config, stop: asyncio.Event) -> None:
    effective = prepare_data_dir(config)
    cert, key = ensure_certificate(
        config.data_path, config.signalling.tls_cert, config.signalling.tls_key
    )
    supervisor = Supervisor(config, effective)
    await supervisor.start()
    runner = web.AppRunner(build_app(supervisor), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner,
        config.signalling.listen,
        config.signalling.port,
        ssl_context=server_context(cert, key),
        shutdown_timeout=2,
    )
    await site.start()
    admin_runner = await _start_admin(config, supervisor)
    try:
        await supervisor.wait_ready()
    except TimeoutError:
        log.error("not every worker came up in time; serving with those that did")
    log.info(
        "appliance %s ready: wss://%s:%d/ with %d worker(s) x %d channel(s)",
        config.appliance.id,
        config.signalling.listen,
        config.signalling.port,
        len(supervisor.placement.slots),
        config.workers.channels_per_worker,
    )
    print(f"READY wss://{config.signalling.listen}:{config.signalling.port}/", flush=True)
    await stop.wait()
    log.info("stop requested")
    await supervisor.shutdown()
    await runner.cleanup()
    if admin_runner is not None:
        await admin_runner.cleanup()
    log.info("appliance stopped")


async def _start_admin(config: cfg.Config, supervisor: Supervisor) -> web.AppRunner | None:
    """The operator's port: /metrics (Prometheus text) and /status (JSON)."""
    if config.admin.port == 0:
        return None

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=supervisor.health.prometheus(),
                            content_type="text/plain", charset="utf-8")

    async def status(_: web.Request) -> web.Response:
        return web.json_response(supervisor.health.status())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, config.admin.listen, config.admin.port).start()
    log.info("admin: http://%s:%d/metrics and /status", config.admin.listen, config.admin.port)
    return runner


def run(config: cfg.Config) -> None:
    import uvloop

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    uvloop.run(main())
