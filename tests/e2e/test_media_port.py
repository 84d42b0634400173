"""The per-worker media port (issue 12) wired into the media workers, end to end: the real
appliance with `[media] udp_port` / `tcp_port` set, SDK callers (aiortc, full ICE over
UDP) against its ICE-lite answers, sipp as the desk phone.

- Voice to the desk phone and back, and video between customer and agent, over the
  worker's one port; the answer is ICE-lite and announces exactly the worker's UDP then
  TCP candidate, and the `ice` actions repeat them in that order.
- `ss` in the namespace: one WebRTC UDP and one TCP listening port per worker, whatever
  the number of calls (20 at once), and nothing bound in port_min..port_max.
- A browser whose UDP vanishes is released by consent (cause 41, "the browser's network
  went away"); the counters reach /metrics.
- `protocol: "TCP"`: only the TCP candidate; the SDK as RFC 6544's active side places a
  whole call (voice to the desk phone, video both ways) over the worker's TCP port.
  Without a TCP port such an offer is refused with cause 63.
- A worker that cannot bind its port stays up, logs why, and refuses calls with a cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioice.ice
import pytest

from appliance import native
from appliance.core import config
from appliance.edges import bus
from appliance.edges.ice_tcp_active import ActiveTcpConnection
from appliance.edges.lite_transport import WorkerMediaPort
from appliance.edges.rtc_adapter import HostAddress
from appliance_sdk import Call, MediaServerClient
from tests.e2e.conftest import eventually, free_tcp_ports, free_udp_ports
from tests.e2e.test_video import count_keyframes_sent, roomkey_of
from tests.e2e.test_voice import desk_phone, place_call, sipp_ok
from workers.media_port import STATS_KEYS, MediaPort, PortPlan, lite_settings

pytestmark = pytest.mark.e2e

USERDATA = json.dumps({"id": "A123456789"})


def media_ports(workers: int = 2, tcp: bool = True, **media: Any) -> dict[str, Any]:
    return {"udp_port": free_udp_ports(workers),
            "tcp_port": free_tcp_ports(workers) if tcp else 0, **media}


def status(appliance: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{appliance.admin_url}/status", timeout=5) as response:
        return json.load(response)


def metrics_text(appliance: Any) -> str:
    with urllib.request.urlopen(f"{appliance.admin_url}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(appliance: Any, name: str, worker: int) -> float:
    found = re.search(rf'^appliance_{name}{{worker="{worker}",core="\d+"}} (\S+)$',
                      metrics_text(appliance), re.M)
    assert found, f"no {name} for worker {worker}"
    return float(found.group(1))


def worker_of(appliance: Any, call: Call) -> int:
    placed = {c["channel"]: c["worker"] for c in status(appliance)["calls"]}
    return int(placed[call.channel])


def candidates(sdp: str) -> list[list[str]]:
    return [line[len("a=candidate:"):].split() for line in sdp.splitlines()
            if line.startswith("a=candidate:")]


def assert_lite_answer(sdp: str, udp: int | None, tcp: int | None) -> None:
    """ICE-lite at session level, and exactly the worker's candidates (each bundled
    m-section repeats them): UDP host first, then TCP passive, UDP preferred."""
    session = sdp.split("\r\nm=", 1)[0].split("\r\n")
    assert "a=ice-lite" in session, sdp
    expected = []
    if udp is not None:
        expected.append(["udp", "127.0.0.1", str(udp), "typ", "host"])
    if tcp is not None:
        expected.append(["tcp", "127.0.0.1", str(tcp), "typ", "host", "tcptype", "passive"])
    found = candidates(sdp)
    sections = sdp.count("\r\nm=")
    assert len(found) == len(expected) * sections, found
    for i, c in enumerate(found):
        want = expected[i % len(expected)]
        assert [c[2].lower(), *c[4:4 + len(want) - 1]] == want, (c, want)
    if udp is not None and tcp is not None:
        assert int(found[0][3]) > int(found[1][3]), found  # UDP priority above TCP


async def ice_actions(call: Call, count: int) -> list[str]:
    return [(await call.wait_for("ice", timeout=5)).action.ice.candidate for _ in range(count)]


def sdk_local_addr(call: Call) -> tuple[str, int]:
    """The SDK's UDP address on the nominated pair (aioice's private pair, test side)."""
    ice = call.pc.getTransceivers()[0].receiver.transport.transport._connection
    return ice._nominated[1].local_addr  # type: ignore[no-any-return]


@contextlib.contextmanager
def udp_dropped_from(source_port: int) -> Iterator[None]:
    """The browser's network vanishes: nft drops every UDP datagram it sends."""
    table = f"mp{source_port}"
    for rule in (f"add table inet {table}",
                 f"add chain inet {table} out {{ type filter hook output priority 0 ; }}",
                 f"add rule inet {table} out udp sport {source_port} drop"):
        subprocess.run(["nft", *rule.split()], check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


def listening(kind: str) -> list[tuple[int, int]]:
    """(port, pid) of every socket `ss -l` lists in this namespace for `kind` (u/t)."""
    out = subprocess.run(["ss", f"-Hl{kind}np"], capture_output=True, text=True, check=True)
    found = []
    for line in out.stdout.splitlines():
        local = line.split()[3]
        port = int(local.rsplit(":", 1)[1])
        found += [(port, int(pid)) for pid in re.findall(r"pid=(\d+)", line)]
    return found


def test_consent_timeout_is_validated() -> None:
    assert config.Config().media.consent_timeout == 30.0
    config.from_dict({"media": {"consent_timeout": 1.0}})
    config.from_dict({"media": {"consent_timeout": 300.0}})
    for bad in (0.0, 0.5, 301.0, float("nan")):
        with pytest.raises(config.ConfigError, match="consent_timeout"):
            config.from_dict({"media": {"consent_timeout": bad}})


def test_the_ice_tcp_connection_bounds_are_the_operators() -> None:
    defaults = lite_settings(config.Config().media)
    assert (defaults.max_tcp_connections, defaults.max_tcp_per_address) == (512, 100)
    media = config.from_dict({"media": {"tcp_max_connections": 2000,
                                        "tcp_max_per_address": 300}}).media
    settings = lite_settings(media)
    assert (settings.max_tcp_connections, settings.max_tcp_per_address) == (2000, 300)
    for name in ("tcp_max_connections", "tcp_max_per_address"):
        for bad in (0, 65536):
            with pytest.raises(config.ConfigError, match=name):
                config.from_dict({"media": {name: bad}})


async def test_the_worker_stats_fields_are_the_ports_counters() -> None:
    # What WorkerStats carries is named by the port's own stats(): a renamed counter there
    # must fail here, not show 0 in /metrics for ever.
    media = config.from_dict({"media": {"udp_port": 1, "tcp_port": 1}}).media
    settings = lite_settings(media)
    port = await WorkerMediaPort.open([HostAddress("127.0.0.1", "127.0.0.1")], 0, 0, settings)
    wrapped = MediaPort(PortPlan(port.udp_port, 0), port, "", settings)
    try:
        assert set(STATS_KEYS.values()) <= set(port.stats())
        native_loop = int(native.AVAILABLE)  # media.native_loop is on by default
        assert wrapped.stats() == {**dict.fromkeys(STATS_KEYS, 0), "native_loop": native_loop}
        assert set(STATS_KEYS) <= set(bus.WorkerStats.__struct_fields__)
    finally:
        wrapped.close()
    assert wrapped.port is None
    assert wrapped.stats() == {**dict.fromkeys(STATS_KEYS, 0), "native_loop": native_loop}


# -- voice and video over the port ------------------------------------------------------


async def test_voice_to_the_desk_phone_over_the_worker_port(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    media = media_ports()
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address}, media=media)
    client, call, track, reader = await place_call(appliance)
    try:
        answer = (await call.wait_for("answer", timeout=15)).action.answer.sdp
        worker = worker_of(appliance, call)
        udp, tcp = media["udp_port"] + worker, media["tcp_port"] + worker
        assert_lite_answer(answer, udp, tcp)
        assert re.search(r"m=audio \d+ UDP/TLS/RTP/SAVPF 0\r\n", answer), answer
        # The `ice` actions: the answer's candidates, UDP first, then TCP (PROTOCOL.md).
        ices = await ice_actions(call, 2)
        assert [c.split()[2].lower() for c in ices] == ["udp", "tcp"], ices
        assert [c.split()[5] for c in ices] == [str(udp), str(tcp)], ices
        await call.wait_for("dtls_connect", timeout=15)
        await call.wait_for("Join", timeout=10)  # the phone answered
        await asyncio.sleep(4)
        report = reader.report(track)
        print(f"echo through the worker's media port + sipp: {report}")
        assert report.received > 150, report
        assert report.loss_pct < 2.0, report
        assert report.rtt_ms_median < 400, report
        # Its checks were answered on the worker's port (aioice checks every ~5 s).
        assert metric(appliance, "worker_ice_checks_total", worker) >= 1
        assert status(appliance)["workers"][worker]["ice_checks"] >= 1
        await call.hangup()
        await sipp_ok(sipp)
    finally:
        await client.close()
        sipp.kill()
    assert appliance.count_in_log(r"WebRTC media on UDP \d+ and TCP \d+ \(ICE-lite") == 2
    if native.AVAILABLE:  # the default: the native loop drains each worker's UDP port
        assert appliance.count_in_log(r"; native packet loop \(libsrtp2 ") == 2
        assert metric(appliance, "worker_native_loop", 0) == 1


