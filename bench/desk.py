"""The agents' desk phones: one sipp for every call of the run, echoing the voice back.

`tests/sipp/desk/desk_echo.xml` rings 1.5 s, answers, and with `-rtp_echo` sends each RTP
packet back to where it came from, so the customer's leg gets a real voice stream back
through the appliance. Unlike `tests.sipp_runner.start_sipp`, the port is chosen by us (the
appliance's config names it before sipp starts) and sipp is pinned to the load
generator's cores: it is part of the load, not of the appliance.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from tests.sipp_runner import SCENARIOS, free_udp_port, udp_bound

SCENARIO = "desk/desk_echo.xml"


@dataclass
class DeskPhones:
    proc: asyncio.subprocess.Process
    port: int
    media_port: int
    workdir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def errors(self) -> str:
        path = self.workdir / "sipp_errors.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_desk_phones(workdir: Path, calls: int, media_port: int,
                            cores: Collection[int] | None) -> DeskPhones:
    """sipp answering up to `calls` calls (its -m: every call of the whole run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_udp_port()
    command = [
        "sipp", "-sf", str(SCENARIOS / SCENARIO),
        "-i", "127.0.0.1", "-p", str(port),
        "-m", str(calls),
        "-rtp_echo", "-mp", str(media_port),
        "-nostdin",
        "-trace_err", "-error_file", str(workdir / "sipp_errors.log"),
    ]  # fmt: skip

    def pin() -> None:  # before exec, so sipp's echo threads inherit it
        if cores:
            os.sched_setaffinity(0, cores)

    out = (workdir / "sipp_out.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=out,
        stderr=asyncio.subprocess.STDOUT, cwd=workdir, preexec_fn=pin)
    out.close()
    phones = DeskPhones(proc, port, media_port, workdir)
    for _ in range(500):
        if udp_bound(port):
            return phones
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    raise RuntimeError(f"sipp did not start: {(workdir / 'sipp_out.log').read_text()[-2000:]}")
