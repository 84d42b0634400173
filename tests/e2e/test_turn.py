"""TURN for the pages: coturn (Debian `coturn`) with use-auth-secret in the test namespace,
configured from the shipped sample conf/coturn.conf, the appliance given only
`turn:127.0.0.1:PORT?transport=tcp` with a secret file, and the real pages in headless
Chromium and Firefox ESR placing a call while UDP between the browser and the appliance is
dropped: the call connects through the relay.

How UDP is taken away from the browser. The issue suggests an nftables rule on the uid the
browser runs as (`meta skuid`), which needs the browser under another uid; the tests start
Chromium and Firefox as the test's own user (tests/e2e/chromium.py, firefox.py), and so do
the appliance and coturn, so a uid rule would hit all three. Addresses do not separate them
either: everything is on 127.0.0.1. Ports do: the appliance's media sockets bind only in
`[media] port_min..port_max` (MEDIA_PORTS) and coturn's relay sockets only in its
`min-port..max-port` (RELAY_PORTS), both below the kernel's ephemeral range, where the
browsers' own sockets are (checked). The rules drop every UDP datagram to or from a media
port unless its other end is a relay port. What remains between browser and appliance is
the browser's TCP to coturn and coturn's UDP from its relay ports: exactly the path of a
network that lets no UDP out. Both rules count what they drop; the browser's own checks to
the appliance's host candidate must be among the drops (the rule is not idle).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint

from appliance.core import turn_credentials as tc
from appliance.core.tls import ensure_certificate
from appliance_sdk import MediaServerClient
from tests.e2e.browsers import launch
from tests.e2e.conftest import ROOT, Appliance, _toml_value, free_port, free_udp_ports, write_toml
from tests.e2e.test_pages import DESKTOP, PHONE, USERDATA, browser_params, roomkey_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TURNSERVER = "/usr/bin/turnserver"
SAMPLE = ROOT / "conf" / "coturn.conf"
MEDIA_PORTS = (12000, 12099)  # the appliance's [media] port_min..port_max
RELAY_PORTS = (13000, 13099)  # coturn's min-port..max-port
SECRET = "turn-test-secret-9f8e7d6c5b4a39281706"
TTL = 600
NFT_TABLE = "turn_test"

SELECTED_PAIR_JS = """window.appliance.call.pc.getStats().then(r => {
  const all = [...r.values()];
  const transport = all.find(s => s.type === 'transport' && s.selectedCandidatePairId);
  const pair = transport ? r.get(transport.selectedCandidatePairId)
                         : all.find(s => s.type === 'candidate-pair' && s.selected);
  if (!pair) return null;
  const l = r.get(pair.localCandidateId), m = r.get(pair.remoteCandidateId);
  return {state: pair.state, bytesSent: pair.bytesSent, bytesReceived: pair.bytesReceived,
          local: {type: l.candidateType, protocol: l.protocol, relayProtocol: l.relayProtocol,
                  address: l.address, port: l.port},
          remote: {type: m.candidateType, protocol: m.protocol, address: m.address,
                   port: m.port}};
})"""


# -- coturn, from the sample -------------------------------------------------------------


def coturn_config(values: dict[str, str | None], extra: list[str]) -> str:
    """conf/coturn.conf with each `name=...` line of `values` replaced (None: deleted) and
    `extra` lines added. Every name must be in the sample, and no placeholder may be left
    on an active line: the sample is what is under test."""
    out, seen = [], set()
    for line in SAMPLE.read_text().splitlines():
        name = line.split("=", 1)[0].strip()
        if not line.startswith("#") and name in values:
            seen.add(name)
            if values[name] is not None:
                out.append(f"{name}={values[name]}")
            continue
        out.append(line)
    assert seen == set(values), f"not in {SAMPLE}: {set(values) - seen}"
    active = [line for line in out if line and not line.startswith("#")]
    left = [line for line in active if re.search(r"YOUR-|TURN-P|APPLIANCE-MEDIA", line)]
    assert not left, left
    return "\n".join(out + extra) + "\n"


@dataclass
class Coturn:
    port: int  # plain TCP (listening-port)
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=tcp"


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    if not os.access(TURNSERVER, os.X_OK):
        pytest.skip("coturn not installed (make system-deps installs it)")
    workdir = tmp_path / "coturn"
    workdir.mkdir()
    cert, key = ensure_certificate(workdir, "", "")
    port, tls_port = free_port(), free_port()
    log_path = workdir / "turnserver.log"
    text = coturn_config(
        {"listening-ip": "127.0.0.1", "relay-ip": "127.0.0.1", "external-ip": None,
         "listening-port": str(port), "tls-listening-port": str(tls_port),
         "min-port": str(RELAY_PORTS[0]), "max-port": str(RELAY_PORTS[1]),
         "static-auth-secret": SECRET, "allowed-peer-ip": "127.0.0.1",
         "cert": str(cert), "pkey": str(key), "syslog": None},
        # The appliance is on loopback here: coturn refuses loopback peers unless told.
        # verbose: the log then names the user of each allocation.
        ["allow-loopback-peers", "verbose", f"log-file={log_path}", "simple-log", "no-stdout-log",
         f"pidfile={workdir / 'turnserver.pid'}"],
    )
    conf = workdir / "turnserver.conf"
    conf.write_text(text)
    process = subprocess.Popen([TURNSERVER, "-c", str(conf)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL,
                               stderr=open(workdir / "stderr.txt", "wb"))  # noqa: SIM115
    server = Coturn(port, log_path, process)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, f"turnserver exited:\n{server.log()}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, f"turnserver not listening:\n{server.log()}"
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the appliance, with ice_servers ------------------------------------------------------


@pytest.fixture
def start_appliance(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Like conftest's make_appliance, with a [media] ice_servers list (inline tables, which
    conftest's TOML writer does not write) and the media ports in MEDIA_PORTS."""
    started: list[Appliance] = []

    def start(aps_url: str, ice_servers: list[dict[str, Any]], pbx: str) -> Appliance:
        data = tmp_path / f"appliance-{len(started)}"
        data.mkdir()
        port = free_port()
        sections: dict[str, dict[str, Any]] = {
            "appliance": {"id": "ms-test", "data_dir": str(data), "log_level": "INFO"},
            "signalling": {"listen": "127.0.0.1", "port": port},
            "workers": {"count": 1, "channels_per_worker": 4, "restart_delay": 0.1},
            "aps": {"url": aps_url, "timeout": 1.0, "attempts": 2},
            "sip": {"base_port": free_udp_ports(2), "proxy": pbx},
            "admin": {"port": free_port()},
            # The workers' media ports inside the blocked range, and no ICE-TCP port: the
            # only way left to the appliance is the relay.
            "media": {"addresses": ["127.0.0.1"], "dtls_timeout": 10.0,
                      "port_min": MEDIA_PORTS[0], "port_max": MEDIA_PORTS[1],
                      "udp_port": MEDIA_PORTS[0] + 10, "tcp_port": 0},
        }
        path = data / "appliance.toml"
        write_toml(path, sections)  # [media] last: the line below belongs to it
        tables = ", ".join(
            "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in s.items()) + " }"
            for s in ice_servers)
        with path.open("a") as f:
            f.write(f"ice_servers = [{tables}]\n")
        appliance = Appliance(path, data / "appliance.log", port, sections=sections)
        started.append(appliance)
        appliance.start()
        return appliance

    yield start
    for appliance in started:
        appliance.stop()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            sys.stderr.write(f"--- appliance log {appliance.log_path} ---\n{appliance.log()}\n")


