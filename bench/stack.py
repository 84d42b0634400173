"""The system under test for one phase: the appliance (supervisor + pinned workers) with a
given media relay, configured for the bench, and its admin endpoint."""

from __future__ import annotations

import asyncio
import json
import math
import os
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Appliance, free_port, free_udp_ports, write_toml


@dataclass
class ApplianceUnderTest:
    relay: str
    appliance: Appliance
    sections: dict[str, dict[str, Any]]

    @property
    def url(self) -> str:
        return self.appliance.url

    @property
    def pid(self) -> int:
        assert self.appliance.process is not None
        return self.appliance.process.pid

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.appliance.admin_url}/status", timeout=5) as r:
            return json.load(r)

    async def status_async(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.status)

    async def wait_workers_ready(self, count: int, timeout: float = 30) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.status_async()
            workers = status["workers"]
            if len(workers) == count and all(w["ready"] and w["pid"] for w in workers):
                return status
            if loop.time() > deadline:
                raise RuntimeError(f"workers not ready after {timeout} s: {workers}")
            await asyncio.sleep(0.2)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.appliance.log()[-chars:]
        except OSError:
            return ""

    async def stop(self) -> None:
        await asyncio.to_thread(self.appliance.stop)


def appliance_sections(relay: str, workdir: Path, workers: int, max_calls: int, aps_url: str,
                       sip_proxy: str, address: str) -> dict[str, dict[str, Any]]:
    # Each call takes two channels (customer + agent leg); both legs sit on one worker.
    channels = math.ceil(2 * max_calls / workers) + 4
    return {
        "appliance": {"id": f"bench-{relay}", "data_dir": str(workdir), "log_level": "INFO"},
        "signalling": {"listen": "127.0.0.1", "port": free_port()},
        "workers": {"count": workers, "channels_per_worker": channels, "restart_delay": 0.5},
        "aps": {"url": aps_url, "timeout": 5.0, "attempts": 3},
        "sip": {"proxy": sip_proxy, "base_port": free_udp_ports(workers)},
        "admin": {"port": free_port()},
        # Under load a setup can be slow; the bench reports setup times rather than have
        # the appliance give up on them at the product's default.
        # Every caller is 127.0.0.1: over ICE-TCP all legs come from that one address.
        "media": {"addresses": [address], "dtls_timeout": 30.0, "relay": relay,
                  "tcp_max_connections": min(65535, 2 * channels + 16),
                  "tcp_max_per_address": min(65535, 2 * channels + 16)},
        # Every simulated caller shares one address and two WebSockets: the per-client
        # shares of admission control (tests/e2e/test_admission.py) would cap the ramp.
        "admission": {"max_setup_per_connection": 0, "max_setup_per_address": 0,
                      "max_setup_total": 0, "max_calls_per_connection": 0,
                      "max_calls_per_address": 0},
    }


class JanusUnderTest:
    """Janus (bench.janus) in the appliance's place, as the runner and `measure` read it:
    one "worker", the janus process pinned to the worker cores; no supervisor, no event
    loop to lag (None), no packet counters of ours."""

    def __init__(self, server: Any, cores: list[int]) -> None:
        self.server = server
        self.cores = cores
        self.sections: dict[str, Any] = {"janus": {"version": "1.1.2 (Debian)",
                                                   "cores": cores,
                                                   "http_port": server.http_port}}

    @classmethod
    async def start(cls, workdir: Path, cores: list[int]) -> JanusUnderTest:
        from bench import janus

        base = free_udp_ports(1)
        server = await janus.JanusServer.start(workdir, cores, free_port(),
                                               (base, min(65535, base + 1999)))
        return cls(server, cores)

    @property
    def pid(self) -> int:
        return -1  # no supervisor process: Janus is the one "worker"

    @property
    def url(self) -> str:
        return str(self.server.url)

    async def status_async(self) -> dict[str, Any]:
        return {"workers": [{"index": 0, "pid": self.server.pid, "core": self.cores[0],
                             "loop_lag_p50_ms": None, "loop_lag_p99_ms": None,
                             "packets_received": None, "packets_sent": None,
                             "decoders_created": None}]}

    def log_tail(self, chars: int = 3000) -> str:
        return str(self.server.log_tail(chars))

    async def stop(self) -> None:
        await self.server.stop()


async def start_appliance(relay: str, workdir: Path, workers: int, max_calls: int,
                          aps_url: str, sip_proxy: str, address: str,
                          cores: Collection[int]) -> ApplianceUnderTest:
    """Start `appliance run` allowed on `cores` (the supervisor pins worker i to the i-th
    of them, as in production), even though this process is pinned to the generator's."""
    workdir.mkdir(parents=True, exist_ok=True)
    sections = appliance_sections(relay, workdir, workers, max_calls, aps_url, sip_proxy,
                                  address)
    config = workdir / "appliance.toml"
    write_toml(config, sections)
    appliance = Appliance(config, workdir / "appliance.log", sections["signalling"]["port"],
                          sections=sections)

    def start_unpinned() -> None:
        # Affinity is per thread and inherited at fork: widen this thread only, so the
        # supervisor starts with every core while the runner stays on the generator's.
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cores)
        try:
            appliance.start()
        finally:
            os.sched_setaffinity(0, previous)

    await asyncio.to_thread(start_unpinned)
    under_test = ApplianceUnderTest(relay, appliance, sections)
    await under_test.wait_workers_ready(workers)
    return under_test
