"""The complete call, end to end, with everything real: the customer's page (VideoCall.html)
and the agent's page (AgentVideo.html) in headless Chromium, the appliance, the reference
AP-S, and sipp as the agent's desk phone echoing the customer's voice.

Flow 1 then Flow 2 of PROTOCOL.md: the customer calls, the desk phone answers (Join audio),
the agent's page joins the room (Join video), video goes both ways, the customer hears the
phone, quality figures arrive every 5 s, app data goes both ways, and the agent hanging up
the desk phone (BYE) ends both pages with `release` cause 16.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.e2e.chromium import Chromium, Page
from tests.e2e.conftest import ROOT, free_udp_ports
from tests.sipp_runner import start_sipp

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed"),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed"),
]

ARTIFACTS = ROOT / "tests" / "artifacts"
USERDATA = json.dumps({"id": "A123456789"})
PHONE = {"width": 390, "height": 844, "mobile": True}
DESKTOP = {"width": 1280, "height": 800}
# How long the desk phone keeps the call up after its 200 OK before it sends BYE: long
# enough for every check below (two quality reports after the agent joins take ~10 s).
CALL_SECONDS = 20
CUSTOMER_CAMERA = (640, 480)  # Chromium's built-in fake camera, as VideoCall.html asks
AGENT_CAMERA = (320, 240)  # the agent's, from a Y4M file (write_agent_camera)


def encoder_sizes(camera: tuple[int, int]) -> set[tuple[int, int]]:
    """The camera's size and the sizes Chromium's encoder steps down to from it (each
    3/4 or 1/2 of the one above) while its bandwidth estimate is low."""
    width, height = camera
    return {(width * n // d, height * n // d) for n, d in ((1, 1), (3, 4), (1, 2), (3, 8),
                                                           (1, 4))}

# Per page, the figures the RTCPeerConnection reports about its media.
STATS_JS = """window.appliance.call.pc.getStats().then(r => {
  const all = [...r.values()];
  const pick = (type, kind) => all.find(s => s.type === type && s.kind === kind) || null;
  const iv = pick('inbound-rtp', 'video'), ia = pick('inbound-rtp', 'audio');
  const ov = pick('outbound-rtp', 'video'), oa = pick('outbound-rtp', 'audio');
  return {
    inVideo: iv && {framesDecoded: iv.framesDecoded || 0, frameWidth: iv.frameWidth || 0,
                    frameHeight: iv.frameHeight || 0, packetsReceived: iv.packetsReceived,
                    bytesReceived: iv.bytesReceived},
    inAudio: ia && {packetsReceived: ia.packetsReceived, audioLevel: ia.audioLevel,
                    totalAudioEnergy: ia.totalAudioEnergy, bytesReceived: ia.bytesReceived},
    outVideo: ov && {framesEncoded: ov.framesEncoded, frameWidth: ov.frameWidth,
                     frameHeight: ov.frameHeight, bytesSent: ov.bytesSent},
    outAudio: oa && {packetsSent: oa.packetsSent, bytesSent: oa.bytesSent},
  };
})"""


def write_agent_camera(path: Path, frames: int = 40) -> Path:
    """A Y4M clip for the agent's fake camera, unlike Chromium's built-in one (640x480,
    green): AGENT_CAMERA in size, navy with a yellow band and a white square moving
    across. So a page that decoded its own camera (echoed back) instead of the other
    party's would show the wrong size."""
    width, height = AGENT_CAMERA
    navy, yellow, white = (65, 181, 110), (210, 16, 146), (235, 128, 128)  # Y, Cb, Cr
    side = 64
    out = bytearray(f"YUV4MPEG2 W{width} H{height} F20:1 Ip A1:1 C420jpeg\n".encode())

    def plane(index: int, scale: int, x0: int) -> bytes:
        w, h, s, x = width // scale, height // scale, side // scale, x0 // scale
        band = bytes([yellow[index]]) * w
        plain = bytes([navy[index]]) * w
        square = plain[:x] + bytes([white[index]]) * s + plain[x + s:]
        top = (height // 2 - side // 2) // scale
        rows = [band if y < h // 8 else square if top <= y < top + s else plain
                for y in range(h)]
        return b"".join(rows)

    for n in range(frames):
        x0 = (n * (width - side) // (frames - 1)) & ~1
        out += b"FRAME\n" + plane(0, 1, x0) + plane(1, 2, x0) + plane(2, 2, x0)
    path.write_bytes(bytes(out))
    return path


@contextlib.asynccontextmanager
async def chromium(workdir: Path, *flags: str) -> AsyncIterator[Chromium]:
    async with Chromium.launch(workdir, extra_flags=flags) as browser:
        try:
            yield browser
        finally:
            lines = [line for page in browser.pages for line in page.console]
            (workdir / "console.txt").write_text("\n".join(lines))


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    """The customer's phone: Chromium's built-in fake camera (640x480)."""
    async with chromium(tmp_path / "chromium") as customer_browser:
        yield customer_browser


@pytest.fixture
async def agent_browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    """The agent's PC, another machine: its own Chromium with a different camera."""
    clip = write_agent_camera(tmp_path / "agent-camera.y4m")
    async with chromium(
        tmp_path / "chromium-agent", f"--use-file-for-fake-video-capture={clip}"
    ) as agent_chromium:
        yield agent_chromium


async def received(page: Page, action: str | None = None) -> list[dict[str, Any]]:
    """The messages the page got from the MS (of one action), oldest first."""
    msgs: list[dict[str, Any]] = await page.evaluate("window.appliance.events.map(e => e.msg)")
    return [m for m in msgs if action is None or m.get("action") == action]


async def wait_for_message(
    page: Page, predicate: Any, timeout: float, what: str
) -> dict[str, Any]:
    """The first message from the MS that satisfies predicate(msg), polled."""
    deadline = time.monotonic() + timeout
    while True:
        for msg in await received(page):
            if predicate(msg):
                return msg
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not received within {timeout}s; got "
                f"{[m.get('action') for m in await received(page)]}"
            )
        await asyncio.sleep(0.1)


def ids_of(msg: dict[str, Any]) -> tuple[int, int]:
    return msg["dialogid"], msg["ref"]


async def test_full_call_customer_phone_and_agent_video(
    tmp_path: Path, aps: Any, make_appliance: Any, browser: Chromium, agent_browser: Chromium
) -> None:
    sipp = await start_sipp(
        "desk/desk_answer_wait_bye.xml", tmp_path,
        "-rtp_echo", "-mp", str(free_udp_ports(4)), "-d", str(CALL_SECONDS * 1000),
        timeout="60s",
    )  # fmt: skip
    try:
        await _full_call(aps, make_appliance, browser, agent_browser, sipp)
    finally:
        sipp.kill()


async def _full_call(
    aps: Any, make_appliance: Any, browser: Chromium, agent_browser: Chromium, sipp: Any
) -> None:
    started = time.monotonic()
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address})
    base = f"https://127.0.0.1:{appliance.port}"

    # -- the customer calls; the desk phone answers ---------------------------------------
    customer = await browser.new_page(**PHONE)
    query = urlencode({"caller": 5678, "callee": 9333, "userdata": USERDATA, "autocall": 1})
    await customer.goto(f"{base}/VideoCall.html?{query}")
    await customer.wait_for("window.appliance.call && window.appliance.call.dtls", 15)
    c_call = await customer.evaluate(
        "(({dialogid, ref, channel}) => ({dialogid, ref, channel}))(window.appliance.call)"
    )
    c_ids = (c_call["dialogid"], c_call["ref"])
    join_audio = await wait_for_message(
        customer, lambda m: m.get("action") == "peerdata" and m.get("peerdata") == "Join",
        10, "customer: peerdata Join when the phone answers",
    )
    answered = time.monotonic()  # the phone sends BYE CALL_SECONDS after about now
    assert join_audio["medium"] == "audio" and join_audio["type"] == "indication", join_audio
    assert ids_of(join_audio) == c_ids and join_audio["channel"] == c_call["channel"]
    await customer.wait_for("window.appliance.state === 'incall'", 5)

    # -- the agent's page joins the room AP-S made for this call ---------------------------
    roomkey = sqlite3.connect(aps.db_path).execute(
        "SELECT roomkey FROM calls WHERE dialogid=? AND ref=?", c_ids
    ).fetchone()[0]
    agent = await agent_browser.new_page(**DESKTOP)
    await agent.goto(f"{base}/AgentVideo.html?roomkey={roomkey}")
    await agent.wait_for(
        "window.appliance.call && (window.appliance.call.dtls || window.appliance.call.ended)",
        15,
    )
    assert await agent.evaluate("window.appliance.call.release") is None
    await agent.wait_for("window.appliance.call.pc.connectionState === 'connected'", 5)
    a_call = await agent.evaluate(
        "(({dialogid, ref, channel}) => ({dialogid, ref, channel}))(window.appliance.call)"
    )
    a_ids = (a_call["dialogid"], a_call["ref"])
    assert a_call["channel"] >= 1 and a_call["channel"] != c_call["channel"], (a_call, c_call)
    joined = time.monotonic()

    join_video = await wait_for_message(
        customer,
        lambda m: m.get("action") == "peerdata" and m.get("peerdata") == "Join"
        and m.get("medium") == "video",
        5, "customer: peerdata Join (video) when the agent joins",
    )
    assert join_video["type"] == "indication" and ids_of(join_video) == c_ids, join_video
    assert join_video["channel"] == c_call["channel"], join_video
    assert join_video["peerchannel"] == a_call["channel"], join_video
    agent_join = await wait_for_message(
        agent, lambda m: m.get("action") == "peerdata" and m.get("peerdata") == "Join",
        5, "agent: peerdata Join",
    )
    assert ids_of(agent_join) == a_ids and agent_join["channel"] == a_call["channel"]
    assert agent_join["peerchannel"] == c_call["channel"], agent_join
    assert agent_join["medium"] == "video", agent_join  # the customer's medium (offer 2)

    # -- media: each page decodes the other's camera, the customer hears the phone --------
    await agent.wait_for("document.getElementById('remote').videoWidth > 0", 10)
    await customer.wait_for("document.getElementById('remote').videoWidth > 0", 10)
    c_first, a_first = await customer.evaluate(STATS_JS), await agent.evaluate(STATS_JS)
    await asyncio.sleep(2)
    c_then, a_then = await customer.evaluate(STATS_JS), await agent.evaluate(STATS_JS)
    print(f"customer getStats: {c_first} -> {c_then}")
    print(f"agent getStats: {a_first} -> {a_then}")
    for name, first, then in (("customer", c_first, c_then), ("agent", a_first, a_then)):
        assert first["inVideo"] and then["inVideo"], (name, then)
        assert then["inVideo"]["framesDecoded"] > first["inVideo"]["framesDecoded"], (
            name, first["inVideo"], then["inVideo"])
        # A stalled decoder would count few frames; 2 s of a 30 fps camera is ~60.
        assert then["inVideo"]["framesDecoded"] - first["inVideo"]["framesDecoded"] > 10, name
        assert then["inVideo"]["frameWidth"] > 0 and then["inVideo"]["frameHeight"] > 0, name
    # Each decodes the other's camera (the two differ in size), not its own.
    assert (c_then["outVideo"]["frameWidth"], c_then["outVideo"]["frameHeight"]) in (
        encoder_sizes(CUSTOMER_CAMERA))
    assert (a_then["outVideo"]["frameWidth"], a_then["outVideo"]["frameHeight"]) in (
        encoder_sizes(AGENT_CAMERA))
    assert (a_then["inVideo"]["frameWidth"], a_then["inVideo"]["frameHeight"]) == (
        c_then["outVideo"]["frameWidth"], c_then["outVideo"]["frameHeight"])
    assert (c_then["inVideo"]["frameWidth"], c_then["inVideo"]["frameHeight"]) == (
        a_then["outVideo"]["frameWidth"], a_then["outVideo"]["frameHeight"])
    # The desk phone echoes the customer's own (fake, beeping) microphone back to it.
    c_audio_first, c_audio = c_first["inAudio"], c_then["inAudio"]
    assert c_audio and c_audio["packetsReceived"] > c_audio_first["packetsReceived"], c_audio
    # 20 ms packets: ~100 in 2 s.
    assert c_audio["packetsReceived"] - c_audio_first["packetsReceived"] > 60, c_audio
    # Not silence: the fake microphone beeps every second, and so does its echo.
    if c_audio.get("totalAudioEnergy") is not None:
        assert c_audio["totalAudioEnergy"] > c_audio_first["totalAudioEnergy"], c_audio
    # The agent's page sends no audio (the agent talks on the desk phone).
    assert a_then["outAudio"] is None, a_then["outAudio"]

    # -- app data both ways (peerdata type "command") -------------------------------------
    sent = await customer.evaluate("window.appliance.sendPeerData('show-id', 'A123456789')")
    assert sent["type"] == "command" and (sent["dialogid"], sent["ref"]) == c_ids, sent
    got = await wait_for_message(
        agent, lambda m: m.get("action") == "peerdata" and m.get("type") == "command",
        5, "agent: the customer's peerdata command",
    )
    assert (got["peerdata"], got["value"]) == ("show-id", "A123456789"), got
    assert ids_of(got) == a_ids and got["channel"] == a_call["channel"], got
    assert got["peerchannel"] == c_call["channel"] and got["medium"] == "video", got
    sent = await agent.evaluate("window.appliance.sendPeerData('please-hold', '30')")
    assert (sent["dialogid"], sent["ref"]) == a_ids, sent
    got = await wait_for_message(
        customer, lambda m: m.get("action") == "peerdata" and m.get("type") == "command",
        5, "customer: the agent's peerdata command",
    )
    assert (got["peerdata"], got["value"]) == ("please-hold", "30"), got
    assert ids_of(got) == c_ids and got["channel"] == c_call["channel"], got
    assert got["peerchannel"] == a_call["channel"] and got["medium"] == "video", got
    # Both pages show the app data as a toast.
    assert "please-hold 30" in await customer.evaluate("document.body.innerText")
    assert "show-id A123456789" in await agent.evaluate("document.body.innerText")

    # -- quality every 5 s: both pages, non-zero figures -----------------------------------
    def full(msg: dict[str, Any] | None, *, audio: bool, video: bool) -> bool:
        if msg is None:
            return False
        ok = True
        if audio:
            ok = ok and msg["audio_bitrate"] > 0
        if video:
            ok = ok and msg["video_bitrate"] > 0 and msg["width"] > 0 and msg["height"] > 0
            ok = ok and msg["framerate"] > 0
        return ok

    async def latest(page: Page, action: str, since: float) -> dict[str, Any] | None:
        events = await page.evaluate(
            f"window.appliance.events.filter(e => e.action === {json.dumps(action)}"
            f" && e.at >= {since}).map(e => e.msg)"
        )
        return events[-1] if events else None

    # Reports that cover a period with the agent's video flowing both ways.
    since = await agent.evaluate("window.appliance.call.startedAt")
    deadline = time.monotonic() + 12
    while True:
        c_mine = await latest(customer, "my_resolution", since)
        c_peer = await latest(customer, "peer_resolution", since)
        a_mine = await latest(agent, "my_resolution", since)
        a_peer = await latest(agent, "peer_resolution", since)
        # The customer sends voice and video; the agent side is the desk phone's voice (the
        # echo) and the agent's camera; the agent's peer is the customer.
        if (full(c_mine, audio=True, video=True) and full(c_peer, audio=True, video=True)
                and full(a_mine, audio=True, video=True)
                and full(a_peer, audio=True, video=True)):
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                "quality figures still zero or missing 12 s after the agent joined:\n"
                f"customer my_resolution {c_mine}\ncustomer peer_resolution {c_peer}\n"
                f"agent my_resolution {a_mine}\nagent peer_resolution {a_peer}"
            )
        await asyncio.sleep(0.25)
    answer_sdp = (await received(customer, "answer"))[0]["answer"]["sdp"]
    print("customer answer video feedback:", [
        line for line in answer_sdp.split("\r\n") if line.startswith(("a=rtcp-fb", "a=extmap"))])
    print(f"customer my_resolution {c_mine}\ncustomer peer_resolution {c_peer}")
    print(f"agent my_resolution {a_mine}\nagent peer_resolution {a_peer}")
    assert c_mine is not None and c_peer is not None and a_mine is not None
    assert a_peer is not None
    for msg in (c_mine, c_peer):
        assert ids_of(msg) == c_ids, msg
    for msg in (a_mine, a_peer):
        assert ids_of(msg) == a_ids, msg
    assert c_mine["channel"] == c_call["channel"] and c_peer["channel"] == a_call["channel"]
    assert a_mine["channel"] == a_call["channel"] and a_peer["channel"] == c_call["channel"]
    # The customer's figures are the same streams whichever page they are reported to.
    assert (c_mine["width"], c_mine["height"]) == (a_peer["width"], a_peer["height"])
    assert (a_mine["width"], a_mine["height"]) == (c_peer["width"], c_peer["height"])
    # The sizes are the cameras' as the encoders send them. Chromium's encoder may start
    # below the camera's size and step up as its bandwidth estimate grows (3/4, 1/2 ...), so
    # a report is right when it is the size the encoder sent at some point of the call.
    c_out = (await customer.evaluate(STATS_JS))["outVideo"]
    a_out = (await agent.evaluate(STATS_JS))["outVideo"]
    print("encoders send:", c_out, a_out)
    assert (c_mine["width"], c_mine["height"]) in encoder_sizes(CUSTOMER_CAMERA), c_mine
    assert (a_mine["width"], a_mine["height"]) in encoder_sizes(AGENT_CAMERA), a_mine
    assert (c_out["frameWidth"], c_out["frameHeight"]) in encoder_sizes(CUSTOMER_CAMERA), c_out
    assert (a_out["frameWidth"], a_out["frameHeight"]) in encoder_sizes(AGENT_CAMERA), a_out
    # PCMU at 50 packets/s is 64 kbit/s of payload, ~85 with headers.
    for msg in (c_mine, c_peer, a_mine, a_peer):
        assert 40 <= msg["audio_bitrate"] <= 200, msg
    # Both pages render them.
    assert f"{c_mine['width']}×{c_mine['height']}" in await customer.evaluate(
        "document.getElementById('q-mine').textContent")
    assert f"{a_peer['width']}×{a_peer['height']}" in await agent.evaluate(
        "document.getElementById('q-peer').textContent")

    # -- screenshots mid-call ---------------------------------------------------------------
    await customer.screenshot(ARTIFACTS / "full-call-customer.png")
    await agent.screenshot(ARTIFACTS / "full-call-agent.png")
    checked = time.monotonic()
    print(f"timing: customer answered {answered - started:.1f}s, agent joined "
          f"{joined - started:.1f}s, checks done {checked - started:.1f}s")
    assert checked - answered < CALL_SECONDS - 1, "the checks ran into the phone's BYE"
    for page in (customer, agent):
        assert not await page.evaluate("window.appliance.call.ended"), await received(page)

    # -- the agent hangs up the desk phone: BYE ends both pages ---------------------------
    wait = CALL_SECONDS - (time.monotonic() - answered) + 8
    c_release = await wait_for_message(
        customer, lambda m: m.get("action") == "release", wait, "customer: release")
    a_release = await wait_for_message(
        agent, lambda m: m.get("action") == "release", 3, "agent: release")
    byed = time.monotonic()
    for release, ids, call in ((c_release, c_ids, c_call), (a_release, a_ids, a_call)):
        assert (release["cause"], release["causestring"]) == (16, "normal release"), release
        assert ids_of(release) == ids and release["channel"] == call["channel"], release
    # Leave before release: the customer's is the phone (audio), the agent's the customer.
    c_actions = [(m["action"], m.get("peerdata"), m.get("medium")) for m in await received(
        customer)]
    assert ("peerdata", "Leave", "audio") in c_actions, c_actions
    assert c_actions.index(("peerdata", "Leave", "audio")) < c_actions.index(
        ("release", None, None)), c_actions
    a_actions = [(m["action"], m.get("peerdata"), m.get("medium")) for m in await received(
        agent)]
    assert ("peerdata", "Leave", "video") in a_actions, a_actions
    assert a_actions.index(("peerdata", "Leave", "video")) < a_actions.index(
        ("release", None, None)), a_actions
    # The release came at the phone's BYE, not earlier.
    assert byed - answered > CALL_SECONDS - 2, byed - answered
    for page in (customer, agent):
        await page.wait_for("window.appliance.state === 'ended'", 3)
        assert await page.evaluate("window.appliance.call.pc.connectionState") == "closed"
        assert await page.evaluate("window.appliance.call.release.cause") == 16
        # Nothing after release, and nothing sent by the pages (the phone hung up).
        assert (await received(page))[-1]["action"] == "release"
        assert "release" not in await page.evaluate("window.appliance.sent.map(s => s.action)")
    # Every 5 s (PROTOCOL.md Flow 2), to each party while connected.
    for page, least in ((customer, 3), (agent, 2)):
        for action in ("my_resolution", "peer_resolution"):
            times = await page.evaluate(
                f"window.appliance.events.filter(e => e.action === '{action}').map(e => e.at)")
            gaps = [(b - a) / 1000 for a, b in itertools.pairwise(times)]
            assert len(times) >= least and all(4.5 < gap < 5.5 for gap in gaps), (action, gaps)
    assert "normal release (cause 16)" in await customer.evaluate(
        "document.getElementById('state').textContent")

    code = await sipp.exit_code(10)
    assert code == 0, sipp.diagnostics()
    # The phone's BYE, as sipp sent it, got its 200 OK.
    blocks = sipp.messages.split("\n-------")
    assert any("message sent" in b and "\nBYE sip:" in b for b in blocks), sipp.messages
    assert any("message received" in b and "SIP/2.0 200 OK" in b and "CSeq: 1 BYE" in b
               for b in blocks), sipp.messages
    for channel in (c_call["channel"], a_call["channel"]):
        assert appliance.count_in_log(
            rf"channel {channel}: released, cause 16 normal release") == 1, appliance.log()
    print(f"timing: BYE at {byed - started:.1f}s, total {time.monotonic() - started:.1f}s")