def turn_server(coturn: Coturn, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "turn.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"{SECRET}\n".encode())
    os.close(fd)
    return {"urls": [coturn.url], "secret_file": str(path), "ttl": TTL}


@pytest.fixture
def silent_pbx() -> Iterator[str]:
    """A "PBX" that swallows the INVITE: the customer's call stays up, ringing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


# -- UDP between browser and appliance, dropped -------------------------------------------


@pytest.fixture
def udp_blocked() -> Iterator[Callable[[], dict[str, int]]]:
    """The nftables rules of the module docstring; yields a reader of their drop counts."""
    if shutil.which("nft") is None:
        pytest.skip("nft not installed (make system-deps installs nftables)")
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
              .split())
    assert max(MEDIA_PORTS[1], RELAY_PORTS[1]) < low, "ports must stay out of the ephemeral range"
    media, relay = "-".join(map(str, MEDIA_PORTS)), "-".join(map(str, RELAY_PORTS))
    ruleset = f"""table inet {NFT_TABLE} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    udp dport {media} udp sport != {relay} counter drop comment "to-media"
    udp sport {media} udp dport != {relay} counter drop comment "from-media"
  }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=ruleset.encode(), check=True, timeout=10)

    def drops() -> dict[str, int]:
        done = subprocess.run(["nft", "-j", "list", "table", "inet", NFT_TABLE],
                              capture_output=True, check=True, timeout=10)
        counts = {}
        for item in json.loads(done.stdout)["nftables"]:
            rule = item.get("rule")
            if rule:
                counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
                counts[rule["comment"]] = counter["packets"]
        return counts

    try:
        yield drops
    finally:
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], timeout=10)


