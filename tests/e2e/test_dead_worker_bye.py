"""Finding 7: a worker killed with -9 takes its SIP calls with it, but the desk phones must
not stay in them. Real processes: the appliance (supervisor + worker), SDK callers, and sipp
as the desk phone answering every call and then waiting for a BYE (Reason cause 41)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from appliance_sdk import Call, MediaServerClient
from tests.e2e.conftest import eventually, free_udp_ports
from tests.sipp_runner import Sipp, start_sipp

pytestmark = pytest.mark.e2e

CALLS = 5


async def desk_phone(tmp_path: Path) -> Sipp:
    return await start_sipp("desk/desk_answer_expect_bye.xml", tmp_path, "-rtp_echo", "-mp",
                            str(free_udp_ports(4)), calls=CALLS, timeout="60s")


async def answered_calls(appliance: Any) -> tuple[list[MediaServerClient], list[Call]]:
    clients, calls = [], []
    for i in range(CALLS):
        client = await MediaServerClient.connect(appliance.url)
        userdata = json.dumps({"id": f"B{i:09d}"})
        clients.append(client)
        calls.append(await client.make_video_call(5678, 9333, userdata, medium=0))
    for call in calls:
        join = await call.wait_for("Join", timeout=20)  # the desk phone answered
        assert join.action.medium == "audio"
    return clients, calls


def byes(sipp: Sipp) -> list[str]:
    """The BYE requests sipp received (its message trace)."""
    return re.findall(r"^BYE sip:.*?(?=\n\n)", sipp.messages, flags=re.M | re.S)


async def kill_worker_and_expect_byes(
    appliance: Any, sipp: Sipp, calls: list[Call], within: float
) -> float:
    pid = appliance.worker_pid(0)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for call in calls:
        release = (await call.wait_for("release", timeout=5)).action
        assert (release.cause, release.causestring) == (41, "media worker failed")
    code = await sipp.exit_code(within + 5)
    took = time.monotonic() - killed
    assert code == 0, sipp.diagnostics()  # every call: answered, then BYE cause 41, 200
    assert took < within, f"the BYEs took {took:.1f} s"
    received = byes(sipp)
    call_ids = {re.search(r"Call-ID: *(\S+)", bye).group(1) for bye in received}  # type: ignore[union-attr]
    assert len(call_ids) == CALLS, received
    return took


async def test_kill_9_of_a_worker_sends_bye_for_every_desk_phone_dialog(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path)
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address},
                               workers={"count": 1, "channels_per_worker": 8})
    clients, calls = await answered_calls(appliance)
    try:
        took = await kill_worker_and_expect_byes(appliance, sipp, calls, within=10)
        print(f"{CALLS} dialogs of the killed worker got BYE within {took:.2f} s")
        # From its replacement, on the same SIP port the dialogs were built with.
        await eventually(lambda: appliance.count_in_log(
            r"sent BYE for 5 dialog\(s\) its dead predecessor left up") == 1, 5)
        await eventually(lambda: appliance.count_in_log(
            r"of the dead worker: BYE answered 200") == CALLS, 5)
        base_port = appliance.sections["sip"]["base_port"]
        sources = re.findall(r"UDP message received \[\d+\] bytes :\n\nBYE sip:.*?\nVia: "
                             r"SIP/2\.0/UDP 127\.0\.0\.1:(\d+)", sipp.messages, flags=re.S)
        assert sources and set(sources) == {str(base_port)}, sources
    finally:
        for client in clients:
            await client.close()
        sipp.kill()


async def test_without_a_replacement_the_supervisor_sends_the_byes(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path)
    appliance = make_appliance(
        aps.url, sip={"proxy": sipp.address},
        workers={"count": 1, "channels_per_worker": 8, "restart_delay": 30.0,
                 "dialog_bye_fallback": 1.0})
    clients, calls = await answered_calls(appliance)
    try:
        took = await kill_worker_and_expect_byes(appliance, sipp, calls, within=6)
        print(f"no replacement: the supervisor's BYEs for {CALLS} dialogs came {took:.2f} s "
              "after kill -9")
        assert took >= 1.0  # it waited for a replacement first
        assert appliance.count_in_log(r"the supervisor sent BYE for its 5 dialog\(s\)") == 1
    finally:
        for client in clients:
            await client.close()
        sipp.kill()


async def test_dialogs_that_ended_normally_get_no_second_bye(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    """The supervisor forgets a dialog when it ends: a worker dying afterwards BYEs nothing."""
    sipp = await start_sipp("desk/desk_answer_wait_bye.xml", tmp_path, "-rtp_echo", "-mp",
                            str(free_udp_ports(4)), "-d", "1000", timeout="40s")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address},
                               workers={"count": 1, "channels_per_worker": 4})
    client = await MediaServerClient.connect(appliance.url)
    try:
        call = await client.make_video_call(5678, 9333, json.dumps({"id": "C000000001"}),
                                            medium=0)
        await call.wait_for("Join", timeout=20)
        # The phone hangs up after 1 s; our 200 to its BYE ends the dialog: DialogDown.
        await call.wait_for("release", timeout=10)
        assert await sipp.exit_code(20) == 0, sipp.diagnostics()
        await asyncio.sleep(0.5)
        pid = appliance.worker_pid(0)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: appliance.count_in_log(r"worker 0 is up") == 2, 15)
        await asyncio.sleep(1.0)
        assert appliance.count_in_log(r"dead predecessor") == 0
        assert appliance.count_in_log(r"died with \d+ desk-phone dialog") == 0
    finally:
        await client.close()
        sipp.kill()