async def test_the_pure_python_path_when_the_native_loop_is_off(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address},
                               media={**media_ports(), "native_loop": False})
    client, call, track, reader = await place_call(appliance)
    try:
        await call.wait_for("Join", timeout=15)
        await asyncio.sleep(2)
        report = reader.report(track)
        assert report.received > 50 and report.loss_pct < 2.0, report
        await call.hangup()
        await sipp_ok(sipp)
    finally:
        await client.close()
        sipp.kill()
    assert appliance.count_in_log(
        r"; pure-Python packet path \(media\.native_loop = false\)") == 2
    assert metric(appliance, "worker_native_loop", 0) == 0


async def test_video_between_customer_and_agent_over_the_worker_port(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address}, media=media_ports())
    customer = await MediaServerClient.connect(appliance.url)
    agent_client = await MediaServerClient.connect(appliance.url)
    try:
        user = await customer.make_video_call(5678, 9333, USERDATA, medium=2)
        await user.wait_for("Join", timeout=20)
        keyframes = count_keyframes_sent(user)
        agent = await agent_client.join_room(roomkey_of(aps, user))
        answer = (await agent.wait_for("answer", timeout=15)).action.answer.sdp
        assert "a=ice-lite" in answer
        await agent.wait_for("dtls_connect", timeout=15)
        await eventually(lambda: agent.frames_received.get("video", 0) > 20, 10)
        await eventually(lambda: user.frames_received.get("video", 0) > 20, 10)
        # RTCP feedback crosses the port too: the agent's PLI reaches the customer's encoder.
        await asyncio.sleep(1.2)
        before = keyframes[0]
        receiver = next(t.receiver for t in agent.pc.getTransceivers() if t.kind == "video")
        stats = await receiver.getStats()
        media_ssrc = next(s.ssrc for s in stats.values() if s.type == "inbound-rtp")
        await receiver._send_rtcp_pli(media_ssrc)
        await eventually(lambda: keyframes[0] > before, 3)
        await eventually(lambda: sum(w["packets_received"]
                                     for w in status(appliance)["workers"]) > 500, 10)
        workers = status(appliance)["workers"]
        assert all(w["decoders_created"] == 0 for w in workers), workers
        if native.AVAILABLE:  # both cameras on the native loop, the PLI answered through it
            assert appliance.count_in_log(r"native video: .* relayed by the native loop") == 2
        await agent.hangup()
        await user.hangup()
        await sipp_ok(sipp)
    finally:
        await customer.close()
        await agent_client.close()
        sipp.kill()


