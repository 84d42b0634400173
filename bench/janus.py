"""Janus (Debian's `janus` 1.1.2) driven the way the capacity bench drives the appliance,
so that the two can be compared on the same work.

One "full call" for Janus is two VP8 echo streams (janus.plugin.echotest, video only) and
one PCMU call through janus.plugin.sip to the sipp desk phone (bench/desk.py), which
echoes the voice back. This module has the pieces:

- `JanusServer`: a Janus with a config folder of its own (the echotest and SIP plugins,
  the HTTP transport on 127.0.0.1 and nothing else), pinned to the given cores.
- `JanusSession`: the Janus REST API (https://janus.conf.meetecho.com/docs/rest.html) over
  aiohttp, with ONE long poll per session that hands each event to whoever waits for it
  (by transaction, or by handle) and keeps the session alive.
- `echotest_call`, `sip_call`, `hangup`: one media stream of a call, set up on an aiortc
  peer connection that the caller made (and then feeds with `SrtpFastPath`, as
  bench/caller.py does for the appliance).

Loopback ICE. Janus 1.1.2 never gathers on a loopback interface: `janus_ice_setup_local`
(src/ice.c) skips every interface flagged IFF_LOOPBACK *before* it looks at
`ice_enforce_list`, and libnice's own fallback leaves loopback out too, so in the bench's
loopback-only namespace every PeerConnection fails with "Error gathering candidates" (API
error 490), whatever `ice_enforce_list`/`ice_ignore_list` say. `JanusServer.start` therefore
adds, inside that namespace only, an `ifb` device (no peer, no link: what is sent on it is
dropped) that holds 127.0.0.1/32 and no IPv6 address, and enforces ICE to it: Janus
gathers `127.0.0.1` host candidates, and since 127.0.0.1 is a local address every packet
is delivered through lo. `bench.system.loopback_only()` stays true. It refuses to touch
the network anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sysconfig
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import (
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)

from appliance.edges.rtc_adapter import CandidatePolicy, apply_candidate_policy
from bench import system

log = logging.getLogger("bench.janus")

ECHOTEST = "janus.plugin.echotest"
SIP = "janus.plugin.sip"
_PLUGIN_FILES = {ECHOTEST: "libjanus_echotest.so", SIP: "libjanus_sip.so"}
_TRANSPORT_FILE = "libjanus_http.so"
# The non-loopback device that carries 127.0.0.1 for Janus's ICE (see the module's doc).
ICE_INTERFACE = "janusice0"
LOOPBACK = "127.0.0.1"
# Janus answers a long poll with a keepalive after 30 s without events.
_LONG_POLL_SECONDS = 45.0
DEFAULT_TIMEOUT = 10.0  # any single request or event wait


def _library_dir() -> Path | None:
    """Where the Debian package (or a source install) put the plugins and transports."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    for path in (Path("/usr/lib") / multiarch / "janus", Path("/usr/lib/janus"),
                 Path("/usr/local/lib/janus"), Path("/opt/janus/lib/janus")):
        if (path / "plugins").is_dir():
            return path
    return None


def _why_not() -> str:
    if shutil.which("janus") is None:
        return "janus is not installed (Debian package `janus`)"
    lib = _library_dir()
    if lib is None:
        return "janus is installed but its plugins folder was not found"
    missing = [name for name in _PLUGIN_FILES.values() if not (lib / "plugins" / name).exists()]
    if not (lib / "transports" / _TRANSPORT_FILE).exists():
        missing.append(_TRANSPORT_FILE)
    if missing:
        return f"janus lacks {', '.join(missing)} in {lib}"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is needed for Janus's loopback ICE device"
    return ""


WHY_NOT: str = _why_not()
INSTALLED: bool = not WHY_NOT
LIBRARY_DIR: Path | None = _library_dir()


class JanusError(RuntimeError):
    """Janus (core or plugin) refused a request, or a session/handle went away."""


# -- the loopback ICE device ------------------------------------------------------------------


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    return int(proc.returncode or 0), err.decode(errors="replace").strip()


_ice_users = 0  # JanusServers of this process that use the device we created


