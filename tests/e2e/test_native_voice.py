"""The voice on the native loop, end to end: SDK caller -> appliance -> sipp desk phone,
PCMU both ways relayed in C once the phone answered; DTMF and the hold still right."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import native
from tests.e2e.conftest import NATIVE_LOOP
from tests.e2e.test_voice import desk_phone, place_call, sipp_ok

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT or "native loop"),
    pytest.mark.skipif(not NATIVE_LOOP, reason="APPLIANCE_TEST_NATIVE_LOOP=0"),
]

TO_PHONE = "the customer's voice to the phone relayed by the native loop"
TO_BROWSER = "the phone's voice to the customer relayed by the native loop"


async def _wait_for_log(appliance: Any, *lines: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = appliance.log()
        if all(line in log for line in lines) or time.monotonic() > deadline:
            return str(log)
        await asyncio.sleep(0.1)


async def test_the_echo_goes_through_the_native_loop_both_ways(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address})
    client, call, track, reader = await place_call(appliance)
    try:
        await call.wait_for("Join", timeout=15)
        log = await _wait_for_log(appliance, TO_PHONE, TO_BROWSER)
        assert TO_PHONE in log and TO_BROWSER in log, log[-3000:]
        reader.arrivals.clear()
        await asyncio.sleep(3)
        report = reader.report(track)
        print(f"echo through the native loop + sipp: {report}")
        # 3 s at 50 packets/s, echoed: what the browser sent came back, in time.
        assert report.received > 120, report
        assert report.loss_pct < 2.0, report
        assert report.rtt_ms_median < 400, report
        # A key press towards the phone pauses the customer's voice in C for its time,
        # and the phone's echo of the events comes back up as DTMF (Python's part).
        await call.send_dtmf("5")
        assert (await call.wait_for("DTMF", timeout=5)).action.value == "5"
        before = len(reader.arrivals)
        await asyncio.sleep(1.0)
        assert len(reader.arrivals) - before > 30, "the voice did not resume after the key"
        await call.hangup()
        await sipp_ok(sipp)
    finally:
        await client.close()
        sipp.kill()
    assert "voice on the Python path" not in appliance.log()


async def test_hold_and_resume_on_the_native_loop(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_hold.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address})
    client, call, _track, reader = await place_call(appliance)
    try:
        await call.wait_for("Join", timeout=15)
        answered = time.monotonic()
        release = (await call.wait_for("release", timeout=20)).action
        assert (release.cause, release.causestring) == (16, "normal release")
        arrivals = sorted(reader.arrivals.values())
        before = [t for t in arrivals if t - answered < 1.3]
        held = [t for t in arrivals if 2.0 < t - answered < 2.8]
        after = [t for t in arrivals if t - answered > 3.6]
        assert len(before) > 20 and len(after) > 20, (len(before), len(after))
        assert len(held) < 5, len(held)
        await sipp_ok(sipp)
    finally:
        await client.close()
        sipp.kill()
    assert TO_PHONE in appliance.log()