# -- the ports the operator opens --------------------------------------------------------


async def test_one_udp_and_one_tcp_port_per_worker_during_20_calls(
    aps: Any, make_appliance: Any
) -> None:
    media = media_ports()
    appliance = make_appliance(
        aps.url, media=media, workers={"count": 2, "channels_per_worker": 10},
        admission={"max_setup_per_connection": 32, "max_setup_per_address": 32,
                   "max_setup_total": 32})
    sip_base = appliance.sections["sip"]["base_port"]
    async with await MediaServerClient.connect(appliance.url) as client:
        calls = [await client.make_video_call(5678, 9333, json.dumps({"id": f"P{i}"}),
                                              medium=0) for i in range(20)]
        for call in calls:
            await call.wait_for("dtls_connect", timeout=30)
        live = status(appliance)
        assert len(live["calls"]) == 20 and not any(c.ended for c in calls)
        pids = {w["index"]: w["pid"] for w in live["workers"]}
        udp, tcp = listening("u"), listening("t")
        sip = config.Config().sip  # the SIP-side RTP range (towards the PBX) stays as it was
        for index, pid in pids.items():
            ours_udp = {port for port, owner in udp if owner == pid
                        and port != sip_base + index
                        and not sip.rtp_port_min <= port <= sip.rtp_port_max}
            ours_tcp = {port for port, owner in tcp if owner == pid}
            assert ours_udp == {media["udp_port"] + index}, (index, udp)
            assert ours_tcp == {media["tcp_port"] + index}, (index, tcp)
        # Nothing of the appliance's in the old WebRTC range any more.
        appliance_pids = set(pids.values())
        old = config.Config().media
        assert not [port for port, owner in udp if owner in appliance_pids
                    and old.port_min <= port <= old.port_max], udp
        for call in calls:
            await call.hangup()


