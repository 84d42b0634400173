"""Headless Firefox ESR for end-to-end tests, driven over WebDriver BiDi.

Firefox has BiDi built in (`--remote-debugging-port`), so one WebSocket (aiohttp) is all it
takes: no geckodriver, Selenium or Playwright and no download, the Debian `firefox-esr`
package is enough. A fresh profile gets fake camera and microphone, getUserMedia without a
prompt, loopback ICE candidates with real addresses (no mDNS names), media that may play
without a gesture, and every network service off (the namespace has only loopback anyway:
this keeps the logs quiet). The BiDi session accepts the appliance's self-signed certificate.

    async with Firefox.launch(tmp_path / "firefox") as browser:
        page = await browser.new_page(width=390, height=844)
        await page.goto("https://127.0.0.1:4433/VideoCall.html?caller=1&callee=2")
        await page.wait_for("window.appliance.state === 'connected'")

Firefox's output goes to `firefox.log` in the work directory; the pages' console lines and
uncaught errors are kept in `page.console`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.browsers import EXECUTABLES, PageBase

PREFS: dict[str, bool | int | str] = {
    # Media: fake devices, no prompt, host candidates on loopback with their real address.
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    # A test opens the customer's and the agent's page as two tabs of one browser; on two
    # real machines each is in the foreground, so neither may be paused as a background tab.
    "media.block-autoplay-until-in-foreground": False,
    "media.suspend-bkgnd-video.enabled": False,
    # Nothing that phones home.
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.trr.mode": 5,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "app.update.enabled": False,
    "app.update.auto": False,
    "app.normandy.enabled": False,
    "app.shield.optoutstudies.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "browser.ping-centre.telemetry": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.downloads.remote.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.archive.enabled": False,
    "toolkit.telemetry.server": "",
    "extensions.update.enabled": False,
    "extensions.update.autoUpdateDefault": False,
    "extensions.systemAddon.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.blocklist.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.newtabpage.activity-stream.feeds.section.topstories": False,
    "browser.startup.page": 0,
    "browser.startup.homepage": "about:blank",
    "browser.shell.checkDefaultBrowser": False,
    "browser.aboutwelcome.enabled": False,
    "browser.region.update.enabled": False,
    "browser.search.update": False,
    "services.settings.server": "",
    "geo.provider.network.url": "",
    "dom.push.enabled": False,
    # No "are you sure?" on closing a tab that runs a call.
    "dom.disable_beforeunload": True,
}

LISTENING = re.compile(rb"WebDriver BiDi listening on (ws://\S+)")


class BidiError(RuntimeError):
    """A BiDi command failed, or the page threw."""


def user_js(prefs: dict[str, bool | int | str]) -> str:
    return "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())


class Firefox:
    """One headless Firefox process and its BiDi session."""

    def __init__(self, process: subprocess.Popen[bytes], workdir: Path) -> None:
        self.process = process
        self.workdir = workdir
        self.log_path = workdir / "firefox.log"
        self.name = "firefox"
        self.pages: list[FirefoxPage] = []
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._by_context: dict[str, FirefoxPage] = {}
        self._preload: tuple[str, ...] = ()

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, workdir: Path, *, preload: Iterable[str] = (), timeout: float = 30
    ) -> AsyncIterator[Firefox]:
        """Start Firefox with a fresh profile under workdir; always kill it at the end.

        preload: JavaScript functions run in every page before its own scripts."""
        workdir.mkdir(parents=True, exist_ok=True)
        profile, home = workdir / "profile", workdir / "home"
        profile.mkdir(exist_ok=True)
        home.mkdir(exist_ok=True)
        (profile / "user.js").write_text(user_js(PREFS))
        log = open(workdir / "firefox.log", "ab")  # noqa: SIM115 - closed below
        # As root (the tests run so in their namespace) Firefox wants a HOME of its own.
        env = {**os.environ, "HOME": str(home), "MOZ_HEADLESS": "1",
               "MOZ_CRASHREPORTER_DISABLE": "1"}
        process = subprocess.Popen(
            [EXECUTABLES["firefox"], "--headless", "--no-remote", "-profile", str(profile),
             "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True,  # its own group, so content processes go with it
        )
        browser = cls(process, workdir)
        browser._preload = tuple(preload)
        try:
            await browser._connect(timeout)
            yield browser
        finally:
            await browser._shutdown()
            log.close()

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BidiError(f"firefox exited with {self.process.returncode}: {self.log()}")
            found = LISTENING.search(self.log_path.read_bytes())
            if found:
                url = found.group(1).decode()
                break
            if time.monotonic() > deadline:
                raise BidiError(f"no BiDi port after {timeout}s: {self.log()}")
            await asyncio.sleep(0.05)
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(f"{url}/session", max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("session.new", {"capabilities": {"alwaysMatch": {
            "acceptInsecureCerts": True, "unhandledPromptBehavior": {"default": "accept"},
        }}})
        await self.send("session.subscribe", {"events": ["log.entryAdded"]})
        for script in self._preload:
            await self.send("script.addPreloadScript", {"functionDeclaration": script})

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            if self._ws is not None and not self._ws.closed:
                await asyncio.wait_for(self.send("browser.close"), 3)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._session is not None:
            await self._session.close()
        await self._wait_exit(2)  # it closes its windows at once, then dawdles on exit
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

    # -- BiDi plumbing --------------------------------------------------------------------

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30
    ) -> dict[str, Any]:
        assert self._ws is not None
        msg_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self._ws.send_str(
                json.dumps({"id": msg_id, "method": method, "params": params or {}}))
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
                if data.get("type") == "event":
                    self._on_event(data["method"], data.get("params", {}))
                    continue
                future = self._pending.get(data.get("id", -1))
                if future is None or future.done():
                    continue
                if data.get("type") == "error":
                    future.set_exception(
                        BidiError(f"{data.get('error')}: {data.get('message')}"))
                else:
                    future.set_result(data.get("result", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(BidiError(f"BiDi connection lost: {self.log()}"))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method != "log.entryAdded":
            return
        page = self._by_context.get(params.get("source", {}).get("context", ""))
        if page is None:
            return
        if params.get("type") == "console":
            page.console.append(f"console.{params.get('method')}: {params.get('text')}")
        else:
            page.console.append(f"exception: {params.get('text')}")

    # -- pages ----------------------------------------------------------------------------

    async def new_page(
        self, *, width: int = 1280, height: int = 800, mobile: bool = False,
        scale: float = 1.0,
    ) -> FirefoxPage:
        """A new tab with the given viewport (BiDi has no touch emulation: `mobile` only
        sizes the viewport like a phone's)."""
        created = await self.send("browsingContext.create", {"type": "tab"})
        page = FirefoxPage(self, created["context"])
        self._by_context[page.context] = page
        self.pages.append(page)
        await self.send("browsingContext.setViewport", {
            "context": page.context, "viewport": {"width": width, "height": height},
            "devicePixelRatio": scale,
        })
        return page


class FirefoxPage(PageBase):
    """One tab: navigate, evaluate JavaScript, screenshot, close."""

    def __init__(self, browser: Firefox, context: str) -> None:
        self.browser = browser
        self.context = context
        self.console: list[str] = []

    async def goto(self, url: str, timeout: float = 15) -> None:
        """Navigate and wait for the load event."""
        await self.browser.send(
            "browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"},
            timeout=timeout,
        )

    async def evaluate(self, expression: str, timeout: float = 15) -> Any:
        """The value of a JavaScript expression (promises awaited), as JSON-able Python.

        JSON on the page side, like CDP's returnByValue, rather than BiDi's typed remote
        values, so both browsers give the tests the same Python values."""
        wrapped = (
            "(async () => { const v = await (" + expression + "\n);"
            " return v === undefined ? undefined : JSON.stringify(v); })()"
        )
        result = await self.browser.send("script.evaluate", {
            "expression": wrapped, "target": {"context": self.context},
            "awaitPromise": True, "resultOwnership": "none", "userActivation": True,
        }, timeout=timeout)
        if result.get("type") == "exception":
            details = result.get("exceptionDetails", {})
            raise BidiError(f"{expression[:80]!r} threw: {details.get('text')}")
        value = result.get("result", {})
        if value.get("type") != "string":
            return None
        return json.loads(value["value"])

    async def screenshot(self, path: Path) -> Path:
        """Save the viewport as a PNG."""
        shot = await self.browser.send(
            "browsingContext.captureScreenshot", {"context": self.context})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        """Close the tab, as the user closing it would (the page's pagehide runs)."""
        await self.browser.send("browsingContext.close", {"context": self.context})
        self.browser._by_context.pop(self.context, None)
