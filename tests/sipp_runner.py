"""sipp (Debian sip-tester) as a real SIP peer in tests: start a scenario from tests/sipp/
(or one of sipp's embedded ones, `builtin=True`) on ephemeral loopback ports, wait for it,
and read what it logged."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path

SCENARIOS = Path(__file__).resolve().parent / "sipp"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def udp_bound(port: int) -> bool:
    """Whether something listens on UDP `port` (read from /proc: probing by binding the
    port ourselves could steal it from sipp at the wrong moment)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local = line.split()[1]
            if int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


@dataclass
class Sipp:
    proc: asyncio.subprocess.Process
    port: int
    workdir: Path
    name: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def messages(self) -> str:
        path = self.workdir / f"{self.name}_messages.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self) -> str:
        parts = []
        for suffix in ("errors.log", "out.log"):
            path = self.workdir / f"{self.name}_{suffix}"
            if path.exists():
                parts.append(f"--- sipp {suffix}\n{path.read_text(errors='replace')[-3000:]}")
        parts.append(f"--- sipp messages\n{self.messages[-4000:]}")
        return "\n".join(parts)

    async def exit_code(self, timeout: float = 25.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def start_sipp(
    scenario: str,
    workdir: Path,
    *args: str,
    remote: tuple[str, int] | None = None,
    timeout: str = "20s",
    calls: int = 1,
    builtin: bool = False,
) -> Sipp:
    """Run `scenario` (a path relative to tests/sipp/, or with `builtin` the name of a
    scenario embedded in sipp, such as "uac": see `sipp -sd uac`) for `calls` calls."""
    name = Path(scenario).stem
    source = ["-sn", scenario] if builtin else ["-sf", str(SCENARIOS / scenario)]
    port = free_udp_port()
    out = (workdir / f"{name}_out.log").open("wb")
    command = [
        "sipp",
        *source,
        "-i", "127.0.0.1",
        "-p", str(port),
        "-m", str(calls),
        "-timeout", timeout,
        "-timeout_error",
        "-nostdin",
        "-trace_msg", "-message_file", str(workdir / f"{name}_messages.log"),
        "-trace_err", "-error_file", str(workdir / f"{name}_errors.log"),
        *args,
    ]  # fmt: skip
    if remote is not None:
        command.append(f"{remote[0]}:{remote[1]}")
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=out,
        stderr=asyncio.subprocess.STDOUT,
        cwd=workdir,
    )
    out.close()
    sipp = Sipp(proc, port, workdir, name)
    for _ in range(200):  # a UAC scenario starts sending at once; a UAS waits for us
        if remote is not None or udp_bound(port) or proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    return sipp