# -- the tests ------------------------------------------------------------------------------


async def place_customer_and_agent(browser: Any, base: str, aps: Any) -> tuple[Any, Any]:
    customer = await browser.new_page(**PHONE)
    query = urlencode({"caller": 5678, "callee": 9333, "userdata": USERDATA, "autocall": 1})
    await customer.goto(f"{base}/VideoCall.html?{query}")
    await customer.wait_for("window.appliance.call && (window.appliance.call.dtls"
                            " || window.appliance.call.ended)", 25)
    assert await customer.evaluate("window.appliance.call.release") is None
    agent = await browser.new_page(**DESKTOP)
    await agent.goto(f"{base}/AgentVideo.html?roomkey={await roomkey_of(aps, customer)}")
    await agent.wait_for("window.appliance.call && (window.appliance.call.dtls"
                         " || window.appliance.call.ended)", 25)
    assert await agent.evaluate("window.appliance.call.release") is None
    return customer, agent


@pytest.mark.parametrize("name", browser_params())
async def test_the_pages_connect_through_coturn_when_udp_to_the_appliance_is_dropped(
    name: str, tmp_path: Path, aps: Any, coturn: Coturn, start_appliance: Any,
    silent_pbx: str, udp_blocked: Callable[[], dict[str, int]],
) -> None:
    appliance = start_appliance(aps.url, [turn_server(coturn, tmp_path)], silent_pbx)
    base = f"https://127.0.0.1:{appliance.port}"
    async with launch(name, tmp_path / name) as browser:
        customer, agent = await place_customer_and_agent(browser, base, aps)
        # Video goes both ways, relayed: each page shows the other's camera.
        await agent.wait_for("document.getElementById('remote').videoWidth > 0", 15)
        await customer.wait_for("document.getElementById('remote').videoWidth > 0", 15)
        for page in (customer, agent):
            pair = await page.evaluate(SELECTED_PAIR_JS)
            assert pair is not None and pair["state"] == "succeeded", pair
            assert pair["local"]["type"] == "relay", pair
            assert pair["local"]["relayProtocol"] == "tcp", pair
            assert pair["remote"]["address"] == "127.0.0.1", pair
            assert MEDIA_PORTS[0] <= pair["remote"]["port"] <= MEDIA_PORTS[1], pair
            assert pair["bytesSent"] > 0 and pair["bytesReceived"] > 0, pair
            # The page was given exactly the configured server, with a credential of its own.
            given = await page.evaluate("window.appliance.call.pc.getConfiguration().iceServers")
            assert len(given) == 1 and given[0]["urls"] in ([coturn.url], coturn.url), given
            assert re.fullmatch(r"\d+:ms-test\.[0-9a-f]{12}", given[0]["username"]), given
            assert given[0]["credential"] == tc.rest_credential(SECRET.encode(),
                                                                given[0]["username"])
            # ...which is the one coturn allocated for.
            assert re.search(rf"user <{re.escape(given[0]['username'])}>: incoming packet "
                             r"ALLOCATE processed, success", coturn.log()), coturn.log()[-3000:]
        await customer.screenshot(tmp_path / f"turn-customer-{name}.png")
        await customer.click("#hangup")
        await agent.wait_for("window.appliance.state === 'ended'", 10)
    drops = udp_blocked()
    # The browsers' own UDP to the appliance was tried, and dropped; the worker, an ICE-lite
    # agent, never starts checks of its own, so nothing left its media port but via the relay.
    assert drops["to-media"] > 0 and drops["from-media"] == 0, drops


