"""Flow 3, duplicate login, between two appliances on two "hosts".

MS-1 runs in the test's loopback namespace, MS-2 in a child namespace joined to it by a
veth pair (tests/e2e/netns_pair.py): MS-2's AP-S requests, its notice to MS-1 and its
calls' media all cross a real link, and every address stays inside 127.0.0.0/8. One
reference AP-S serves both appliances, on our end of the veth.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from appliance.core import protocol
from appliance.core.config import PeerConfig
from appliance_sdk import Call, MediaServerClient
from reference_aps.server import DEFAULT_DUPLICATE_MESSAGE
from reference_aps.server import serve as serve_aps
from supervisor.peer_keys import Keypair, main_peer_key
from supervisor.peers import DuplicateLoginNotice, NoticeFailed, send_notice
from tests.e2e.conftest import (
    Appliance,
    ApsServer,
    eventually,
    free_port,
    free_udp_ports,
    write_toml,
)
from tests.e2e.netns_pair import CHILD_IP, PARENT_IP, ChildHost

pytestmark = pytest.mark.e2e

USERDATA = json.dumps({"id": "A123456789"})  # the same national ID on both phones
# Direct, never through a proxy from the environment.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- helpers -----------------------------------------------------------------------------


def peer_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    """Appliance `name`'s keypair, made by `appliance peer-key` as an operator would."""
    key_file = tmp_path / f"{name}.key_secret"
    config = tmp_path / f"{name}-peer-key.toml"
    write_toml(config, {"appliance": {"id": name, "data_dir": str(tmp_path / f"{name}-data")},
                        "peers": {"secret_key_file": str(key_file)}})
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main_peer_key(["--config", str(config)]) == 0
    public = out.getvalue().strip()
    assert len(public) == 40
    assert key_file.stat().st_mode & 0o777 == 0o600
    return key_file, public


def status(appliance: Appliance) -> dict[str, Any]:
    with _http.open(f"{appliance.admin_url}/status", timeout=5) as response:
        return json.load(response)


def metric(appliance: Appliance, name: str) -> float:
    with _http.open(f"{appliance.admin_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in /metrics")


def roomkey_of(aps: ApsServer, call: Call) -> int:
    row = sqlite3.connect(aps.db_path).execute(
        "SELECT roomkey FROM calls WHERE dialogid=? AND ref=?", (call.dialogid, call.ref)
    ).fetchone()
    assert row is not None, "AP-S has no record of the call"
    return row[0]


async def message_shown(call: Call, text: str, timeout: float) -> protocol.Message:
    """The `message` event carrying `text` (other system messages may come and go)."""
    deadline = time.monotonic() + timeout
    while True:
        event = await call.wait_for("message", max(0.1, deadline - time.monotonic()))
        assert isinstance(event.action, protocol.Message)
        if event.action.message == text:
            return event.action


def messages_with(call: Call, text: str) -> list[str]:
    return [e.action.message for e in call.history
            if isinstance(e.action, protocol.Message) and text in e.action.message]


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def child_host() -> Iterator[ChildHost]:
    host = ChildHost()
    try:
        host.probe()  # the link works both ways before any appliance relies on it
        yield host
    finally:
        host.close()


@pytest.fixture
async def aps_on_veth(child_host: ChildHost, tmp_path: Path) -> AsyncIterator[ApsServer]:
    """The one reference AP-S, on our veth address: MS-1 reaches it locally, MS-2 over
    the link."""
    db = tmp_path / "aps.sqlite3"
    runner = await serve_aps(PARENT_IP, 0, db)
    port = runner.addresses[0][1]
    yield ApsServer(f"http://{PARENT_IP}:{port}", db, runner)
    await runner.cleanup()


