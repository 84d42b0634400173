"""`appliance run`: bring up the supervisor, its workers and the public port; stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import msgspec
from aiohttp import web

from appliance.core import config as cfg
from appliance.core import config_secrets
from appliance.core.private_files import create_private
from appliance.core.tls import ensure_certificate, server_context
from supervisor.app import Supervisor
from supervisor.front import GuardedSite, build_runner

log = logging.getLogger("appliance.supervisor")


def prepare_data_dir(config: cfg.Config) -> str:
    """Create the data directory layout; write the effective config the workers read.

    run/ (the bus socket, the effective config) and tls/ (the key) are 0700: only this
    user may connect to the bus or read them. The effective config holds no secret
    (appliance/core/config_secrets.py): the workers get those on their stdin."""
    data = config.data_path
    data.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "tls"):
        (data / sub).mkdir(mode=0o700, exist_ok=True)
        os.chmod(data / sub, 0o700)  # an existing directory, or a umask that widened it
    (data / "recordings").mkdir(mode=0o700, exist_ok=True)
    effective = data / "run" / "effective-config.json"
    public, _ = config_secrets.split(config)
    tmp = effective.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # left by a run killed mid-write
    fd = create_private(tmp)  # 0600 from the first byte: never readable by others
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(public))
    os.replace(tmp, effective)
    os.chmod(effective, 0o600)
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
    runner = build_runner(supervisor)  # its keep-alive timer bounds a request head's time
    await runner.setup()
    # TLS handshake timeout and the connection caps of [signalling] (supervisor/front.py).
    site = GuardedSite(runner, config.signalling, ssl_context=server_context(cert, key),
                       shutdown_timeout=2)
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