async def ensure_ice_interface(name: str = ICE_INTERFACE) -> bool:
    """Make `name`, a non-loopback device holding 127.0.0.1/32 (and no IPv6 address), for
    Janus to gather ICE candidates on. True if it was created now, False if it existed.

    Only inside a loopback-only network namespace (tests/in-loopback-netns.sh): elsewhere
    this raises rather than change the machine's network. Needs CAP_NET_ADMIN there (the
    script runs as root).
    """
    if await link_exists(name):
        return False
    if not system.loopback_only():
        raise RuntimeError(
            "refusing to add Janus's ICE device outside a loopback-only network namespace "
            "(run under tests/in-loopback-netns.sh)")
    steps = (("link", "add", name, "type", "ifb"),
             ("link", "set", name, "addrgenmode", "none"),  # no fe80:: address
             ("addr", "add", f"{LOOPBACK}/32", "dev", name),
             ("link", "set", name, "up"))
    for step in steps:
        code, err = await _ip(*step)
        if code != 0:
            await _ip("link", "del", name)
            raise RuntimeError(f"cannot make Janus's ICE device: ip {' '.join(step)}: {err}")
    if not system.loopback_only():  # never leave a non-loopback address behind
        await _ip("link", "del", name)
        raise RuntimeError(f"{name} got a non-loopback address; removed it")
    return True


async def link_exists(name: str) -> bool:
    """Whether this network namespace has the device. Not /sys/class/net: `unshare -n`
    does not remount sysfs, which then still shows the namespace it was mounted in."""
    code, _ = await _ip("link", "show", "dev", name)
    return code == 0


async def remove_ice_interface(name: str = ICE_INTERFACE) -> None:
    if await link_exists(name):
        await _ip("link", "del", name)


# -- the server -------------------------------------------------------------------------------


def _others(folder: Path, keep: set[str]) -> str:
    """The comma-separated `disable` list: every module in `folder` but `keep`."""
    if not folder.is_dir():
        return ""
    return ",".join(sorted(p.name for p in folder.glob("*.so") if p.name not in keep))


def _split_ports(rtp_ports: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Janus core's ICE ports, the SIP plugin's plain RTP ports): the halves of the range."""
    low, high = rtp_ports
    if not 1024 <= low < high <= 65535 or high - low < 7:
        raise ValueError(f"rtp_ports must be a range of at least 8 ports: {rtp_ports}")
    middle = (low + high) // 2
    return (low, middle), (middle + 1, high)


def write_config(configdir: Path, http_port: int, rtp_ports: tuple[int, int], *,
                 debug_level: int = 3, event_loops: int = 0,
                 ice_interface: str = ICE_INTERFACE) -> Path:
    """Write the minimal config folder; return the janus.jcfg path.

    Loaded: janus.plugin.echotest, janus.plugin.sip and the HTTP transport (127.0.0.1 only,
    admin API off); every other plugin, transport, logger and event handler is disabled.
    No STUN/TURN server, no IPv6, no ICE-TCP, no mDNS; ICE gathers on `ice_interface`
    only. `event_loops` 0 is Janus's default (one thread per handle); N > 0 shares N loops.
    """
    if LIBRARY_DIR is None:
        raise RuntimeError(WHY_NOT or "janus library folder not found")
    if not 0 <= debug_level <= 7:
        raise ValueError("debug_level must be 0..7")
    configdir.mkdir(parents=True, exist_ok=True)
    (ice_low, ice_high), (sip_low, sip_high) = _split_ports(rtp_ports)
    lib = LIBRARY_DIR
    janus_cfg = f"""\