# -- the end of a call ---------------------------------------------------------------------


async def test_a_browser_whose_network_vanishes_is_released_by_consent(
    aps: Any, make_appliance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This test's "browser" (the SDK's aioice) checks consent every ~0.5 s instead of 5 s,
    # so a 2 s consent timeout on the appliance keeps a healthy call and runs in seconds.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.5)
    appliance = make_appliance(aps.url, media=media_ports(tcp=False, consent_timeout=2.0))
    async with await MediaServerClient.connect(appliance.url) as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        answer = (await call.wait_for("answer", timeout=15)).action.answer.sdp
        await call.wait_for("dtls_connect", timeout=15)
        worker = worker_of(appliance, call)
        assert_lite_answer(answer, appliance.sections["media"]["udp_port"] + worker, None)
        await asyncio.sleep(3.0)  # longer than the timeout: the checks keep it alive
        assert not call.ended
        with udp_dropped_from(sdk_local_addr(call)[1]):
            dropped = time.monotonic()
            release = (await call.wait_for("release", timeout=8)).action
            took = time.monotonic() - dropped
        assert (release.cause, release.causestring) == (
            41, "media connection lost: the browser's network went away "
                "(no ICE consent check for 2 s)"), release
        assert 2.0 - 0.7 <= took <= 4.5, took
        # One report carries both once the leg is released (the port counts first).
        await eventually(lambda: metric(appliance, "worker_ice_consent_failures_total", worker)
                         == metric(appliance, "worker_calls_failed_total", worker) == 1, 3)
        assert status(appliance)["workers"][worker]["ice_consent_failures"] == 1
    assert appliance.count_in_log(
        r"media transport failed on the worker's port: consent expired") == 1
    assert appliance.count_in_log(r"released, cause 41 media connection lost: the browser's "
                                  r"network went away") == 1


async def test_a_browser_that_closes_its_media_ends_the_leg(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(aps.url, media=media_ports(tcp=False))
    async with await MediaServerClient.connect(appliance.url) as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        await call.wait_for("dtls_connect", timeout=15)
        # DTLS close_notify, no `release` frame: aiortc closes the appliance's pc first.
        await call.pc.close()
        await eventually(lambda: appliance.count_in_log(
            r"the browser closed its media connection") == 1, 5)
        await eventually(lambda: not status(appliance)["calls"], 5)
    assert appliance.count_in_log(r"released, cause 16 normal release") == 1
    assert metric(appliance, "worker_calls_failed_total", 0) + metric(
        appliance, "worker_calls_failed_total", 1) == 0


# -- RTP over TCP ----------------------------------------------------------------------------


async def offer_over_tcp(client: MediaServerClient) -> Call:
    """An offer with `protocol: "TCP"` (PROTOCOL.md)."""
    return await client.make_video_call(5678, 9333, USERDATA, medium=0, transport="TCP")


def sdp_value(sdp: str, key: str) -> str:
    found = re.search(rf"^a={key}:(\S+)\r?$", sdp, re.M)
    assert found, key
    return found.group(1)


def ice_connection(call: Call) -> Any:
    """The ICE connection under the call's (bundled) transport."""
    return call.pc.getTransceivers()[0].receiver.transport.transport._connection


async def test_a_whole_call_over_tcp_voice_to_the_phone_and_video_both_ways(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    """Both legs with `protocol: "TCP"`: each answer announces only the worker's TCP
    candidate, the SDK connects to it as RFC 6544's active side (its own ICE-TCP client,
    framed by RFC 4571), and the voice echoed by the desk phone and the video between
    customer and agent all cross that one TCP port."""
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    media = media_ports()
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address}, media=media)
    client, call, track, reader = await place_call(appliance, medium=2, transport="TCP")
    agent_client = await MediaServerClient.connect(appliance.url)
    try:
        answer = (await call.wait_for("answer", timeout=15)).action.answer.sdp
        worker = worker_of(appliance, call)
        tcp = media["tcp_port"] + worker
        assert_lite_answer(answer, None, tcp)
        (ice,) = await ice_actions(call, 1)
        assert ice.split()[2].lower() == "tcp" and ice.split()[5] == str(tcp), ice
        assert " tcptype active" in call.pc.localDescription.sdp
        assert " udp " not in call.pc.localDescription.sdp  # no UDP candidate offered
        await call.wait_for("dtls_connect", timeout=15)
        conn = ice_connection(call)
        assert isinstance(conn, ActiveTcpConnection), conn
        assert conn._nominated[1].remote_addr == ("127.0.0.1", tcp)
        await call.wait_for("Join", timeout=10)  # the phone answered
        agent = await agent_client.join_room(roomkey_of(aps, call), transport="TCP")
        await agent.wait_for("dtls_connect", timeout=15)
        assert isinstance(ice_connection(agent), ActiveTcpConnection)
        await eventually(lambda: agent.frames_received.get("video", 0) > 20, 10)
        await eventually(lambda: call.frames_received.get("video", 0) > 20, 10)
        await asyncio.sleep(2)
        report = reader.report(track)
        print(f"echo over ICE-TCP through the worker's port + sipp: {report}")
        assert report.received > 100, report
        assert report.loss_pct < 2.0, report
        assert metric(appliance, "worker_ice_tcp_connections_total", worker) == 2
        assert metric(appliance, "worker_ice_checks_total", worker) >= 2
        assert metric(appliance, "worker_ice_tcp_drops_total", worker) == 0
        assert conn.frames_dropped == 0 and conn.rx_queue_drops == 0
        assert all(w["decoders_created"] == 0 for w in status(appliance)["workers"])
        await agent.hangup()
        await call.hangup()
        await sipp_ok(sipp)
    finally:
        await client.close()
        await agent_client.close()
        sipp.kill()


