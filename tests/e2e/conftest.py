"""Real processes for end-to-end tests: the appliance (supervisor + workers) and the
reference AP-S, on loopback, inside the loopback-only network namespace that `make test`
creates (tests/in-loopback-netns.sh)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib  # noqa: F401 - documents that configs below are TOML
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.system import loopback_only
from reference_aps.server import serve as serve_aps

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def _require_loopback_netns() -> None:
    # Media tests must never reach a real network: refuse to run outside the namespace.
    if not loopback_only():
        pytest.fail(
            "end-to-end tests must run in a loopback-only network namespace: "
            "use `make test` or tests/in-loopback-netns.sh"
        )


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int, kind: int = socket.SOCK_DGRAM) -> int:
    """The first of `count` consecutive UDP (or TCP) ports that are free right now."""
    import random

    for _ in range(200):
        base = random.randrange(30000, 39000)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, kind)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no block of free ports")


def free_udp_ports(count: int) -> int:
    return free_ports(count, socket.SOCK_DGRAM)


def free_tcp_ports(count: int) -> int:
    return free_ports(count, socket.SOCK_STREAM)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


@dataclass
class Appliance:
    """A running `appliance run` process."""

    config_path: Path
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    host: str = "127.0.0.1"  # where tests reach it
    prefix: list[str] = field(default_factory=list)  # e.g. nsenter into another namespace

    @property
    def url(self) -> str:
        return f"wss://{self.host}:{self.port}/"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.sections['admin']['port']}"

    def start(self, timeout: float = 30) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "launcher.cli", "run", "--config",
             str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith(b"READY"):
                return
        raise AssertionError(f"appliance did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pid(self, index: int) -> int | None:
        assert self.process is not None
        for child in psutil.Process(self.process.pid).children():
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "workers" in cmdline and cmdline[cmdline.index("--index") + 1] == str(index):
                return child.pid
        return None

    def count_in_log(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def stop(self, timeout: float = 20) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@dataclass
class ApsServer:
    url: str
    db_path: Path
    runner: Any


@pytest.fixture
async def aps(tmp_path: Path) -> AsyncIterator[ApsServer]:
    """The reference AP-S, real HTTP and a real SQLite file."""
    db = tmp_path / "aps.sqlite3"
    runner = await serve_aps("127.0.0.1", 0, db)
    host, port = runner.addresses[0][:2]
    yield ApsServer(f"http://{host}:{port}", db, runner)
    await runner.cleanup()


@pytest.fixture
def make_appliance(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[Appliance] = []

    def make(aps_url: str, **overrides: dict[str, Any]) -> Appliance:
        port = free_port()
        data = tmp_path / f"appliance-{len(started)}"
        data.mkdir()
        sections: dict[str, dict[str, Any]] = {
            "appliance": {"id": "ms-test", "data_dir": str(data), "log_level": "INFO"},
            "signalling": {"listen": "127.0.0.1", "port": port},
            "workers": {"count": 2, "channels_per_worker": 2, "restart_delay": 0.1},
            "aps": {"url": aps_url, "timeout": 1.0, "attempts": 2},
            "sip": {"base_port": free_udp_ports(4), "proxy": "127.0.0.1:9"},
            "admin": {"port": free_port()},
            # Each appliance its own worker media ports: tests start several in one namespace.
            "media": {"addresses": ["127.0.0.1"], "dtls_timeout": 10.0,
                      "udp_port": free_udp_ports(2), "tcp_port": free_tcp_ports(2)},
        }
        if not NATIVE_LOOP:  # make test-python-path: the pure-Python packet path
            sections["media"]["native_loop"] = False
        for name, values in overrides.items():
            sections.setdefault(name, {}).update(values)
        config_path = data / "appliance.toml"
        write_toml(config_path, sections)
        appliance = Appliance(config_path, data / "appliance.log", port, sections=sections)
        started.append(appliance)
        appliance.start()
        return appliance

    yield make
    for appliance in started:
        appliance.stop()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            sys.stderr.write(f"--- appliance log {appliance.log_path} ---\n{appliance.log()}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


async def eventually(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Poll until predicate() is true; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


os.environ.setdefault("PYTHONUNBUFFERED", "1")
# APPLIANCE_TEST_NATIVE_LOOP=0: every appliance a test starts relays on the pure-Python path.
NATIVE_LOOP = os.environ.get("APPLIANCE_TEST_NATIVE_LOOP", "1") != "0"