# Written by bench/janus.py: only what the capacity bench uses.
general: {{
    configs_folder = "{configdir}"
    plugins_folder = "{lib / 'plugins'}"
    transports_folder = "{lib / 'transports'}"
    events_folder = "{lib / 'events'}"
    loggers_folder = "{lib / 'loggers'}"
    debug_level = {debug_level}
    debug_timestamps = true
    debug_colors = false
    server_name = "bench-janus"
    session_timeout = 60
    event_loops = {event_loops}
}}
certificates: {{
}}
media: {{
    ipv6 = false
    rtp_port_range = "{ice_low}-{ice_high}"
}}
nat: {{
    nice_debug = false
    full_trickle = false
    ice_lite = false
    ice_tcp = false
    ignore_mdns = true
    ice_enforce_list = "{ice_interface}"
}}
plugins: {{
    disable = "{_others(lib / 'plugins', set(_PLUGIN_FILES.values()))}"
}}
transports: {{
    disable = "{_others(lib / 'transports', {_TRANSPORT_FILE})}"
}}
loggers: {{
    disable = "{_others(lib / 'loggers', set())}"
}}
events: {{
    broadcast = false
    disable = "{_others(lib / 'events', set())}"
}}
"""
    http_cfg = f"""\
general: {{
    json = "compact"
    base_path = "/janus"
    http = true
    port = {http_port}
    ip = "{LOOPBACK}"
    https = false
    events = false
}}
admin: {{
    admin_http = false
    admin_https = false
}}
cors: {{
}}
"""
    sip_cfg = f"""\
general: {{
    local_ip = "{LOOPBACK}"
    local_media_ip = "{LOOPBACK}"
    sdp_ip = "{LOOPBACK}"
    keepalive_interval = 0
    behind_nat = false
    register_ttl = 3600
    rtp_port_range = "{sip_low}-{sip_high}"
    sip_timer_t1x64 = 32000
    events = false
}}
"""
    (configdir / "janus.jcfg").write_text(janus_cfg)
    (configdir / "janus.transport.http.jcfg").write_text(http_cfg)
    (configdir / "janus.plugin.echotest.jcfg").write_text("general: {\n    events = false\n}\n")
    (configdir / "janus.plugin.sip.jcfg").write_text(sip_cfg)
    return configdir / "janus.jcfg"


@dataclass
class JanusServer:
    proc: asyncio.subprocess.Process
    workdir: Path
    http_port: int
    rtp_ports: tuple[int, int]
    log_path: Path
    uses_ice_interface: bool = False

    @classmethod
    async def start(cls, workdir: Path, cores: list[int] | None, http_port: int,
                    rtp_ports: tuple[int, int], *, debug_level: int = 3, event_loops: int = 0,
                    timeout: float = 15.0) -> JanusServer:
        """Write the config under `workdir/janus-config`, start `janus` (pinned to `cores`
        before exec, so every thread it makes inherits it; its pid is janus's own) with its
        output in `workdir/janus.log`, and return once GET /janus/info answers with both
        plugins loaded."""
        global _ice_users
        if not INSTALLED:
            raise RuntimeError(WHY_NOT)
        workdir.mkdir(parents=True, exist_ok=True)
        configdir = workdir / "janus-config"
        jcfg = write_config(configdir, http_port, rtp_ports, debug_level=debug_level,
                            event_loops=event_loops)
        created = await ensure_ice_interface()
        if created or _ice_users:
            _ice_users += 1

        def pin() -> None:
            if cores:
                os.sched_setaffinity(0, cores)

        log_path = workdir / "janus.log"
        out = log_path.open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                "janus", "-F", str(configdir), "-C", str(jcfg),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                cwd=workdir, preexec_fn=pin)
        finally:
            out.close()
        server = cls(proc, workdir, http_port, rtp_ports, log_path,
                     uses_ice_interface=created or _ice_users > 0)
        try:
            await server._wait_ready(timeout)
        except BaseException:
            await server.stop()
            raise
        return server

    @property
    def pid(self) -> int:
        """janus's own pid (for CPU accounting)."""
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/janus"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def info(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(
                f"{self.url}/info", timeout=aiohttp.ClientTimeout(total=5)) as reply:
            return dict(await reply.json(content_type=None))

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"janus exited ({self.proc.returncode}):\n"
                                       f"{self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/info",
                                        timeout=aiohttp.ClientTimeout(total=2)) as reply:
                        info = await reply.json(content_type=None)
                    plugins = set(info.get("plugins", {}))
                    if info.get("janus") == "server_info" and {ECHOTEST, SIP} <= plugins:
                        return
                    last = f"plugins loaded: {sorted(plugins)}"
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.1)
        raise RuntimeError(f"janus not ready on {self.url} within {timeout} s ({last}):\n"
                           f"{self.log_tail()}")

    async def stop(self, timeout: float = 10.0) -> None:
        global _ice_users
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.uses_ice_interface:
            self.uses_ice_interface = False
            _ice_users = max(0, _ice_users - 1)
            if _ice_users == 0:
                await remove_ice_interface()


