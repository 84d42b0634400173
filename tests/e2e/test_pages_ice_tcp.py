"""The per-worker media port (issue 12) with the real pages: VideoCall.html (the customer)
and AgentVideo.html (the agent's video leg) in headless Chromium and Firefox ESR, sipp as
the agent's desk phone, against an appliance whose two workers each listen on one WebRTC
UDP port and one TCP port ([media] udp_port / tcp_port) and answer as ICE-lite.

- The browser's UDP to the appliance's WebRTC UDP ports is dropped: both legs connect over
  ICE-TCP (RFC 6544, the browser active, the worker passive). getStats' selected pair is
  succeeded and nominated, its local and remote candidates are TCP and the remote one is
  the worker's TCP port; video is decoded both ways and the desk phone's echo arrives.
- UDP open: the same pages choose the worker's UDP port (it has the higher priority).

How the UDP is taken away. The browsers, the appliance and sipp run as one uid on
127.0.0.1 (tests/e2e/test_turn.py explains why `meta skuid` cannot separate them), but the
workers' WebRTC UDP ports are theirs alone: nothing else binds them, and nothing but a
browser sends to them. One nftables rule drops every datagram to udp_port..udp_port+1 and
counts it; the count must be non-zero (the browsers did try UDP, the rule is not idle).
A second rule counts datagrams *from* those ports: an ICE-lite agent that never heard a
check has no UDP address to send to, so it must stay zero. SIP and the desk phone's RTP
use other ports and are untouched.

One appliance, AP-S and desk phone serve the whole module (a call is hung up, and the
appliance seen idle, before the next test starts); each test starts its own browser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_asyncio

from reference_aps.server import serve as serve_aps
from tests.e2e.browsers import Page, launch
from tests.e2e.conftest import (
    Appliance,
    ApsServer,
    eventually,
    free_port,
    free_udp_ports,
    write_toml,
)
from tests.e2e.test_media_port import free_tcp_ports, status
from tests.e2e.test_pages import (
    DESKTOP,
    INBOUND_AUDIO_JS,
    INBOUND_VIDEO_JS,
    PHONE,
    USERDATA,
    browser_params,
    roomkey_of,
)
from tests.sipp_runner import Sipp, start_sipp

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60),
              pytest.mark.asyncio(loop_scope="module")]

WORKERS = 2
NFT_TABLE = "pages_ice_tcp"

# The selected pair and its two candidates. Chromium names the pair on its transport stats
# (selectedCandidatePairId); Firefox has no transport stats and marks the pair `selected`.
# Both report the pair's state and `nominated`, and each candidate's `protocol`.
SELECTED_PAIR_JS = """window.appliance.call.pc.getStats().then(r => {
  const all = [...r.values()];
  const cand = (id) => { const c = r.get(id); return c && {type: c.candidateType,
      protocol: c.protocol, tcpType: c.tcpType ?? null, address: c.address, port: c.port}; };
  const transport = all.find(s => s.type === 'transport' && s.selectedCandidatePairId);
  const pair = transport ? r.get(transport.selectedCandidatePairId)
                         : all.find(s => s.type === 'candidate-pair' && s.selected);
  const pairs = all.filter(s => s.type === 'candidate-pair').map(p => ({
      state: p.state, nominated: p.nominated ?? null, local: cand(p.localCandidateId),
      remote: cand(p.remoteCandidateId)}));
  return {selected: pair ? {state: pair.state, nominated: pair.nominated ?? null,
                            bytesSent: pair.bytesSent, bytesReceived: pair.bytesReceived,
                            local: cand(pair.localCandidateId),
                            remote: cand(pair.remoteCandidateId)} : null,
          pairs};
})"""
ANSWER_SDP_JS = "window.appliance.events.find(e => e.action === 'answer').msg.answer.sdp"
CONNECTED_JS = ("window.appliance.call && (window.appliance.call.dtls"
                " || window.appliance.call.ended)")


@dataclass
class Site:
    """What the module's tests share: the appliance, its AP-S and its desk phone."""

    appliance: Appliance
    aps: ApsServer
    sipp: Sipp
    udp_port: int  # worker i listens on udp_port + i
    tcp_port: int  # ... and on tcp_port + i

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.appliance.port}"

    def byes(self) -> int:
        """BYEs the desk phone received (sipp's message trace)."""
        return len(re.findall(r"^BYE sip:", self.sipp.messages, re.M))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    workdir = tmp_path_factory.mktemp("pages-ice-tcp")
    db = workdir / "aps.sqlite3"
    runner = await serve_aps("127.0.0.1", 0, db)
    host, aps_port = runner.addresses[0][:2]
    aps = ApsServer(f"http://{host}:{aps_port}", db, runner)
    # One sipp for the module: it answers each call, echoes its RTP, waits for the BYE.
    sipp = await start_sipp("desk/desk_echo.xml", workdir, "-rtp_echo", "-mp",
                            str(free_udp_ports(4)), timeout="900s", calls=100)
    udp_port, tcp_port = free_udp_ports(WORKERS), free_tcp_ports(WORKERS)
    data = workdir / "appliance"
    data.mkdir()
    port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "appliance": {"id": "ms-test", "data_dir": str(data), "log_level": "INFO"},
        "signalling": {"listen": "127.0.0.1", "port": port},
        "workers": {"count": WORKERS, "channels_per_worker": 4, "restart_delay": 0.1},
        "aps": {"url": aps.url, "timeout": 1.0, "attempts": 2},
        "sip": {"base_port": free_udp_ports(WORKERS), "proxy": sipp.address},
        "admin": {"port": free_port()},
        "media": {"addresses": ["127.0.0.1"], "dtls_timeout": 10.0,
                  "udp_port": udp_port, "tcp_port": tcp_port},
    }
    config_path = data / "appliance.toml"
    write_toml(config_path, sections)
    appliance = Appliance(config_path, data / "appliance.log", port, sections=sections)
    try:
        appliance.start()
        assert appliance.count_in_log(r"WebRTC media on UDP \d+ and TCP \d+ \(ICE-lite") \
            == WORKERS, appliance.log()
        yield Site(appliance, aps, sipp, udp_port, tcp_port)
    finally:
        appliance.stop()
        sipp.kill()
        await runner.cleanup()


