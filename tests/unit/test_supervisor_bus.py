"""A send to a worker that is not there says so (zmq.asyncio reports it on a future, never by
raising): the caller learns it failed, and no "Future exception was never retrieved"."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import pytest
import zmq

from appliance.core import config as cfg
from appliance.edges import bus
from supervisor.app import Supervisor


async def test_a_send_to_an_absent_worker_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = cfg.from_dict({"appliance": {"data_dir": str(tmp_path)},
                            "workers": {"count": 1, "channels_per_worker": 2}})
    sup = Supervisor(config, str(tmp_path / "effective-config.json"))
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
    sup._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sup._router.bind(f"ipc://{tmp_path / 'bus.sock'}")
    try:
        with caplog.at_level(logging.WARNING, logger="appliance.supervisor"):
            sent = sup._send_worker(0, bus.Shutdown(41, "appliance shutting down"))
        assert sent is False
        assert any("worker 0 unreachable for Shutdown" in r.getMessage()
                   for r in caplog.records)
        gc.collect()
        await asyncio.sleep(0)
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)
        sup._router.close(linger=0)
        sup._ctx.term()