# -- the API client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JanusEvent:
    """One message from Janus: a POST's answer or an event of the long poll."""

    message: Mapping[str, Any]

    @property
    def janus(self) -> str:
        """"event", "success", "ack", "error", "webrtcup", "media", "hangup", ..."""
        return str(self.message.get("janus", ""))

    @property
    def transaction(self) -> str | None:
        tx = self.message.get("transaction")
        return str(tx) if tx is not None else None

    @property
    def sender(self) -> int | None:
        sender = self.message.get("sender")
        return int(sender) if sender is not None else None

    @property
    def plugin(self) -> str | None:
        data = self.message.get("plugindata")
        return str(data.get("plugin")) if isinstance(data, Mapping) else None

    @property
    def data(self) -> Mapping[str, Any]:
        """The plugin's own payload (plugindata.data), {} for core messages."""
        plugindata = self.message.get("plugindata")
        data = plugindata.get("data") if isinstance(plugindata, Mapping) else None
        return data if isinstance(data, Mapping) else {}

    @property
    def jsep(self) -> Mapping[str, Any] | None:
        jsep = self.message.get("jsep")
        return jsep if isinstance(jsep, Mapping) else None

    @property
    def name(self) -> str:
        """The plugin event's name ("registered", "accepted", "hangup" for the SIP plugin;
        "ok"/"done" for the echotest), else the core message's type."""
        result = self.data.get("result")
        if isinstance(result, Mapping) and "event" in result:
            return str(result["event"])
        if isinstance(result, str):
            return result
        return self.janus

    @property
    def result(self) -> Mapping[str, Any]:
        result = self.data.get("result")
        return result if isinstance(result, Mapping) else {}

    @property
    def error(self) -> str | None:
        """The core's or the plugin's error, if this message is one."""
        if self.janus == "error":
            err = self.message.get("error", {})
            return f"{err.get('code')} {err.get('reason')}" if isinstance(err, Mapping) \
                else str(err)
        if "error" in self.data or "error_code" in self.data:
            return f"{self.data.get('error_code')} {self.data.get('error')}"
        return None


Accept = Callable[[JanusEvent], bool]


@dataclass
class _Handle:
    plugin: str
    backlog: deque[JanusEvent] = field(default_factory=lambda: deque(maxlen=64))
    waiters: list[tuple[Accept, asyncio.Future[JanusEvent]]] = field(default_factory=list)
    webrtcup: bool = False
    hungup: str | None = None  # the core's hangup reason, once the PeerConnection closed

    def deliver(self, event: JanusEvent) -> None:
        if event.janus == "webrtcup":
            self.webrtcup = True
        elif event.janus == "hangup":
            self.hungup = str(event.message.get("reason", ""))
        for i, (accept, future) in enumerate(self.waiters):
            if not future.done() and accept(event):
                del self.waiters[i]
                future.set_result(event)
                return
        self.backlog.append(event)

    def take(self, accept: Accept) -> JanusEvent | None:
        for event in self.backlog:
            if accept(event):
                self.backlog.remove(event)
                return event
        return None

    def fail(self, exc: BaseException) -> None:
        for _, future in self.waiters:
            if not future.done():
                future.set_exception(exc)
        self.waiters.clear()


