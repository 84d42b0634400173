"""A system message reaches the customer's real page and is shown, in Chromium and in
Firefox ESR: the browser's microphone is silent (Chromium plays a silent file as its fake
microphone, Firefox gets a WebAudio silence track), the appliance hears no voice and sends
510."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.e2e.browsers import launch
from tests.e2e.test_pages import PHONE, artifact, browser_params
from tests.e2e.test_voice import desk_phone

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


@pytest.mark.parametrize("browser_name", browser_params())
async def test_page_shows_the_silent_microphone_message(
    tmp_path: Path, aps: Any, make_appliance: Any, browser_name: str
) -> None:
    sipp = await desk_phone(tmp_path, "desk_echo.xml")
    appliance = make_appliance(
        aps.url, sip={"proxy": sipp.address},
        conditions={"silent_mic_s": 3.0},
        # English: this machine has no CJK font, and the screenshot should be readable
        # (the zh-TW texts are checked byte for byte in tests/unit/test_conditions.py).
        messages={"language": "en", "level": "warning", "position": "top",
                  "displaytime": 30},
    )
    try:
        async with launch(
            browser_name, tmp_path / browser_name, silent_microphone=True
        ) as browser:
            page = await browser.new_page(**PHONE)
            query = urlencode({"caller": 5678, "callee": 9333,
                               "userdata": json.dumps({"id": "A123456789"}), "autocall": 1})
            await page.goto(f"https://127.0.0.1:{appliance.port}/VideoCall.html?{query}")
            await page.wait_for(
                "window.appliance.events.some(e => e.action === 'message')", timeout=20)
            shown = await page.evaluate(
                "[...document.querySelectorAll('.toasts[data-position=top] .toast')]"
                ".map(t => [t.textContent, t.className])")
            assert any(text.startswith("510 No sound is reaching us") and "level-warning" in cls
                       for text, cls in shown), shown
            await page.screenshot(artifact("videocall-message-510.png", browser))
            await page.click("#hangup")
    finally:
        sipp.kill()
