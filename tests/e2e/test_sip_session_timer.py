"""RFC 4028 session timers towards the PBX, end to end: SDK caller -> appliance -> sipp.

The interval is 10 s here (`session_expires = session_min_se = 10`, a floor below RFC 4028's
90 s that the config allows for tests only), so each test waits seconds, not minutes. The
exact schedule (half interval, interval - min(32, interval/3), 422, glare) is proven on a
fake clock in tests/sip/test_session_timer.py; these show it on the wire with real peers."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from appliance_sdk import MediaServerClient
from tests.e2e.conftest import eventually, free_udp_ports
from tests.sipp_runner import Sipp, start_sipp

pytestmark = pytest.mark.e2e

SHORT_TIMER = {"session_expires": 10, "session_min_se": 10}


async def desk_phone(tmp_path: Path, scenario: str) -> Sipp:
    return await start_sipp(f"desk/{scenario}", tmp_path, "-rtp_echo", "-mp",
                            str(free_udp_ports(4)), timeout="40s")


def invites(sipp: Sipp) -> list[str]:
    return re.findall(r"^INVITE sip:.*?(?=\n\n)", sipp.messages, flags=re.M | re.S)


def trace(sipp: Sipp) -> list[tuple[datetime, str]]:
    """(when, first line) of every message in sipp's trace: the desk phone's own clock, so a
    slow test process cannot blur the intervals measured."""
    entries = re.findall(r"^-+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n[^\n]*\n\n([^\n]*)",
                         sipp.messages, flags=re.M)
    return [(datetime.strptime(when, "%Y-%m-%d %H:%M:%S.%f"), line) for when, line in entries]


def seconds_between(sipp: Sipp, first: str, then: str, nth: int = 0) -> float:
    """From the first message starting with `first` to the nth one starting with `then`."""
    entries = trace(sipp)
    start = next(when for when, line in entries if line.startswith(first))
    later = [when for when, line in entries if line.startswith(then) and when >= start]
    return (later[nth] - start).total_seconds()


async def test_we_refresh_the_session_at_half_the_interval(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_session_refresh.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address, **SHORT_TIMER})
    client = await MediaServerClient.connect(appliance.url)
    try:
        call = await client.make_video_call(5678, 9333, json.dumps({"id": "D000000001"}),
                                            medium=0)
        await call.wait_for("Join", timeout=20)
        first = invites(sipp)[0]
        assert re.search(r"^Supported: timer$", first, re.M), first
        assert re.search(r"^Session-Expires: 10$", first, re.M), first
        assert re.search(r"^Min-SE: 10$", first, re.M), first
        await eventually(lambda: len(invites(sipp)) >= 2, 10)
        refresh = invites(sipp)[1]
        assert re.search(r"^Session-Expires: 10;refresher=uac$", refresh, re.M), refresh
        # Half the interval after the PBX's 2xx (the second INVITE in the trace).
        since_answer = seconds_between(sipp, "SIP/2.0 200 OK", "INVITE sip:")
        print(f"refresh re-INVITE {since_answer:.2f} s after the 2xx (interval 10 s)")
        assert 4.95 <= since_answer <= 6.5, f"refresh {since_answer:.2f} s after the answer"
        # The call is still up, and the voice path with it: it ends only when we hang up.
        assert not call.ended
        await call.hangup()
        assert await sipp.exit_code(15) == 0, sipp.diagnostics()
    finally:
        await client.close()
        sipp.kill()


async def test_a_silent_refresher_gets_bye_before_the_session_expires(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_session_silent_refresher.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address, **SHORT_TIMER})
    client = await MediaServerClient.connect(appliance.url)
    try:
        call = await client.make_video_call(5678, 9333, json.dumps({"id": "D000000002"}),
                                            medium=0)
        await call.wait_for("Join", timeout=20)
        release = (await call.wait_for("release", timeout=12)).action
        # The browser learns why its call ended: the phone side's session timer expired.
        assert release is not None and release.cause == 102, release
        assert await sipp.exit_code(10) == 0, sipp.diagnostics()  # BYE, Reason cause 102
        # 10 - min(32, 10/3) = 6.67 s after the 2xx, well before the session would expire.
        ended = seconds_between(sipp, "SIP/2.0 200 OK", "BYE sip:")
        print(f"BYE {ended:.2f} s after the 2xx of a silent refresher (interval 10 s)")
        assert 6.6 <= ended <= 8.5, f"BYE {ended:.2f} s after the answer"
        assert appliance.count_in_log(r"session timer: no session refresh in time") == 1
    finally:
        await client.close()
        sipp.kill()
