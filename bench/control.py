"""The runner's line to its generator processes: one JSON object per line over stdin/stdout.

Requests carry an `id`; the reply repeats it, so a slow `add` (call setup takes seconds)
never blocks a `snapshot`. Pipes rather than sockets: nothing to bind, nothing that could
leave the machine, and the child dies with its stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# A reply can list every call of a process: far more than asyncio's default 64 KiB line.
_LINE_LIMIT = 64 * 1024 * 1024


async def serve_stdio(handle: Handler, ready: dict[str, Any]) -> None:
    """Child side: answer requests until stdin closes or a `stop` was answered."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def reply(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, separators=(",", ":")) + "\n")
        out.flush()

    reply({"id": 0, "ready": True, **ready})
    stopped = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def run(request: dict[str, Any]) -> None:
        try:
            answer = await handle(request)
            reply({"id": request.get("id"), "ok": True, **answer})
        except Exception as exc:
            reply({"id": request.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        if request.get("op") == "stop":
            stopped.set()

    while not stopped.is_set():
        line_task = asyncio.ensure_future(reader.readline())
        stop_task = asyncio.ensure_future(stopped.wait())
        await asyncio.wait({line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if not line_task.done():
            line_task.cancel()
            break
        line = line_task.result()
        if not line:  # the runner went away: stop everything
            with contextlib.suppress(Exception):
                await handle({"op": "stop"})
            break
        task = asyncio.ensure_future(run(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


class ChildProcess:
    """Parent side: a generator process and its pending requests."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.pid = proc.pid
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, name: str, argv: list[str], log_path: Path,
                    cores: Collection[int] | None, timeout: float = 60) -> ChildProcess:
        log = log_path.open("ab")

        def pin() -> None:  # in the child, before exec: every thread it makes inherits it
            if cores:
                os.sched_setaffinity(0, cores)

        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=log, preexec_fn=pin, limit=_LINE_LIMIT)
        log.close()
        child = cls(proc, name)
        try:
            await asyncio.wait_for(asyncio.shield(child._ready), timeout)
        except BaseException:
            child.kill()
            raise
        return child

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                message = json.loads(line)
                ident = message.get("id")
                if ident == 0 and not self._ready.done():
                    self._ready.set_result(message)
                    continue
                future = self._pending.pop(ident, None)
                if future is not None and not future.done():
                    future.set_result(message)
        finally:
            error = ConnectionError(f"{self.name} (pid {self.pid}) exited")
            if not self._ready.done():
                self._ready.set_exception(error)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    async def request(self, op: str, timeout: float = 600, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        self.proc.stdin.write((json.dumps({"id": ident, "op": op, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(future, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {op} failed: {reply.get('error')}")
        return reply

    async def stop(self, timeout: float = 30) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.request("stop", timeout=timeout)
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.kill()
        self._reader.cancel()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