@pytest.mark.parametrize("name", browser_params())
async def test_with_udp_open_the_pages_still_choose_the_direct_path(
    name: str, tmp_path: Path, aps: Any, coturn: Coturn, start_appliance: Any, silent_pbx: str,
) -> None:
    appliance = start_appliance(aps.url, [turn_server(coturn, tmp_path)], silent_pbx)
    async with launch(name, tmp_path / name) as browser:
        customer, agent = await place_customer_and_agent(
            browser, f"https://127.0.0.1:{appliance.port}", aps)
        for page in (customer, agent):
            await page.wait_for("window.appliance.call.pc.connectionState === 'connected'", 5)
            pair = await page.evaluate(SELECTED_PAIR_JS)
            assert pair is not None and pair["local"]["type"] == "host", pair
            assert pair["local"]["protocol"] == "udp", pair
            # The relay was offered all the same: the page had its credential.
            sdp = await page.evaluate("window.appliance.sent[0].msg.offer.sdp")
            assert " typ relay " in sdp, sdp


async def test_coturn_takes_the_credentials_the_appliance_hands_out_and_no_others(
    tmp_path: Path, aps: Any, coturn: Coturn, start_appliance: Any, silent_pbx: str,
) -> None:
    """The endpoint's answer (fresh, not cached, same origin), the SDK's per-call fetch, and
    coturn: it allocates for the appliance's credential, relays to the appliance's address
    only (the sample's allowed-peer-ip), and refuses a credential that is expired, forged
    or made with another secret. The TURN client is aioice's, the one aiortc uses."""
    appliance = start_appliance(aps.url, [turn_server(coturn, tmp_path)], silent_pbx)
    url = f"https://127.0.0.1:{appliance.port}/ice-servers"
    async with aiohttp.ClientSession() as session:
        bodies = []
        for _ in range(2):
            async with session.get(url, ssl=False) as response:
                assert response.status == 200
                assert response.headers["Cache-Control"] == "no-store"
                assert response.content_type == "application/json"
                assert "Access-Control-Allow-Origin" not in response.headers
                bodies.append(await response.read())
        first, second = (tc.parse_answer(b)[0] for b in bodies)
        assert first["urls"] == [coturn.url]
        assert first["username"] != second["username"]  # one per call
        expiry = int(first["username"].split(":")[0])
        assert abs(expiry - (time.time() + TTL)) < 10

        # A client that loops on it is told to slow down.
        statuses = []
        for _ in range(40):
            async with session.get(url, ssl=False) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert response.headers["Retry-After"] == "1"
                    break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {200}, statuses

    await asyncio.sleep(1.5)  # refill: the SDK below asks again
    async with await MediaServerClient.connect(appliance.url, ice_servers="appliance") as client:
        fetched = await client.fetch_ice_servers()
        assert fetched[0]["urls"] == [coturn.url] and fetched[0]["username"] != first["username"]
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        await call.wait_for("dtls_connect", timeout=15)  # its ICE servers asked for this call

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", MEDIA_PORTS[0]))  # where the appliance's media would be
        peer.setblocking(False)
        received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        errors: asyncio.Queue[Exception] = asyncio.Queue()

        class Receiver(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                received.put_nowait((data, addr))

            def error_received(self, exc: Exception) -> None:
                errors.put_nowait(exc)

        transport, _ = await create_turn_endpoint(
            Receiver, ("127.0.0.1", coturn.port), first["username"], first["credential"],
            transport="tcp")
        try:
            relayed = transport.get_extra_info("sockname")
            assert relayed[0] == "127.0.0.1"
            assert RELAY_PORTS[0] <= relayed[1] <= RELAY_PORTS[1], relayed
            loop = asyncio.get_running_loop()
            transport.sendto(b"to the appliance", ("127.0.0.1", MEDIA_PORTS[0]))
            data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 100), 5)
            assert (data, source) == (b"to the appliance", tuple(relayed))
            peer.sendto(b"back", tuple(relayed))
            assert await asyncio.wait_for(received.get(), 5) == (
                b"back", ("127.0.0.1", MEDIA_PORTS[0]))
            # Any other peer is refused (the sample denies every address but the appliance's).
            transport.sendto(b"elsewhere", ("127.0.0.2", MEDIA_PORTS[0]))
            refused = await asyncio.wait_for(errors.get(), 5)
            assert isinstance(refused, stun.TransactionFailed), refused
            assert refused.response.error_code == 403, refused
        finally:
            transport.close()

    now = time.time()
    for why, username, credential in [
        ("expired", *tc.issue(SECRET.encode(), "ms-test.old", now - TTL - 5, TTL)),
        ("another secret", *tc.issue(b"not-the-secret", "ms-test.x", now, TTL)),
        ("forged expiry", str(expiry + 86400) + first["username"][len(str(expiry)):],
         first["credential"]),
    ]:
        with pytest.raises(stun.TransactionFailed) as err:
            await create_turn_endpoint(asyncio.DatagramProtocol, ("127.0.0.1", coturn.port),
                                       username, credential, transport="tcp")
        assert err.value.response.error_code == 401, why


