"""The supervisor and worker processes on disk and in death (issue 10, findings 13 and 16a):
no secret in any file the appliance writes, private modes, and workers that stop cleanly
once when their supervisor is killed."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from appliance_sdk import MediaServerClient
from tests.e2e.conftest import eventually, free_port, free_udp_ports
from tests.sipp_runner import start_sipp

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret"  # what tests/sipp/uas_auth.xml checks the digest against


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def appliance_channels(worker: int, per_worker: int = 2) -> range:
    """The channels worker `worker` owns (make_appliance's default 2 per worker)."""
    return range(worker * per_worker + 1, (worker + 1) * per_worker + 1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_no_secret_on_disk_and_digest_auth_still_works(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await start_sipp("uas_auth.xml", tmp_path, "-mp", str(free_udp_ports(4)),
                            timeout="40s")
    appliance = make_appliance(
        aps.url, sip={"proxy": sipp.address, "username": "agent7", "password": PASSWORD},
        peers={"listen": f"tcp://127.0.0.1:{free_port()}"},  # so its CURVE key is made
    )
    data = Path(appliance.sections["appliance"]["data_dir"])
    try:
        async with await MediaServerClient.connect(appliance.url) as client:
            call = await client.make_video_call(5678, 9333, json.dumps({"id": "P1"}), medium=0)
            await call.wait_for("dtls_connect", timeout=15)
            # Answered only after the 401: the worker signed with the password it got on stdin.
            await call.wait_for("Join", timeout=15)
            await call.hangup()
        assert await sipp.exit_code() == 0, sipp.diagnostics()  # sipp's verifyauth passed
    finally:
        sipp.kill()

    # The effective config and every other file under run/ hold no secret, and are private.
    run = data / "run"
    assert mode(run) == 0o700 and mode(data / "tls") == 0o700
    effective = run / "effective-config.json"
    assert mode(effective) == 0o600
    assert json.loads(effective.read_text())["sip"]["username"] == "agent7"
    for path in run.iterdir():
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    # Nor in what another local user can read of the workers: command line, environment.
    for index in (0, 1):
        pid = appliance.worker_pid(index)
        assert pid is not None
        worker = psutil.Process(pid)
        assert PASSWORD not in " ".join(worker.cmdline())
        assert PASSWORD not in json.dumps(worker.environ())
    # The private keys the appliance made: TLS, recording master, peer CURVE secret.
    for key in (data / "tls" / "selfsigned.key", data / "recording-master.key",
                data / "peers" / "ms-test.key_secret"):
        assert mode(key) == 0o600, key


async def test_workers_stop_once_and_cleanly_when_the_supervisor_is_killed(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(aps.url)
    pids = [appliance.worker_pid(0), appliance.worker_pid(1)]
    assert None not in pids
    async with await MediaServerClient.connect(appliance.url) as client:
        # A live call, so the worker's shutdown has a release to send to nobody.
        call = await client.make_video_call(5678, 9333, json.dumps({"id": "K1"}), medium=0)
        await call.wait_for("dtls_connect", timeout=15)
        assert appliance.process is not None
        os.kill(appliance.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        appliance.process.wait(5)

        await eventually(lambda: not any(alive(pid) for pid in pids), 5)
        print(f"workers gone {time.monotonic() - killed_at:.2f} s after kill -9 of the "
              "supervisor")
    log = appliance.log()
    tail = log[log.index("appliance ms-test ready"):]
    for index in (0, 1):
        assert tail.count(f"worker {index}: released") == 1, tail
        assert f"worker {index}: SIGTERM: releasing calls" in tail, tail  # parent-death signal
        calls = 1 if call.channel in appliance_channels(index) else 0
        assert f"worker {index}: released {calls} call(s), stopping (supervisor gone)" in tail, \
            tail
    assert "Traceback" not in tail, tail
    assert "never retrieved" not in tail, tail