async def test_ice_tcp_connections_over_the_per_address_bound_are_refused_and_counted(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(aps.url, workers={"count": 1},
                               media={**media_ports(1), "tcp_max_per_address": 1,
                                      "dtls_timeout": 3.0})
    async with await MediaServerClient.connect(appliance.url) as client:
        first = await offer_over_tcp(client)
        await first.wait_for("dtls_connect", timeout=15)
        # The same address again: its TCP connection is refused, so it never connects.
        second = await offer_over_tcp(client)
        release = (await second.wait_for("release", timeout=15)).action
        assert (release.cause, release.causestring) == (16, "Connect Timeout"), release
        assert metric(appliance, "worker_ice_tcp_refused_total", 0) >= 1
        assert metric(appliance, "worker_ice_tcp_connections_total", 0) == 1
        assert not first.ended  # the call within the bound goes on
        await first.hangup()
    assert appliance.count_in_log(r"ICE-TCP connections refused") >= 1


async def test_an_offer_over_tcp_without_a_tcp_port_is_refused(
    aps: Any, make_appliance: Any
) -> None:
    appliance = make_appliance(aps.url, media=media_ports(tcp=False))
    async with await MediaServerClient.connect(appliance.url) as client:
        call = await offer_over_tcp(client)
        release = (await call.wait_for("release", timeout=15)).action
        assert (release.cause, release.causestring) == (63, "RTP over TCP not available")
        # A UDP offer on the same appliance still connects.
        again = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        await again.wait_for("dtls_connect", timeout=15)


async def test_a_worker_that_cannot_bind_its_port_refuses_calls_and_stays_up(
    aps: Any, make_appliance: Any
) -> None:
    base = free_udp_ports(2)
    taken = []
    for port in (base, base + 1):  # another program holds both workers' ports
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        taken.append(s)
    try:
        appliance = make_appliance(aps.url, media={"udp_port": base, "tcp_port": 0})
        async with await MediaServerClient.connect(appliance.url) as client:
            call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
            release = (await call.wait_for("release", timeout=15)).action
            assert (release.cause, release.causestring) == (41, "media port unavailable")
        assert appliance.count_in_log(r"worker [01]: cannot listen for WebRTC media on "
                                      rf"127\.0\.0\.1 UDP ({base}|{base + 1}): ") == 2
        await asyncio.sleep(1.0)
        assert all(w["restarts"] == 0 and w["ready"] for w in status(appliance)["workers"])
    finally:
        for s in taken:
            s.close()