async def test_without_ice_servers_the_pages_get_an_empty_list(
    aps: Any, make_appliance: Any,
) -> None:
    appliance = make_appliance(aps.url)
    async with aiohttp.ClientSession() as session, session.get(
            f"https://127.0.0.1:{appliance.port}/ice-servers", ssl=False) as response:
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        assert json.loads(await response.read()) == {"iceServers": []}


def _selected_pair(pc: Any) -> Any:
    """aioice's nominated pair under an aiortc peer connection (BUNDLE: one transport)."""
    ice = pc.getTransceivers()[0].sender.transport.transport._connection
    return ice._nominated.get(1)


async def test_the_sdk_connects_through_coturn_when_udp_to_the_appliance_is_dropped(
    tmp_path: Path, aps: Any, coturn: Coturn, start_appliance: Any, silent_pbx: str,
    udp_blocked: Callable[[], dict[str, int]],
) -> None:
    """The SDK (aiortc) given only the appliance's `turn:...?transport=tcp` server, with
    the same rules as the pages: its offer carries a relayed candidate, and the call's
    nominated pair is that relay (its TCP to coturn, coturn's UDP to the worker)."""
    appliance = start_appliance(aps.url, [turn_server(coturn, tmp_path)], silent_pbx)
    async with await MediaServerClient.connect(appliance.url, ice_servers="appliance") as client:
        call = await client.make_video_call(5678, 9333, USERDATA, medium=0)
        sdp = call.pc.localDescription.sdp
        relays = [ln for ln in sdp.splitlines() if " typ relay " in ln]
        assert len(relays) == 1 and " udp " in relays[0], sdp  # UDP from coturn onwards
        await call.wait_for("dtls_connect", timeout=20)
        pair = _selected_pair(call.pc)
        assert pair is not None, "no nominated pair"
        local, remote = pair.local_candidate, pair.remote_candidate
        assert local.type == "relay", (local, remote)
        assert RELAY_PORTS[0] <= local.port <= RELAY_PORTS[1], local
        assert remote.host == "127.0.0.1", remote
        assert MEDIA_PORTS[0] <= remote.port <= MEDIA_PORTS[1], remote  # the worker's socket
        # The relay's credential is the one the appliance issued for this call.
        username = pair.protocol.transport._TurnTransport__inner_protocol.username
        assert re.fullmatch(r"\d+:ms-test\.[0-9a-f]{12}", username), username
        assert re.search(rf"user <{re.escape(username)}>: incoming packet ALLOCATE processed, "
                         r"success", coturn.log()), coturn.log()[-3000:]
    drops = udp_blocked()
    # The SDK's direct UDP to the worker was tried, and dropped; the ICE-lite worker sent
    # nothing of its own outside the relay.
    assert drops["to-media"] > 0 and drops["from-media"] == 0, drops