@pytest.fixture(autouse=True)
def _appliance_log_on_failure(site: Site, request: pytest.FixtureRequest) -> Iterator[None]:
    start = len(site.appliance.log())
    yield
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        sys.stderr.write(f"--- appliance log (this test) ---\n{site.appliance.log()[start:]}\n"
                         f"{site.sipp.diagnostics()}\n")


@pytest.fixture
def browser_udp_dropped(site: Site) -> Iterator[Callable[[], dict[str, int]]]:
    """The nftables rules of the module docstring; yields a reader of their counters."""
    if shutil.which("nft") is None:
        pytest.skip("nft not installed (make system-deps installs nftables)")
    ports = f"{site.udp_port}-{site.udp_port + WORKERS - 1}"
    ruleset = f"""table inet {NFT_TABLE} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    udp dport {ports} counter drop comment "to-media"
    udp sport {ports} counter drop comment "from-media"
  }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=ruleset.encode(), check=True, timeout=10)

    def counters() -> dict[str, int]:
        done = subprocess.run(["nft", "-j", "list", "table", "inet", NFT_TABLE],
                              capture_output=True, check=True, timeout=10)
        found = {}
        for item in json.loads(done.stdout)["nftables"]:
            rule = item.get("rule")
            if rule:
                counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
                found[rule["comment"]] = counter["packets"]
        return found

    try:
        yield counters
    finally:
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], timeout=10)


# -- the call ------------------------------------------------------------------------------


def worker_of(site: Site, channel: int) -> int:
    placed = {c["channel"]: c["worker"] for c in status(site.appliance)["calls"]}
    return int(placed[channel])


def answer_candidates(sdp: str) -> list[list[str]]:
    return [line.split()[2:] for line in sdp.splitlines() if line.startswith("a=candidate:")]


async def customer_and_agent(browser: Any, site: Site) -> tuple[Page, Page]:
    """The customer calls (the desk phone answers), then the agent's video page joins."""
    customer = await browser.new_page(**PHONE)
    query = urlencode({"caller": 5678, "callee": 9333, "userdata": USERDATA, "autocall": 1})
    await customer.goto(f"{site.base}/VideoCall.html?{query}")
    await customer.wait_for(CONNECTED_JS, 20)
    assert await customer.evaluate("window.appliance.call.release") is None
    await customer.wait_for("window.appliance.state === 'incall'", 10)  # the phone answered
    agent = await browser.new_page(**DESKTOP)
    await agent.goto(f"{site.base}/AgentVideo.html?roomkey={await roomkey_of(site.aps, customer)}")
    await agent.wait_for(CONNECTED_JS, 20)
    assert await agent.evaluate("window.appliance.call.release") is None
    for page in (customer, agent):
        await page.wait_for("window.appliance.call.pc.connectionState === 'connected'", 10)
    return customer, agent