@pytest.fixture
def start_ms2(child_host: ChildHost, tmp_path: Path,
              request: pytest.FixtureRequest) -> Iterator[Callable[..., Appliance]]:
    started: list[Appliance] = []

    def start(aps_url: str, key_file: Path, ms1_endpoint: str, ms1_key: str,
              timeout: float) -> Appliance:
        data = tmp_path / "ms-2"
        data.mkdir()
        sections: dict[str, dict[str, Any]] = {
            "appliance": {"id": "ms-2", "data_dir": str(data), "log_level": "INFO"},
            "signalling": {"listen": CHILD_IP, "port": free_port()},
            "workers": {"count": 1, "channels_per_worker": 4, "restart_delay": 0.1},
            "aps": {"url": aps_url, "timeout": 2.0, "attempts": 2},
            # No PBX in the child namespace: the INVITE goes nowhere, the call rings.
            "sip": {"base_port": free_udp_ports(2), "proxy": "127.0.0.1:9"},
            "admin": {"listen": CHILD_IP, "port": free_port()},
            "media": {"addresses": [CHILD_IP], "dtls_timeout": 10.0},
            "peers": {"secret_key_file": str(key_file), "timeout": timeout},
            "peers.peers.ms-1": {"endpoint": ms1_endpoint, "public_key": ms1_key},
        }
        config_path = data / "appliance.toml"
        write_toml(config_path, sections)
        # MS-2 runs inside the child namespace and is reached at its veth address.
        ms2 = Appliance(config_path, data / "appliance.log", sections["signalling"]["port"],
                        sections=sections, host=CHILD_IP, prefix=child_host.prefix)
        started.append(ms2)
        ms2.start()
        return ms2

    yield start
    for ms2 in started:
        ms2.stop()  # before the namespace goes (child_host's teardown comes after ours)
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(f"--- MS-2 log {ms2.log_path} ---\n{ms2.log()}\n")


def ms1_sections(key_file: Path, listen: str, ms2_key: str) -> dict[str, dict[str, Any]]:
    return {
        "appliance": {"id": "ms-1"},
        "workers": {"count": 1, "channels_per_worker": 4},
        "peers": {"listen": listen, "secret_key_file": str(key_file)},
        # MS-1 never sends to MS-2 here; the entry is what admits MS-2's key.
        "peers.peers.ms-2": {"endpoint": f"tcp://{CHILD_IP}:1", "public_key": ms2_key},
    }


# -- tests -------------------------------------------------------------------------------


async def test_duplicate_login_is_shown_to_both_parties_of_the_old_call(
    child_host: ChildHost, aps_on_veth: ApsServer, make_appliance: Any,
    start_ms2: Callable[..., Appliance], tmp_path: Path,
) -> None:
    aps = aps_on_veth
    ms1_key_file, ms1_key = peer_key(tmp_path, "ms-1")
    ms2_key_file, ms2_key = peer_key(tmp_path, "ms-2")
    notices = f"tcp://{PARENT_IP}:{free_port()}"
    ms1 = make_appliance(aps.url, **ms1_sections(ms1_key_file, notices, ms2_key))
    ms2 = start_ms2(aps.url, ms2_key_file, notices, ms1_key, timeout=2.0)

    async with await MediaServerClient.connect(ms1.url) as app1, \
            await MediaServerClient.connect(ms1.url) as agent_page, \
            await MediaServerClient.connect(ms2.url, host_addresses=[PARENT_IP]) as app2:
        # APP-1 is in a video call with Agent-A through MS-1.
        old = await app1.make_video_call(5678, 9333, USERDATA)
        await old.wait_for("dtls_connect", timeout=15)
        agent = await agent_page.join_room(roomkey_of(aps, old))
        await agent.wait_for("dtls_connect", timeout=15)
        received_before, _ = child_host.veth_packets()

        # The same person calls from APP-2, through MS-2 on the other host.
        new = await app2.make_video_call(5678, 9333, USERDATA)
        await new.wait_for("dtls_connect", timeout=15)

        # MS-1 shows AP-S's text to the customer and to the agent, each on its own call.
        for call in (old, agent):
            shown = await message_shown(call, DEFAULT_DUPLICATE_MESSAGE, timeout=10)
            assert (shown.dialogid, shown.ref, shown.channel) == (
                call.dialogid, call.ref, call.channel)
            assert (shown.level, shown.position, shown.displaytime) == ("warning", "top", 10)
        assert old.channel != agent.channel
        assert not old.ended and not agent.ended and not new.ended  # nobody was hung up
        assert child_host.veth_packets()[0] > received_before  # MS-2 really used the link

    assert status(ms2)["peers_notices_sent"] == 1
    assert status(ms2)["peers_notice_failures"] == 0
    assert status(ms1)["peers_notices_received"] == 1
    assert "duplicate-login notice from ms-2 for roomkey" in ms1.log()
    assert "ms-1 says delivered" in ms2.log()


