"""A worker's shutdown runs once, however many times it is asked (issue 10, finding 16a).

When the supervisor dies, the kernel's parent-death SIGTERM and any repeat of it (or a
Shutdown already on the bus) used to run the whole shutdown again, the later runs sending
on a closed socket: "Future exception was never retrieved"."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import pytest

from appliance.core import config as cfg
from appliance.edges import bus
from workers.worker import Worker


async def test_shutdown_twice_and_sigterm_run_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(0, cfg.Config(), f"ipc://{tmp_path / 'nobody.sock'}")
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
    try:
        with caplog.at_level(logging.INFO, logger="appliance.worker"):
            await asyncio.gather(worker._shutdown(), worker._shutdown())
            worker._on_sigterm()  # the parent-death signal, late
            await worker._shutdown()
            assert worker._stopping.is_set()
            # What run() does once _stopping is set; a send after it is dropped, not raised.
            worker._bus_closed = True
            worker._sock.close(linger=0)
            worker.send(bus.ShutdownDone(0))
            await asyncio.sleep(0.05)
            gc.collect()
            await asyncio.sleep(0)
    finally:
        worker._ctx.term()
        loop.set_exception_handler(None)
    released = [r for r in caplog.records if "released 0 call(s), stopping" in r.getMessage()]
    assert len(released) == 1, [r.getMessage() for r in caplog.records]
    assert any("already stopping; ignored" in r.getMessage() for r in caplog.records)
    assert unretrieved == []