async def check_leg(site: Site, page: Page, protocol: str) -> dict[str, Any]:
    """One leg's answer and its selected pair: the worker's own port, over `protocol`."""
    worker = worker_of(site, await page.evaluate("window.appliance.call.channel"))
    udp, tcp = site.udp_port + worker, site.tcp_port + worker
    # The worker's ICE-lite answer: its UDP candidate, then its passive TCP one.
    sdp = await page.evaluate(ANSWER_SDP_JS)
    assert "\r\na=ice-lite\r\n" in sdp.split("\r\nm=", 1)[0] + "\r\n", sdp
    found = answer_candidates(sdp)
    assert [c[0].lower() for c in found[:2]] == ["udp", "tcp"], found
    assert [c[3] for c in found[:2]] == [str(udp), str(tcp)], found
    assert found[1][4:] == ["typ", "host", "tcptype", "passive"], found

    stats = await page.evaluate(SELECTED_PAIR_JS)
    pair = stats["selected"]
    assert pair is not None, stats
    assert pair["state"] == "succeeded" and pair["nominated"] is True, stats
    assert pair["local"]["protocol"] == protocol, stats
    assert pair["remote"]["protocol"] == protocol, stats
    assert pair["remote"]["address"] == "127.0.0.1", stats
    assert pair["remote"]["port"] == (tcp if protocol == "tcp" else udp), stats
    if protocol == "tcp" and pair["local"]["tcpType"] is not None:
        assert pair["local"]["tcpType"] == "active", stats  # RFC 6544: the worker is passive
    assert pair["bytesSent"] > 0 and pair["bytesReceived"] > 0, stats
    return stats


async def frames_decoded(page: Page) -> int:
    video = await page.evaluate(INBOUND_VIDEO_JS)
    return int(video["decoded"] or 0) if video else 0


async def video_both_ways_and_voice(customer: Page, agent: Page) -> None:
    """Video decoded on both pages, and still being decoded; the phone's echo arrives."""
    await agent.wait_for("document.getElementById('remote').videoWidth > 0", 10)
    await customer.wait_for("document.getElementById('remote').videoWidth > 0", 10)
    for page in (customer, agent):
        # Polled, not read once: Chromium may answer getStats from a cache a few tens of
        # milliseconds old, from before the first frame was counted.
        await page.wait_for(f"{INBOUND_VIDEO_JS}.then(v => v && v.decoded > 0)", 5)
        before = await frames_decoded(page)
        await page.wait_for(f"{INBOUND_VIDEO_JS}.then(v => v && v.decoded > {before + 10})", 5)
    heard = await customer.evaluate(INBOUND_AUDIO_JS)
    await customer.wait_for(f"{INBOUND_AUDIO_JS}.then(n => n > {heard} + 40)", 3)


async def hang_up(site: Site, customer: Page, agent: Page, byes: int) -> None:
    """The customer hangs up: the agent's leg ends, the phone gets its BYE, the appliance
    is idle again (the next test starts from nothing)."""
    await customer.click("#hangup")
    await agent.wait_for("window.appliance.state === 'ended'", 10)
    await eventually(lambda: site.byes() == byes + 1, 10)
    await eventually(lambda: not status(site.appliance)["calls"], 10)


def tcp_connections(site: Site) -> int:
    return sum(w["ice_tcp_connections"] for w in status(site.appliance)["workers"])


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", browser_params())
async def test_with_udp_dropped_the_pages_connect_over_ice_tcp(
    name: str, site: Site, tmp_path: Path, browser_udp_dropped: Callable[[], dict[str, int]],
) -> None:
    byes, accepted = site.byes(), tcp_connections(site)
    async with launch(name, tmp_path / name) as browser:
        customer, agent = await customer_and_agent(browser, site)
        for page in (customer, agent):
            stats = await check_leg(site, page, "tcp")
            print(f"{name} {await page.evaluate('location.pathname')}: {stats['selected']}")
        await video_both_ways_and_voice(customer, agent)
        await customer.screenshot(tmp_path / f"ice-tcp-customer-{name}.png")
        await hang_up(site, customer, agent, byes)
    drops = browser_udp_dropped()
    print(f"{name}: nft {drops}")
    assert drops["to-media"] > 0, drops  # the browsers tried UDP first, and lost it
    assert drops["from-media"] == 0, drops  # nothing to answer: the worker never heard it
    # The workers accepted the browsers' TCP connections (their counters, as /status says).
    await eventually(lambda: tcp_connections(site) >= accepted + 2, 5)


@pytest.mark.parametrize("name", browser_params())
async def test_with_udp_open_the_pages_choose_udp(
    name: str, site: Site, tmp_path: Path,
) -> None:
    byes = site.byes()
    async with launch(name, tmp_path / name) as browser:
        customer, agent = await customer_and_agent(browser, site)
        for page in (customer, agent):
            stats = await check_leg(site, page, "udp")
            print(f"{name} {await page.evaluate('location.pathname')}: {stats['selected']}")
        await video_both_ways_and_voice(customer, agent)
        await hang_up(site, customer, agent, byes)
