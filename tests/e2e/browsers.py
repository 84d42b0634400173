"""The browsers the page tests run in, behind one small API.

`launch("chromium" | "firefox", workdir)` yields a browser whose `new_page()` gives a Page
with `goto`, `evaluate`, `wait_for`, `click`, `screenshot`, `close` and `console`: Chromium
is driven over CDP (tests/e2e/chromium.py), Firefox ESR over WebDriver BiDi
(tests/e2e/firefox.py). Both come from Debian packages; nothing is downloaded.

    async with launch("firefox", tmp_path / "firefox") as browser:
        page = await browser.new_page(width=390, height=844, mobile=True)
        await page.goto("https://127.0.0.1:4433/VideoCall.html?caller=1&callee=2")
        await page.wait_for("window.appliance.state === 'connected'")
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import shutil
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

BROWSERS = ("chromium", "firefox")
EXECUTABLES = {
    "chromium": os.environ.get("CHROMIUM", "/usr/bin/chromium"),
    "firefox": os.environ.get("FIREFOX", "/usr/bin/firefox-esr"),
}


def available(name: str) -> bool:
    return shutil.which(EXECUTABLES[name]) is not None


class PageBase(abc.ABC):
    """What every page does on top of its browser's `evaluate` (each browser's Page
    implements that one method over its own protocol: CDP or WebDriver BiDi)."""

    console: list[str]

    @abc.abstractmethod
    async def evaluate(self, expression: str, timeout: float = 15) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""

    async def wait_for(self, expression: str, timeout: float = 10, interval: float = 0.1) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expression!r} still {value!r} after {timeout}s; console:\n"
                    + "\n".join(self.console[-30:])
                )
            await asyncio.sleep(interval)

    async def click(self, selector: str) -> None:
        """Click the element matching a CSS selector (a DOM click, as a tap would do)."""
        found = await self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el) return false; el.click(); return true; })()"
        )
        if not found:
            raise RuntimeError(f"no element matches {selector!r}")


class Page(Protocol):
    console: list[str]

    async def goto(self, url: str, timeout: float = 15) -> None: ...
    async def evaluate(self, expression: str, timeout: float = 15) -> Any: ...
    async def wait_for(
        self, expression: str, timeout: float = 10, interval: float = 0.1
    ) -> Any: ...
    async def click(self, selector: str) -> None: ...
    async def screenshot(self, path: Path) -> Path: ...
    async def close(self) -> None: ...


# The silent microphone in Firefox, which has no "play this file as the microphone" switch:
# every getUserMedia stream gets, instead of the fake tone, a track of WebAudio silence.
SILENT_MIC_JS = """() => {
  const md = navigator.mediaDevices;
  if (!md || !md.getUserMedia) return;
  const original = md.getUserMedia.bind(md);
  md.getUserMedia = async (constraints) => {
    const stream = await original(constraints);
    if (!constraints || !constraints.audio) return stream;
    for (const t of stream.getAudioTracks()) { stream.removeTrack(t); t.stop(); }
    const ctx = new AudioContext();
    const silence = ctx.createMediaStreamDestination().stream.getAudioTracks()[0];
    stream.addTrack(silence);
    return stream;
  };
}"""


def silent_wav(path: Path, seconds: int = 30) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(b"\x00\x00" * 48000 * seconds)
    return path


@contextlib.asynccontextmanager
async def launch(
    name: str, workdir: Path, *, silent_microphone: bool = False
) -> AsyncIterator[Any]:
    """One headless browser, its profile and logs under workdir; the pages' console lines go
    to workdir/console.txt at the end (kept for a failed run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "chromium":
        from tests.e2e.chromium import Chromium

        flags: tuple[str, ...] = ()
        if silent_microphone:
            mic = silent_wav(workdir / "silence.wav")
            flags = (f"--use-file-for-fake-audio-capture={mic}",)
        manager: Any = Chromium.launch(workdir, extra_flags=flags)
    elif name == "firefox":
        from tests.e2e.firefox import Firefox

        manager = Firefox.launch(workdir, preload=(SILENT_MIC_JS,) if silent_microphone else ())
    else:
        raise ValueError(f"unknown browser {name!r}")
    async with manager as browser:
        browser.name = name
        try:
            yield browser
        finally:
            lines = [line for page in browser.pages for line in page.console]
            (workdir / "console.txt").write_text("\n".join(lines))
