"""Headless Chromium for end-to-end tests, driven over the DevTools protocol (CDP).

Plain CDP over one WebSocket (aiohttp), no Puppeteer or Playwright and no browser download:
the Debian `chromium` package is enough. Chromium gets a fake camera and microphone, grants
getUserMedia without asking (which also makes it show real host addresses instead of mDNS
`.local` names in ICE candidates), and accepts the appliance's self-signed certificate.

    async with Chromium.launch(tmp_path / "chromium") as browser:
        page = await browser.new_page(width=390, height=844, mobile=True)
        await page.goto("https://127.0.0.1:4433/VideoCall.html?caller=1&callee=2")
        await page.wait_for("window.appliance && window.appliance.state === 'connected'")
        stats = await page.evaluate("window.appliance.call.pc.getStats().then(...)")
        await page.screenshot(artifacts / "videocall.png")

Everything Chromium prints (with `--enable-logging=stderr`) goes to `chromium.log` in the
work directory, and the pages' console lines are kept in `page.console`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.browsers import EXECUTABLES, PageBase

CHROMIUM = EXECUTABLES["chromium"]

# Why each flag: no sandbox (tests run as root in a namespace), nothing that phones home
# (the namespace has only loopback anyway), fake media devices and permission prompts,
# loopback ICE candidates (off by default in Chromium), our self-signed certificate, and
# media that may start playing without a user gesture.
BASE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--password-store=basic",
    "--use-mock-keychain",
    "--remote-debugging-port=0",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--ignore-certificate-errors",
    "--autoplay-policy=no-user-gesture-required",
    # Host candidates must be real addresses: the appliance does not resolve mDNS names
    # (multicast would leave 127/8). getUserMedia being granted already turns mDNS off;
    # this makes it independent of that.
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints,Translate",
    "--enable-logging=stderr",
    "--v=0",
)


class CdpError(RuntimeError):
    """A CDP command failed, or the page threw."""


class Chromium:
    """One headless Chromium process and its browser-level CDP connection."""

    def __init__(self, process: subprocess.Popen[bytes], workdir: Path) -> None:
        self.process = process
        self.workdir = workdir
        self.log_path = workdir / "chromium.log"
        self.name = "chromium"
        self.pages: list[Page] = []
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._by_session: dict[str, Page] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, workdir: Path, *, extra_flags: tuple[str, ...] = (), timeout: float = 20
    ) -> AsyncIterator[Chromium]:
        """Start Chromium with its profile and log under workdir; always kill it at the end."""
        workdir.mkdir(parents=True, exist_ok=True)
        profile = workdir / "profile"
        profile.mkdir(exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a reused profile keeps the last run's port
        log = open(workdir / "chromium.log", "ab")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [CHROMIUM, *BASE_FLAGS, f"--user-data-dir={profile}", *extra_flags, "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own process group, so the renderer and GPU helpers go with it.
            start_new_session=True,
        )
        browser = cls(process, workdir)
        try:
            await browser._connect(port_file, timeout)
            yield browser
        finally:
            await browser._shutdown()
            log.close()

    async def _connect(self, port_file: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise CdpError(f"chromium exited with {self.process.returncode}: {self.log()}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                lines = port_file.read_text().splitlines()
                if len(lines) >= 2:
                    port, path = int(lines[0]), lines[1]
                    break
            if time.monotonic() > deadline:
                raise CdpError(f"no DevToolsActivePort after {timeout}s: {self.log()}")
            await asyncio.sleep(0.05)
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            f"ws://127.0.0.1:{port}{path}", max_msg_size=0, autoping=True
        )
        self._reader = asyncio.create_task(self._read())

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            if self._ws is not None and not self._ws.closed:
                await asyncio.wait_for(self.send("Browser.close"), 2)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._session is not None:
            await self._session.close()
        await self._wait_exit(3)
        # The group we created at launch: the browser and whatever helpers it left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await self._wait_exit(5)

    async def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    # -- CDP plumbing ---------------------------------------------------------------------

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *,
        session_id: str | None = None, timeout: float = 30,
    ) -> dict[str, Any]:
        assert self._ws is not None
        msg_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        try:
            await self._ws.send_str(json.dumps(message))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(msg_id, None)

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    future = self._pending.get(data["id"])
                    if future is None or future.done():
                        continue
                    if "error" in data:
                        future.set_exception(CdpError(f"{data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                elif "sessionId" in data:
                    page = self._by_session.get(data["sessionId"])
                    if page is not None:
                        page._on_event(data["method"], data.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CdpError(f"CDP connection lost: {self.log()}"))

    # -- pages ----------------------------------------------------------------------------

    async def new_page(
        self, *, width: int = 1280, height: int = 800, mobile: bool = False,
        scale: float = 1.0,
    ) -> Page:
        """A new tab with the given viewport (mobile=True: a phone's touch viewport)."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, target["targetId"], attached["sessionId"])
        self._by_session[page.session_id] = page
        self.pages.append(page)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
        )
        if mobile:
            await page.send("Emulation.setTouchEmulationEnabled", {"enabled": True})
        return page


class Page(PageBase):
    """One tab: navigate, evaluate JavaScript, screenshot, close."""

    def __init__(self, browser: Chromium, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id
        self.console: list[str] = []
        self._load = asyncio.Event()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        return await self.browser.send(
            method, params, session_id=self.session_id, timeout=timeout
        )

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._load.set()
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params["args"]
            )
            self.console.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"exception: {text}")

    async def goto(self, url: str, timeout: float = 15) -> None:
        """Navigate and wait for the load event."""
        self._load.clear()
        result = await self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        await asyncio.wait_for(self._load.wait(), timeout)

    async def evaluate(self, expression: str, timeout: float = 15) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON-able Python."""
        result = await self.send(
            "Runtime.evaluate",
            {
                "expression": expression,
                "awaitPromise": True,
                "returnByValue": True,
                "userGesture": True,
            },
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"{expression[:80]!r} threw: {text}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        """Save the viewport as a PNG."""
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        """Close the tab, as the user closing it would (the page's pagehide runs)."""
        await self.browser.send("Target.closeTarget", {"targetId": self.target_id})
        self.browser._by_session.pop(self.session_id, None)
