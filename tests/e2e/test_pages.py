"""The real pages (VideoCall.html, AgentVideo.html) in headless Chromium against the real
appliance and the reference AP-S: what a customer's phone and an agent's PC actually run."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.e2e.chromium import Chromium, Page
from tests.e2e.conftest import ROOT, eventually, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed"),
]

ARTIFACTS = ROOT / "tests" / "artifacts"
USERDATA = json.dumps({"id": "A123456789"})
PHONE = {"width": 390, "height": 844, "mobile": True}  # a common phone viewport
DESKTOP = {"width": 1280, "height": 800}


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    async with Chromium.launch(tmp_path / "chromium") as chromium:
        try:
            yield chromium
        finally:
            # Kept next to chromium.log for a failed run.
            lines = [line for page in chromium.pages for line in page.console]
            (tmp_path / "chromium" / "console.txt").write_text("\n".join(lines))


def artifact(name: str) -> Path:
    return ARTIFACTS / name


async def events(page: Page) -> list[dict[str, Any]]:
    return await page.evaluate("window.appliance.events.map(e => e.msg)")


async def test_videocall_page_reaches_dtls_and_hangs_up(
    aps: Any, make_appliance: Any, browser: Chromium
) -> None:
    appliance = make_appliance(aps.url)
    base = f"https://127.0.0.1:{appliance.port}"
    page = await browser.new_page(**PHONE)

    # A plain GET / lands on the customer's page.
    await page.goto(f"{base}/")
    assert await page.evaluate("location.pathname") == "/VideoCall.html"

    query = urlencode({"caller": 5678, "callee": 9333, "userdata": USERDATA})
    await page.goto(f"{base}/VideoCall.html?{query}")
    await page.wait_for("window.appliance && window.appliance.state === 'idle'")
    await page.click("#call")
    await page.wait_for("window.appliance.call && window.appliance.call.dtls", timeout=15)
    await page.wait_for("window.appliance.call.pc.connectionState === 'connected'", timeout=5)

    call = await page.evaluate(
        "(({dialogid, ref, channel}) => ({dialogid, ref, channel}))(window.appliance.call)"
    )
    received = await events(page)
    actions = [m["action"] for m in received]
    assert actions[:2] == ["alert", "answer"], actions
    assert "ice" in actions and actions[-1] == "DTLSconnect", actions
    assert actions.index("DTLSconnect") > max(i for i, a in enumerate(actions) if a == "ice")
    for msg in received:
        assert (msg["dialogid"], msg["ref"]) == (call["dialogid"], call["ref"]), msg
        assert msg["channel"] == call["channel"] >= 1, msg
    assert next(m for m in received if m["action"] == "DTLSconnect")["medium"] == "video"

    offer = (await page.evaluate("window.appliance.sent"))[0]["msg"]
    assert offer["action"] == "offer" and offer["module"] == "User" and offer["medium"] == 2
    assert (offer["caller"], offer["callee"], offer["userdata"]) == (5678, 9333, USERDATA)
    assert offer["ua_family"] == "Chrome" and offer["ua_version"].isdigit()
    assert ".local" not in offer["offer"]["sdp"]  # real host candidates, no mDNS names
    assert " 127.0.0.1 " in offer["offer"]["sdp"]

    # Media flows from the browser over the selected pair.
    stats = await page.evaluate(
        """window.appliance.call.pc.getStats().then(r => {
             const all = [...r.values()];
             const pair = all.find(s => s.type === 'candidate-pair' && s.nominated
                                        && s.state === 'succeeded');
             const audio = all.find(s => s.type === 'outbound-rtp' && s.kind === 'audio');
             const codec = audio && r.get(audio.codecId);
             return {pair: !!pair, bytesSent: pair ? pair.bytesSent : 0,
                     audioCodec: codec ? codec.mimeType : null};
           })"""
    )
    assert stats["pair"] and stats["bytesSent"] > 0, stats
    print(f"Chromium sends audio as {stats['audioCodec']}")
    assert await page.evaluate("document.getElementById('state').textContent") != "Ready"

    # System messages and quality figures render as the protocol says (level, position,
    # displaytime). The MS does not send them yet on this leg, so they are fed in here.
    ids = {"dialogid": call["dialogid"], "ref": call["ref"], "channel": call["channel"]}
    for msg in (
        {"action": "message", **ids, "level": "warning", "position": "top", "displaytime": 2,
         "message": "503 We detected your video is congested; your video is paused for now."},
        {"action": "message", **ids, "level": "info", "position": "bottom", "displaytime": 30,
         "message": "Recording has started"},
        {"action": "my_resolution", **ids, "width": 640, "height": 480, "REMB": 500,
         "framerate": 30, "audio_bitrate": 64, "video_bitrate": 480, "jitter": 3,
         "packetloss": 0},
        {"action": "peer_resolution", **ids, "width": 1280, "height": 720, "REMB": 1200,
         "framerate": 30, "audio_bitrate": 64, "video_bitrate": 1100, "jitter": 2,
         "packetloss": 1},
    ):
        await page.evaluate(f"window.appliance._receive({json.dumps(json.dumps(msg))})")
    assert await page.evaluate(
        "document.querySelector('.toasts[data-position=top] .toast.level-warning') !== null"
    )
    assert "640×480" in await page.evaluate("document.getElementById('q-mine').textContent")
    await page.wait_for("document.getElementById('local').videoWidth > 0", timeout=5)
    await page.screenshot(artifact("videocall-connected.png"))
    await page.wait_for(
        "document.querySelector('.toasts[data-position=top] .toast') === null", timeout=4
    )
    assert await page.evaluate("document.querySelectorAll('.toasts .toast').length") == 1

    # The keypad sends DTMF with the call's ids.
    await page.click("#keypad-toggle")
    await page.click("#keypad button[data-key='5']")
    sent = await page.evaluate("window.appliance.sent.map(s => s.msg)")
    dtmf = sent[-1]
    assert dtmf == {"action": "DTMF", **ids, "value": "5"}
    await page.screenshot(artifact("videocall-keypad.png"))

    # Hang-up sends release with the same dialogid/ref, and the appliance frees the channel.
    await page.click("#hangup")
    sent = await page.evaluate("window.appliance.sent.map(s => s.msg)")
    release = sent[-1]
    assert release == {"action": "release", **ids, "cause": 16, "causestring": "normal release"}
    await eventually(
        lambda: appliance.count_in_log(
            rf"channel {call['channel']}: released, cause 16 normal release"
        ) == 1,
        timeout=5,
    )
    assert await page.evaluate("window.appliance.state") == "ended"
    assert await page.evaluate("window.appliance.call.pc.connectionState") == "closed"


async def test_agent_page_with_unknown_roomkey_shows_invalid_roomkey(
    aps: Any, make_appliance: Any, browser: Chromium
) -> None:
    appliance = make_appliance(aps.url)
    page = await browser.new_page(**DESKTOP)
    await page.goto(f"https://127.0.0.1:{appliance.port}/AgentVideo.html?roomkey=1")
    await page.wait_for("window.appliance && window.appliance.state === 'ended'", timeout=10)

    offer = (await page.evaluate("window.appliance.sent"))[0]["msg"]
    assert (offer["module"], offer["roomkey"], offer["medium"]) == ("Agent", 1, 2)
    release = (await events(page))[-1]
    assert release["action"] == "release"
    assert (release["dialogid"], release["ref"]) == (offer["dialogid"], offer["ref"])
    assert release["causestring"] == "invalid roomkey"
    shown = await page.evaluate("document.body.innerText")
    assert "invalid roomkey" in shown
    await page.screenshot(artifact("agentvideo-invalid-roomkey.png"))


async def test_videocall_page_without_parameters_asks_for_them(
    aps: Any, make_appliance: Any, browser: Chromium
) -> None:
    appliance = make_appliance(aps.url)
    page = await browser.new_page(**PHONE)
    await page.goto(f"https://127.0.0.1:{appliance.port}/VideoCall.html")
    assert await page.evaluate("!document.getElementById('setup').hidden")
    await page.screenshot(artifact("videocall-form.png"))
    # Filling the form places the call like the query string does.
    await page.evaluate(
        """(() => { const f = document.getElementById('setup');
                    f.elements.caller.value = '5678'; f.elements.callee.value = '9333';
                    f.elements.userdata.value = '{"id":"B2"}'; f.requestSubmit(); })()"""
    )
    await page.wait_for("window.appliance.call && window.appliance.call.dtls", timeout=15)
    offer = (await page.evaluate("window.appliance.sent"))[0]["msg"]
    assert (offer["caller"], offer["callee"], offer["userdata"]) == (5678, 9333, '{"id":"B2"}')


async def test_agent_page_and_customer_page_exchange_video(
    aps: Any, make_appliance: Any, browser: Chromium
) -> None:
    """Flow 1 step 9 with both real pages: the agent's page joins the customer's room.

    The "PBX" is a UDP socket
    that swallows the INVITE, so the customer's call waits in INVITING instead of failing.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent_pbx:
        silent_pbx.bind(("127.0.0.1", 0))
        pbx_port = silent_pbx.getsockname()[1]
        appliance = make_appliance(
            aps.url, sip={"proxy": f"127.0.0.1:{pbx_port}", "base_port": free_port(
                socket.SOCK_DGRAM)}
        )
        base = f"https://127.0.0.1:{appliance.port}"
        customer = await browser.new_page(**PHONE)
        query = urlencode(
            {"caller": 5678, "callee": 9333, "userdata": USERDATA, "autocall": 1}
        )
        await customer.goto(f"{base}/VideoCall.html?{query}")
        await customer.wait_for("window.appliance.call && window.appliance.call.dtls", 15)
        ids = await customer.evaluate(
            "[window.appliance.call.dialogid, window.appliance.call.ref]"
        )
        roomkey = sqlite3.connect(aps.db_path).execute(
            "SELECT roomkey FROM calls WHERE dialogid=? AND ref=?", ids
        ).fetchone()[0]

        agent = await browser.new_page(**DESKTOP)
        await agent.goto(f"{base}/AgentVideo.html?roomkey={roomkey}")
        await agent.wait_for(
            "window.appliance.call && (window.appliance.call.dtls || window.appliance.call.ended)",
            timeout=15,
        )
        release = await agent.evaluate("window.appliance.call.release")
        assert release is None, release

        offer = (await agent.evaluate("window.appliance.sent"))[0]["msg"]
        assert (offer["module"], offer["roomkey"], offer["medium"]) == ("Agent", roomkey, 2)
        received = await events(agent)
        actions = [m["action"] for m in received]
        assert actions[:2] == ["alert", "answer"] and "DTLSconnect" in actions, actions
        for msg in received:
            assert (msg["dialogid"], msg["ref"]) == (offer["dialogid"], offer["ref"]), msg
        await agent.wait_for("window.appliance.call.pc.connectionState === 'connected'", 5)
        # Video is relayed both ways: each page's large video shows the other's camera.
        await agent.wait_for("document.getElementById('remote').videoWidth > 0", 10)
        await customer.wait_for("document.getElementById('remote').videoWidth > 0", 10)
        await agent.screenshot(artifact("agentvideo-with-customer.png"))
        await customer.screenshot(artifact("videocall-with-agent.png"))

        await agent.click("#hangup")
        sent = await agent.evaluate("window.appliance.sent.map(s => s.msg)")
        assert sent[-1]["action"] == "release"
        assert (sent[-1]["dialogid"], sent[-1]["ref"]) == (offer["dialogid"], offer["ref"])
