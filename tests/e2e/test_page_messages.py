"""A system message reaches the customer's real page and is shown: Chromium's fake
microphone plays a silent file, the appliance hears no voice and sends 510."""

from __future__ import annotations

import json
import wave
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.e2e.chromium import Chromium
from tests.e2e.test_pages import PHONE, artifact
from tests.e2e.test_voice import desk_phone

pytestmark = pytest.mark.e2e


def silent_wav(path: Path, seconds: int = 30) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(b"\x00\x00" * 48000 * seconds)
    return path


async def test_page_shows_the_silent_microphone_message(
    tmp_path: Path, aps: Any, make_appliance: Any
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
    mic = silent_wav(tmp_path / "silence.wav")
    try:
        async with Chromium.launch(
            tmp_path / "chromium", extra_flags=(f"--use-file-for-fake-audio-capture={mic}",)
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
            await page.screenshot(artifact("videocall-message-510.png"))
            await page.click("#hangup")
    finally:
        sipp.kill()
