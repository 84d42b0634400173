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
        secrets: bytes = b"",
    ) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.workers = [WorkerProcess(i, cores[i % len(cores)]) for i in range(count)]
        self.config_path = config_path
        self.bus_endpoint = bus_endpoint
        self.restart_delay = restart_delay
        self.on_exit = on_exit
        # The config's secrets, one JSON line each worker reads on its stdin at spawn: they
        # never touch a file (appliance/core/config_secrets.py).
        self.secrets = secrets
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
            stdin=asyncio.subprocess.PIPE,
            # Its own session: a Ctrl-C on the operator's terminal reaches the supervisor
            # only, which then releases calls and stops the workers in order.
            start_new_session=True,
        )
        worker.started_at = loop.time()
        await self._hand_secrets(worker.process)
        try:
            # One worker per core: the media plane's capacity is measured per core.
            os.sched_setaffinity(worker.process.pid, {worker.core})
        except OSError as exc:
            log.warning("cannot pin worker %d to core %d: %s", worker.index, worker.core, exc)
        log.info("worker %d started as pid %d on core %d", worker.index, worker.process.pid,
                 worker.core)
        worker.watcher = asyncio.create_task(self._watch(worker))

    async def _hand_secrets(self, process: asyncio.subprocess.Process) -> None:
        stdin = process.stdin
        assert stdin is not None
        try:
            stdin.write(self.secrets or b"{}\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            # It died at once; _watch sees the exit and restarts it.
            log.warning("worker pid %d did not take its secrets: %s", process.pid, exc)
        finally:
            stdin.close()

    async def _watch(self, worker: WorkerProcess) -> None:
        process = worker.process
        assert process is not None
        code = await process.wait()
        if self.stopping:
            return
        log.error("worker %d (pid %d) died with exit code %s; restarting it", worker.index,
                  process.pid, code)
        try:
            self.on_exit(worker.index, code)
        except Exception:  # the restart below must happen whatever it did
            log.exception("releasing the calls of worker %d failed", worker.index)
        await asyncio.sleep(self.restart_delay)
        delay = self.restart_delay
        while not self.stopping:
            try:
                await self._spawn(worker)
                worker.restarts += 1
                return
            except OSError as exc:
                # EMFILE, EAGAIN (no process slots)...: keep trying, more slowly, rather
                # than leave the worker's channels dead until the next restart of the box.
                delay = min(5.0, max(0.2, delay * 2))
                log.error("cannot restart worker %d: %s; retrying in %.1f s", worker.index,
                          exc, delay)
                await asyncio.sleep(delay)

    def kill(self, index: int) -> None:
        """SIGKILL (works on a stopped process too); _watch then restarts it."""
        process = self.workers[index].process
        if process is not None and process.returncode is None:
            process.kill()

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
