"""Media worker processes: start one per core, pin it, restart it when it dies."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("appliance.pool")


@dataclass
class WorkerProcess:
    index: int
    core: int
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class WorkerPool:
    """Owns the worker processes; tells its owner when one died so calls can be released."""

    def __init__(
        self,
        count: int,
        config_path: str,
        bus_endpoint: str,
        restart_delay: float,
        on_exit: Callable[[int, int | None], None],
    ) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.workers = [WorkerProcess(i, cores[i % len(cores)]) for i in range(count)]
        self.config_path = config_path
        self.bus_endpoint = bus_endpoint
        self.restart_delay = restart_delay
        self.on_exit = on_exit
        self.stopping = False

    async def start(self) -> None:
        for worker in self.workers:
            await self._spawn(worker)

    async def _spawn(self, worker: WorkerProcess) -> None:
        loop = asyncio.get_running_loop()
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers",
            "--index",
            str(worker.index),
            "--config",
            self.config_path,
            "--bus",
            self.bus_endpoint,
            # Its own session: a Ctrl-C on the operator's terminal reaches the supervisor
            # only, which then releases calls and stops the workers in order.
            start_new_session=True,
        )
        worker.started_at = loop.time()
        try:
            # One worker per core: the media plane's capacity is measured per core.
            os.sched_setaffinity(worker.process.pid, {worker.core})
        except OSError as exc:
            log.warning("cannot pin worker %d to core %d: %s", worker.index, worker.core, exc)
        log.info("worker %d started as pid %d on core %d", worker.index, worker.process.pid,
                 worker.core)
        worker.watcher = asyncio.create_task(self._watch(worker))

    async def _watch(self, worker: WorkerProcess) -> None:
        process = worker.process
        assert process is not None
        code = await process.wait()
        if self.stopping:
            return
        log.error("worker %d (pid %d) died with exit code %s; restarting it", worker.index,
                  process.pid, code)
        self.on_exit(worker.index, code)
        await asyncio.sleep(self.restart_delay)
        if not self.stopping:
            worker.restarts += 1
            await self._spawn(worker)

    def pid(self, index: int) -> int | None:
        process = self.workers[index].process
        return None if process is None else process.pid

    async def stop(self, timeout: float) -> None:
        """Wait for workers to exit on their own (after Shutdown), then insist."""
        self.stopping = True
        processes = [w.process for w in self.workers if w.process is not None]
        waits = [asyncio.create_task(p.wait()) for p in processes]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for process in processes:
                if process.returncode is None:
                    log.warning("worker pid %d did not stop in time; terminating", process.pid)
                    process.terminate()
            if pending:
                await asyncio.wait(pending, timeout=3)
            for process in processes:
                if process.returncode is None:
                    process.kill()
        for worker in self.workers:
            if worker.watcher is not None:
                worker.watcher.cancel()