async def test_the_fast_path_sends_over_a_relayed_pair(
    coturn: Coturn, udp_blocked: Callable[[], dict[str, int]],
) -> None:
    """rtc_adapter alone, no appliance: an aiortc "client" with a relay policy and coturn
    (over TCP), an answerer whose host candidate is in MEDIA_PORTS, UDP between them
    dropped. The client's nominated pair is relayed, and SrtpFastPath sends on it through
    aioice's TurnTransport (it has no socket to send on directly): the answerer decodes."""
    import contextlib

    from aiortc import RTCPeerConnection, RTCRtpSender
    from aiortc.mediastreams import MediaStreamError

    from appliance.edges.rtc_adapter import (
        CandidatePolicy,
        SilentTrack,
        SrtpFastPath,
        apply_candidate_policy,
        make_configuration,
        sender_ssrc,
    )
    from appliance.media import rtp

    username, credential = tc.issue(SECRET.encode(), "fastpath.test", time.time(), TTL)
    client = RTCPeerConnection(make_configuration(
        [{"urls": coturn.url, "username": username, "credential": credential}]))
    answerer = RTCPeerConnection(make_configuration([]))
    frames = 0
    counter = fast = None
    try:
        client.addTrack(SilentTrack("audio"))
        transceiver = client.getTransceivers()[0]
        transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                         if c.mimeType == "audio/PCMU"])
        apply_candidate_policy(client, CandidatePolicy.from_strings(["127.0.0.1"], relay=True))
        await client.setLocalDescription(await client.createOffer())
        await answerer.setRemoteDescription(client.localDescription)
        answerer.addTrack(SilentTrack("audio"))
        apply_candidate_policy(answerer, CandidatePolicy.from_strings(["127.0.0.1"],
                                                                      *MEDIA_PORTS))
        await answerer.setLocalDescription(await answerer.createAnswer())
        await client.setRemoteDescription(answerer.localDescription)
        for _ in range(1000):
            if client.connectionState == answerer.connectionState == "connected":
                break
            await asyncio.sleep(0.01)
        assert client.connectionState == answerer.connectionState == "connected"
        pair = _selected_pair(client)
        assert pair.local_candidate.type == "relay", pair
        received = answerer.getTransceivers()[0].receiver

        async def count_frames() -> None:
            nonlocal frames
            with contextlib.suppress(MediaStreamError):
                while True:
                    await received.track.recv()
                    frames += 1

        counter = asyncio.create_task(count_frames())
        fast = SrtpFastPath(client, on_rtp=lambda packet: None)
        ssrc = sender_ssrc(client, "audio")
        for seq in range(40):
            fast.send_rtp(rtp.build(0, seq == 0, seq, seq * 160, ssrc, b"\xff" * 160))
            await asyncio.sleep(0.02)
        for _ in range(150):
            if frames >= 25:
                break
            await asyncio.sleep(0.02)
        assert fast.sent == 40 and frames >= 25, frames
    finally:
        if counter is not None:
            counter.cancel()
        if fast is not None:
            fast.detach()
        await client.close()
        await answerer.close()
    drops = udp_blocked()
    assert drops["to-media"] > 0, drops  # the client's direct checks were tried, and dropped
