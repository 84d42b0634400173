"""The supervisor's health sampling outlives psutil's errors (issue 10, finding 9).

psutil is the outside world here: making it fail with EMFILE is what the box did when it
ran out of file descriptors, and /status froze until a restart."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from appliance.core import config as cfg
from supervisor import health
from supervisor.app import Supervisor


async def test_status_keeps_updating_after_psutil_fails_with_emfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = cfg.from_dict({"appliance": {"data_dir": str(tmp_path)},
                            "workers": {"count": 2, "channels_per_worker": 2}})
    sup = Supervisor(config, str(tmp_path / "effective-config.json"))
    real = health.psutil.cpu_percent
    failures_left = 3

    def cpu_percent(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures_left
        if failures_left > 0:
            failures_left -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real(*args, **kwargs)

    monkeypatch.setattr(health.psutil, "cpu_percent", cpu_percent)
    timer = sup._health_timer
    timer.interval = 0.05  # the real job on a fast clock: the test need not wait seconds
    try:
        timer.start()
        await asyncio.sleep(0.12)
        assert sup.health.status()["sampled_at"] == 0.0  # failing so far
        await asyncio.sleep(0.3)
        first = sup.health.status()["sampled_at"]
        assert first > 0.0
        await asyncio.sleep(0.15)
        status = sup.health.status()
        assert status["sampled_at"] > first  # still sampling
        assert status["periodic_failures"]["health sampling"] == 3
        assert "appliance_periodic_failures_total" in sup.health.prometheus()
    finally:
        timer.stop()
        sup._router.close(linger=0)
        sup._ctx.term()