async def test_a_notice_from_a_key_not_in_peers_is_refused(
    aps: ApsServer, make_appliance: Any, tmp_path: Path,
) -> None:
    ms1_key_file, ms1_key = peer_key(tmp_path, "ms-1")
    _, ms2_key = peer_key(tmp_path, "ms-2")
    notices = f"tcp://127.0.0.1:{free_port()}"
    ms1 = make_appliance(aps.url, **ms1_sections(ms1_key_file, notices, ms2_key))
    async with await MediaServerClient.connect(ms1.url) as app1:
        old = await app1.make_video_call(5678, 9333, USERDATA)
        await old.wait_for("dtls_connect", timeout=15)
        # Someone who knows MS-1's public key and the roomkey, claims to be ms-2, but
        # signs with a key of their own.
        forged = DuplicateLoginNotice("ms-2", roomkey_of(aps, old), "forged notice")
        ctx = zmq.asyncio.Context()
        try:
            with pytest.raises(NoticeFailed, match="refused this appliance's CURVE key"):
                await send_notice(ctx, Keypair(*zmq.curve_keypair()),
                                  PeerConfig(notices, ms1_key), forged, timeout=3.0)
        finally:
            ctx.destroy(linger=0)
        await eventually(lambda: "refused a peer notice connection" in ms1.log(), 5)
        await asyncio.sleep(0.5)  # anything delivered would have arrived by now
        assert messages_with(old, "forged") == []
        assert not old.ended
    assert status(ms1)["peers_notices_received"] == 0
    assert status(ms1)["peers_keys_refused"] >= 1


async def test_the_new_call_goes_on_when_the_old_calls_appliance_is_unreachable(
    aps_on_veth: ApsServer, start_ms2: Callable[..., Appliance], tmp_path: Path,
) -> None:
    aps = aps_on_veth
    _, ms1_key = peer_key(tmp_path, "ms-1")
    ms2_key_file, _ = peer_key(tmp_path, "ms-2")
    # MS-1 is down: nothing listens at its notice endpoint.
    ms2 = start_ms2(aps.url, ms2_key_file, f"tcp://{PARENT_IP}:{free_port()}", ms1_key,
                    timeout=3.0)
    # The earlier call as AP-S recorded it while MS-1 was up: MS-1's verify, made by hand.
    async with aiohttp.ClientSession() as session, session.post(
        f"{aps.url}/verify",
        json={"appliance_id": "ms-1", "channel": 1, "dialogid": 1, "ref": 1,
              "userdata": USERDATA, "module": "User", "caller": 5678, "callee": 9333},
    ) as answer:
        assert (await answer.json())["result"] == "success"

    async with await MediaServerClient.connect(ms2.url, host_addresses=[PARENT_IP]) as app2:
        new = await app2.make_video_call(5678, 9333, USERDATA)
        await new.wait_for("dtls_connect", timeout=15)
        # Connected while the notice was still waiting for MS-1 (3 s): the call never waits.
        assert status(ms2)["peers_notice_failures"] == 0
        await eventually(lambda: status(ms2)["peers_notice_failures"] == 1, 10)
        assert not new.ended
    assert metric(ms2, "appliance_peers_notice_failures_total") == 1
    log = ms2.log()
    assert "duplicate-login notice for roomkey" in log
    assert "not delivered to appliance ms-1" in log and "not reachable" in log