class JanusSession:
    """One Janus session over the REST API, holding any number of handles.

    A single long-poll task (`GET /janus/<session>?maxev=N`) reads every event of the
    session: one answering a pending `message` by transaction goes to it, any other to its
    handle (kept in a short backlog until someone `wait_event`s for it). Each long poll
    also counts as a keepalive for Janus, so the session never times out while open.
    """

    def __init__(self, url: str, http: aiohttp.ClientSession, session_id: int, *,
                 owns_http: bool, timeout: float, maxev: int) -> None:
        self.url = url.rstrip("/")
        self.id = session_id
        self.timeout = timeout
        self._http = http
        self._owns_http = owns_http
        self._maxev = maxev
        self._tx_prefix = secrets.token_hex(4)
        self._tx_numbers = itertools.count(1)
        self._by_transaction: dict[str, asyncio.Future[JanusEvent]] = {}
        self._handles: dict[int, _Handle] = {}
        self._closed = False
        self._failure: BaseException | None = None
        self._poller: asyncio.Task[None] | None = None
        self.events_seen = 0

    @classmethod
    async def create(cls, url: str, *, http: aiohttp.ClientSession | None = None,
                     timeout: float = DEFAULT_TIMEOUT, maxev: int = 100) -> JanusSession:
        """`POST {"janus": "create"}` on `url` (a JanusServer's `url`), then start the
        session's long poll. `http` may be shared between sessions."""
        owns = http is None
        client = http or aiohttp.ClientSession()
        try:
            reply = await cls._post_to(client, url, {"janus": "create",
                                                     "transaction": secrets.token_hex(6)},
                                       timeout)
            session_id = int(reply.message["data"]["id"])
        except BaseException:
            if owns:
                await client.close()
            raise
        session = cls(url, client, session_id, owns_http=owns, timeout=timeout, maxev=maxev)
        session._poller = asyncio.get_running_loop().create_task(
            session._poll(), name=f"janus-poll-{session_id}")
        return session

    async def __aenter__(self) -> JanusSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------------

    def _transaction(self) -> str:
        return f"{self._tx_prefix}-{next(self._tx_numbers)}"

    @staticmethod
    async def _post_to(http: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                       timeout: float) -> JanusEvent:
        async with http.post(url, data=json.dumps(payload),
                             headers={"Content-Type": "application/json"},
                             timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
            if reply.status != 200:
                raise JanusError(f"HTTP {reply.status} from {url}: {await reply.text()}")
            event = JanusEvent(await reply.json(content_type=None))
        if event.janus == "error":
            raise JanusError(f"{payload.get('janus')}: {event.error}")
        return event

    async def _post(self, path: str, payload: dict[str, Any],
                    timeout: float | None = None) -> JanusEvent:
        self._check_open()
        payload.setdefault("transaction", self._transaction())
        return await self._post_to(self._http, self.url + path, payload,
                                   timeout or self.timeout)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise JanusError(f"session {self.id} is gone: {self._failure}")
        if self._closed:
            raise JanusError(f"session {self.id} is closed")

    async def attach(self, plugin: str) -> int:
        """A new handle on `plugin` ("janus.plugin.echotest", "janus.plugin.sip")."""
        reply = await self._post(f"/{self.id}", {"janus": "attach", "plugin": plugin})
        handle = int(reply.message["data"]["id"])
        self._handles[handle] = _Handle(plugin)
        return handle

    def plugin_of(self, handle: int) -> str:
        return self._handles[handle].plugin

    def webrtc_up(self, handle: int) -> bool:
        """Whether Janus said "webrtcup" (ICE and DTLS done) for this handle."""
        entry = self._handles.get(handle)
        return entry is not None and entry.webrtcup

    async def message(self, handle: int, body: Mapping[str, Any],
                      jsep: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> JanusEvent:
        """Send a plugin request; return the plugin's answer: the event with the same
        transaction (Janus first answers "ack", the event follows on the long poll), or
        the synchronous "success". Its `data` is the plugin's payload, `jsep` its SDP if
        any. JanusError if the core or the plugin answers with an error."""
        self._check_open()
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        tx = self._transaction()
        future: asyncio.Future[JanusEvent] = asyncio.get_running_loop().create_future()
        self._by_transaction[tx] = future  # before the POST: the event may come first
        payload: dict[str, Any] = {"janus": "message", "transaction": tx, "body": dict(body)}
        if jsep is not None:
            payload["jsep"] = dict(jsep)
        try:
            reply = await self._post(f"/{self.id}/{handle}", payload, timeout)
            if reply.janus == "ack":
                remaining = max(0.01, deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(future, remaining)
                except TimeoutError:
                    raise TimeoutError(f"no answer from {self._plugin_name(handle)} to "
                                       f"{body.get('request', body)} in {timeout} s") from None
            else:
                event = reply
        finally:
            self._by_transaction.pop(tx, None)
        if event.error is not None:
            raise JanusError(f"{self._plugin_name(handle)} {body.get('request', '')}: "
                             f"{event.error}")
        return event

    def _plugin_name(self, handle: int) -> str:
        entry = self._handles.get(handle)
        return entry.plugin if entry is not None else f"handle {handle}"

    async def wait_event(self, handle: int, accept: Accept,
                         timeout: float | None = None) -> JanusEvent:
        """The first event of `handle` (not already taken by a `message`) that `accept`
        takes, including one that came before the call."""
        entry = self._handles.get(handle)
        if entry is None:
            raise JanusError(f"no handle {handle} in session {self.id}")
        event = entry.take(accept)
        if event is not None:
            return event
        self._check_open()
        future: asyncio.Future[JanusEvent] = asyncio.get_running_loop().create_future()
        waiter = (accept, future)
        entry.waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout or self.timeout)
        finally:
            if waiter in entry.waiters:
                entry.waiters.remove(waiter)

    async def hangup_webrtc(self, handle: int) -> None:
        """The core's hangup: close the handle's PeerConnection (the handle stays)."""
        await self._post(f"/{self.id}/{handle}", {"janus": "hangup"})

    async def detach(self, handle: int) -> None:
        entry = self._handles.pop(handle, None)
        if entry is not None:
            entry.fail(JanusError(f"handle {handle} detached"))
        await self._post(f"/{self.id}/{handle}", {"janus": "detach"})

    async def destroy(self) -> None:
        """Destroy the session on Janus (every handle with it) and stop the long poll."""
        if self._closed:
            return
        try:
            if self._failure is None:
                await self._post(f"/{self.id}", {"janus": "destroy"})
        finally:
            self._shut(JanusError(f"session {self.id} destroyed"))

    async def close(self) -> None:
        """Destroy the session if still there (errors ignored), then close the client."""
        with contextlib.suppress(Exception):
            await self.destroy()
        self._shut(JanusError(f"session {self.id} closed"))
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        if self._owns_http:
            await self._http.close()

    def _shut(self, exc: BaseException) -> None:
        self._closed = True
        for future in self._by_transaction.values():
            if not future.done():
                future.set_exception(exc)
        self._by_transaction.clear()
        for entry in self._handles.values():
            entry.fail(exc)
        if self._poller is not None and self._poller is not asyncio.current_task():
            self._poller.cancel()

    # -- the long poll -------------------------------------------------------------------

    async def _poll(self) -> None:
        url = f"{self.url}/{self.id}?maxev={self._maxev}"
        failures = 0
        while not self._closed:
            try:
                async with self._http.get(
                        url, timeout=aiohttp.ClientTimeout(total=_LONG_POLL_SECONDS)) as reply:
                    if reply.status == 404:
                        raise JanusError("Janus no longer knows this session")
                    body = await reply.json(content_type=None)
                failures = 0
            except asyncio.CancelledError:
                raise
            except JanusError as exc:
                self._failure = exc
                self._shut(exc)
                return
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failures += 1
                if failures >= 5:
                    self._failure = ConnectionError(f"long poll failed 5 times: {exc!r}")
                    self._shut(self._failure)
                    return
                log.warning("session %d: long poll failed (%r); again", self.id, exc)
                await asyncio.sleep(0.2 * failures)
                continue
            for message in body if isinstance(body, list) else [body]:
                if isinstance(message, dict):
                    self._dispatch(JanusEvent(message))

    def _dispatch(self, event: JanusEvent) -> None:
        if event.janus == "keepalive":
            return
        self.events_seen += 1
        if event.janus == "timeout":  # the session expired on Janus
            self._failure = JanusError("session timed out on Janus")
            self._shut(self._failure)
            return
        tx = event.transaction
        if tx is not None:
            future = self._by_transaction.pop(tx, None)
            if future is not None and not future.done():
                future.set_result(event)
                return
        sender = event.sender
        entry = self._handles.get(sender) if sender is not None else None
        if entry is not None:
            entry.deliver(event)


# -- calls ------------------------------------------------------------------------------------


def _transceiver(pc: RTCPeerConnection, kind: str) -> RTCRtpTransceiver:
    for transceiver in pc.getTransceivers():
        if transceiver.kind == kind:
            return transceiver
    raise LookupError(f"the peer connection has no {kind} transceiver")


def _prefer(transceiver: RTCRtpTransceiver, mime_type: str) -> None:
    """Offer only `mime_type` on this transceiver (no RTX, no other codec)."""
    codecs = [c for c in RTCRtpSender.getCapabilities(transceiver.kind).codecs
              if c.mimeType.lower() == mime_type.lower()]
    if not codecs:
        raise LookupError(f"aiortc has no {mime_type}")
    transceiver.setCodecPreferences(codecs)


async def _local_offer(pc: RTCPeerConnection, host_addresses: Sequence[str] | None) -> str:
    """aiortc's offer, candidates included (it gathers before answering: non-trickle).
    With host_addresses, ICE announces exactly those (aioice on its own skips 127.0.0.1):
    the project's candidate policy, as the SDK uses it."""
    if host_addresses is not None:
        apply_candidate_policy(pc, CandidatePolicy.from_strings(list(host_addresses)))
    await pc.setLocalDescription(await pc.createOffer())
    return str(pc.localDescription.sdp)


def _offer_jsep(sdp: str) -> dict[str, Any]:
    # trickle false: every candidate is in the SDP, Janus waits for no trickle message.
    return {"type": "offer", "sdp": sdp, "trickle": False}


async def _answer(pc: RTCPeerConnection, event: JanusEvent, what: str) -> None:
    jsep = event.jsep
    if jsep is None or jsep.get("type") != "answer" or not jsep.get("sdp"):
        raise JanusError(f"{what}: no answer SDP in {dict(event.message)}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=str(jsep["sdp"]), type="answer"))


async def _abandon(session: JanusSession, handle: int) -> None:
    with contextlib.suppress(Exception):
        await session.detach(handle)


async def echotest_call(session: JanusSession, pc: RTCPeerConnection, *,
                        host_addresses: Sequence[str] | None = (LOOPBACK,),
                        timeout: float | None = None) -> int:
    """One VP8 echo stream: attach janus.plugin.echotest, offer `pc`'s video (VP8 only),
    ask for `{"audio": false, "video": true}`, take Janus's answer. Returns the handle.

    `pc` was made by the caller with iceServers=[] and a sendrecv video transceiver from a
    track. Media starts when `pc` connects; Janus then echoes what it receives.
    """
    _prefer(_transceiver(pc, "video"), "video/VP8")
    handle = await session.attach(ECHOTEST)
    try:
        sdp = await _local_offer(pc, host_addresses)
        event = await session.message(handle, {"audio": False, "video": True},
                                      _offer_jsep(sdp), timeout=timeout)
        await _answer(pc, event, "echotest")
    except BaseException:
        await _abandon(session, handle)
        raise
    return handle


def user_to_user(roomkey: int = 0) -> str:
    """The User-to-User header value the appliance puts in its INVITEs (and that
    tests/sipp/desk/desk_echo.xml checks): hex of {"roomkey":N};encoding=hex."""
    return json.dumps({"roomkey": roomkey}, separators=(",", ":")).encode().hex() + \
        ";encoding=hex"


def add_telephone_event(sdp: str, payload_type: int = 101) -> str:
    """Offer RFC 4733 telephone-event/8000 on the audio m-line, as browsers do and as the
    appliance offers the desk phone ("m=audio N RTP/AVP 0 101": desk_echo.xml checks it).
    aiortc has no telephone-event codec; its answer to it is ignored on our side."""
    lines = sdp.split("\r\n")
    out: list[str] = []
    in_audio = False
    for line in lines:
        if line.startswith("m="):
            if in_audio:
                out += [f"a=rtpmap:{payload_type} telephone-event/8000",
                        f"a=fmtp:{payload_type} 0-16"]
            in_audio = line.startswith("m=audio ")
            if in_audio:
                formats = line.split()[3:]
                if str(payload_type) in formats or any(
                        "telephone-event" in x for x in lines):
                    return sdp
                line = f"{line} {payload_type}"
        out.append(line)
    if in_audio:  # the audio section was the last one: before the trailing empty line
        at = len(out) - 1 if out and out[-1] == "" else len(out)
        out[at:at] = [f"a=rtpmap:{payload_type} telephone-event/8000",
                      f"a=fmtp:{payload_type} 0-16"]
    return "\r\n".join(out)


def _user_part(uri: str) -> str:
    match = re.match(r"^sips?:([^@;>]+)@", uri)
    return match.group(1) if match else uri


async def sip_call(session: JanusSession, pc: RTCPeerConnection, uri: str, username: str, *,
                   display_name: str | None = None,
                   headers: Mapping[str, str] | None = None,
                   telephone_event: bool = True,
                   host_addresses: Sequence[str] | None = (LOOPBACK,),
                   answer_timeout: float = 30.0, timeout: float | None = None) -> int:
    """One PCMU call through janus.plugin.sip: attach, register as guest `username` (a
    SIP URI such as "sip:5678@127.0.0.1"; a bare user part gets "@127.0.0.1"), call `uri`
    (e.g. "sip:9333@127.0.0.1:5070") with `pc`'s audio offer (PCMU only), wait for the
    "accepted" event and its answer. Returns the handle.

    Like the appliance's INVITE: From `"<display_name>" <username>` (display name: the
    user part by default) and a User-to-User header (`headers` None; pass {} for none, or
    your own), telephone-event 101 offered next to PCMU. `pc` was made by the caller with
    iceServers=[] and an audio transceiver from a track.
    """
    if ":" not in username:
        username = f"sip:{username}@{LOOPBACK}"
    _prefer(_transceiver(pc, "audio"), "audio/PCMU")
    handle = await session.attach(SIP)
    try:
        register = {"request": "register", "type": "guest", "username": username,
                    "display_name": display_name or _user_part(username)}
        registered = await session.message(handle, register, timeout=timeout)
        if registered.name != "registered":
            raise JanusError(f"sip register: {dict(registered.data)}")
        sdp = await _local_offer(pc, host_addresses)
        if telephone_event:
            sdp = add_telephone_event(sdp)
        body: dict[str, Any] = {"request": "call", "uri": uri,
                                "headers": dict(headers) if headers is not None
                                else {"User-to-User": user_to_user()}}
        if not body["headers"]:
            del body["headers"]
        await session.message(handle, body, _offer_jsep(sdp), timeout=timeout)  # "calling"

        def final(event: JanusEvent) -> bool:
            return (event.name in ("accepted", "hangup") or event.janus == "hangup"
                    or event.error is not None)

        event = await session.wait_event(handle, final, answer_timeout)
        if event.name != "accepted":
            reason = event.result or event.error or dict(event.message)
            raise JanusError(f"sip call to {uri} not accepted: {reason}")
        await _answer(pc, event, "sip")
    except BaseException:
        await _abandon(session, handle)
        raise
    return handle


async def hangup(session: JanusSession, handle: int, *, detach: bool = True,
                 timeout: float = 5.0) -> None:
    """End one stream set up by `echotest_call` or `sip_call`: a SIP call sends BYE
    (`{"request": "hangup"}`, then its "hangup" event), an echo test gets the core's
    hangup; then the handle is detached. Errors of a handle already gone are ignored."""
    try:
        plugin = session.plugin_of(handle)
    except KeyError:
        return
    with contextlib.suppress(JanusError, TimeoutError, aiohttp.ClientError):
        if plugin == SIP:
            await session.message(handle, {"request": "hangup"}, timeout=timeout)
            await session.wait_event(handle, lambda e: e.result.get("event") == "hangup"
                                     or e.janus == "hangup", timeout)
        else:
            await session.hangup_webrtc(handle)
    if detach:
        with contextlib.suppress(JanusError, TimeoutError, aiohttp.ClientError):
            await session.detach(handle)
