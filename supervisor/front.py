"""The public HTTPS port: the signalling WebSocket at `/` and the two pages.

Everything here comes from the Internet, so every connection is bounded (config
`[signalling]`):
- the TLS handshake (`handshake_timeout`) and the HTTP request head (`header_timeout`:
  aiohttp's keep-alive timer, which data does not extend, closes a connection still
  waiting for a complete request; a slowloris client is cut);
- open connections in all and per source address (`max_connections`,
  `max_connections_per_address`): over a cap the client gets HTTP 503 with the reason;
- WebSocket frames at `protocol.MAX_FRAME_BYTES` (larger: close 1009) and no compression
  (a zlib context per connection costs more than the frames it would save);
- an idle WebSocket (no frame for `idle_timeout` and no live call) is closed 1008;
- frames towards a client queue up to `send_queue`, then the client is cut: a client that
  does not read must not stall the supervisor's bus loop;
- whatever a frame makes the supervisor raise is answered with a release, logged (rate-
  limited) and the connection goes on; whatever ends a connection frees it at once.

Besides the WebSocket and the pages, GET /ice-servers gives a page (or the SDK) the ICE
servers for its next call, TURN credentials included (`_IceServersEndpoint`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import WSCloseCode, WSMsgType, web

from appliance.core import protocol as p
from appliance.core.config import SignallingConfig
from appliance.core.throttle import BudgetedLogger, TokenBucket
from appliance.core.turn_credentials import PageIceServers, encode_answer, make_user_id
from supervisor.admission import address_key
from supervisor.app import Supervisor
from supervisor.calls import ClientConn
from supervisor.conn_guard import ConnectionGuard
from supervisor.heap_trim import HeapTrimmer

log = logging.getLogger("appliance.front")

STATIC_DIR = Path(__file__).resolve().parent / "static"
HEARTBEAT_S = 30.0  # server pings: the close path frees a browser that vanished
INTERNAL_ERROR = "internal error: frame not processed"
SLOW_READER_S = 10.0  # a client may take this long to read its queued answers


# Every line here is one an attacker can trigger at will. 30 per kind per 10 s: a busy
# port keeps its lines, a flood of one kind does not silence the others.
_log_limited = BudgetedLogger(log, lines=30, interval=10.0)
# A TURN secret file that cannot be read is the operator's to fix, not an attack: said once
# a minute, however many pages ask meanwhile.
_log_config = BudgetedLogger(log, lines=1, interval=60.0)


class _WsSink:
    """Frames to one client, through a bounded queue and one writer task, so that the
    supervisor never waits for a client's TCP window."""

    def __init__(self, ws: web.WebSocketResponse, limit: int, conn_label: str) -> None:
        self.ws = ws
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(limit)
        self.label = conn_label
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def send_frame(self, data: bytes) -> None:
        if self.ws.closed or self._writer.done():
            return
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            _log_limited.log(logging.WARNING,
                             "%s: client does not read its frames (%d queued): closing",
                             self.label, self._queue.qsize(), kind="slow")
            self._writer.cancel()
            await _close(self.ws, WSCloseCode.POLICY_VIOLATION, "too slow reading frames")

    async def _write(self) -> None:
        while True:
            data = await self._queue.get()
            try:
                await self.ws.send_str(data.decode())
            except (ConnectionError, RuntimeError):
                return  # the browser went away: the close path releases its calls
            finally:
                self._queue.task_done()

    async def backlog_drained(self) -> bool:
        """Wait while half the queue is taken; False if the client stays too slow. The
        connection reads the client's next frame only after this: a client that sends
        faster than it reads its answers is held back by its own reading, and only what
        the calls send on their own (ice, quality) can ever fill the queue."""
        if self._queue.qsize() < max(1, self._queue.maxsize // 2):
            return True
        try:
            async with asyncio.timeout(SLOW_READER_S):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._writer.cancel()


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):  # a transport already gone has nothing to close
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), 2.0)


def _ids_of(data: bytes | str) -> tuple[Any, Any]:
    """dialogid and ref of a frame that broke the supervisor, for the release."""
    try:
        action = p.decode(data)
    except p.ProtocolError as err:
        return (p.UNSET if err.dialogid is None else err.dialogid,
                p.UNSET if err.ref is None else err.ref)
    return action.dialogid, action.ref


class _Connection:
    """One signalling WebSocket: frames in, idle timer, every failure contained."""

    def __init__(self, supervisor: Supervisor, sig: SignallingConfig, ws: web.WebSocketResponse,
                 peer: str) -> None:
        self.supervisor = supervisor
        self.sig = sig
        self.ws = ws
        self.peer = peer

    async def run(self) -> None:
        sink = _WsSink(self.ws, self.sig.send_queue, "conn ?")
        conn = self.supervisor.open_conn(sink, peer=self.peer)
        sink.label = f"conn {conn.id}"
        _log_limited.log(logging.INFO, "conn %d: WebSocket from %s", conn.id, self.peer,
                         kind="open")
        reason = "closed by the client"
        try:
            reason = await self._serve(conn, sink)
        except Exception:  # a bug must cost this connection at most, never the process
            reason = "internal error"
            _log_limited.log(logging.ERROR, "conn %d: connection handler failed", conn.id,
                             kind="crash", exc_info=True)
        finally:
            sink.close()
            self.supervisor.close_conn(conn)
            if not self.ws.closed:  # stops the heartbeat and frees the TLS objects now
                await _close(self.ws, WSCloseCode.GOING_AWAY, reason)
            _log_limited.log(logging.INFO, "conn %d: WebSocket closed (%s)", conn.id, reason,
                             kind="close")

    async def _serve(self, conn: ClientConn, sink: _WsSink) -> str:
        loop = asyncio.get_running_loop()
        idle = self.sig.idle_timeout
        last_activity = loop.time()
        while True:
            try:
                async with asyncio.timeout_at(last_activity + idle):
                    msg = await self.ws.receive()
            except TimeoutError:
                if conn.calls:  # a call lives: the client may stay silent as long as it likes
                    last_activity = loop.time()
                    continue
                _log_limited.log(logging.INFO, "conn %d: idle for %.0f s with no call: "
                                 "closing", conn.id, idle, kind="idle")
                await _close(self.ws, WSCloseCode.POLICY_VIOLATION,
                             f"idle timeout: no frame and no call for {idle:.0f} s")
                return "idle timeout"
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                last_activity = loop.time()
                await self._frame(conn, msg.data)
                if not await sink.backlog_drained():
                    _log_limited.log(logging.WARNING, "conn %d: client does not read its "
                                     "answers: closing", conn.id, kind="slow")
                    await _close(self.ws, WSCloseCode.POLICY_VIOLATION,
                                 "too slow reading frames")
                    return "too slow reading frames"
            elif msg.type == WSMsgType.ERROR:
                # aiohttp has closed it already (1009 too big, 1007 invalid UTF-8 text...).
                _log_limited.log(logging.INFO, "conn %d: WebSocket error from %s: %s",
                                 conn.id, self.peer, self.ws.exception(), kind="ws-error")
                return f"WebSocket error: {self.ws.exception()}"
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return "closed by the client"

    async def _frame(self, conn: ClientConn, data: bytes | str) -> None:
        try:
            await self.supervisor.handle_frame(conn, data)
        except Exception:
            # handle_frame answers every frame itself; this is a bug, still only one frame.
            _log_limited.log(logging.ERROR, "conn %d: frame not processed", conn.id,
                             kind="frame", exc_info=True)
            dialogid, ref = _ids_of(data)
            release = p.Release(dialogid=dialogid, ref=ref, channel=0,
                                cause=p.CAUSE_TEMPORARY_FAILURE, causestring=INTERNAL_ERROR)
            await conn.sink.send_frame(p.encode(release))


ICE_SERVERS_PATH = "/ice-servers"
# A page asks once per call. Beyond these rates a client gets 429: one looping on the
# endpoint costs an HMAC and a few hundred bytes per request, and no more of them than this.
ICE_RATE_PER_ADDRESS = 2.0  # answers per second per address (an IPv6 /64)...
ICE_BURST_PER_ADDRESS = 30  # ...after a burst of this many (a call centre's agents behind NAT)
ICE_RATE_TOTAL = 200.0  # and for the whole port
ICE_BURST_TOTAL = 400
ICE_ADDRESSES_TRACKED = 4096  # the oldest is forgotten first: bounded memory under a spray


class _IceServersEndpoint:
    """GET /ice-servers: {"iceServers": [...]} for one call (appliance/core/turn_credentials.py).

    An endpoint of its own rather than a field of a message: a page needs its ICE servers
    when it creates the RTCPeerConnection, before its offer, and no message of the protocol
    comes before the offer (a new action would change the wire protocol every client speaks).
    Asked per call, not per page load, because each answer's TURN credential is made for one
    client and expires. Same origin only (no CORS header: another site's page cannot read
    it), never cached (`no-store`), rate-limited per address and in all. With no
    `[media] ice_servers` the answer is {"iceServers": []}: what the pages always used."""

    def __init__(self, servers: PageIceServers, label: str, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._servers = servers
        self._label = label
        self._clock = clock
        self._monotonic = monotonic
        self._total = TokenBucket(ICE_RATE_TOTAL, ICE_BURST_TOTAL)
        self._per_address: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, address: str, now: float) -> bool:
        bucket = self._per_address.pop(address, None)
        if bucket is None:
            bucket = TokenBucket(ICE_RATE_PER_ADDRESS, ICE_BURST_PER_ADDRESS)
            while len(self._per_address) >= ICE_ADDRESSES_TRACKED:
                self._per_address.popitem(last=False)
        self._per_address[address] = bucket  # most recently seen last
        return bucket.take(now) and self._total.take(now)

    def answer(self) -> bytes:
        """The body for one client; an entry whose secret cannot be read is left out, and
        said in the log (budgeted) without the secret."""
        user_id = make_user_id(self._label, secrets.token_hex(6))
        servers, problems = self._servers.for_client(self._clock(), user_id, self._monotonic())
        for problem in problems:
            _log_config.log(logging.ERROR, "ICE servers: %s; the pages get that server no "
                            "more until it is fixed", problem, kind="ice-secret")
        return encode_answer(servers)

    async def handle(self, request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        address = address_key(request.remote or "")
        if not self.admit(address, self._monotonic()):
            _log_limited.log(logging.WARNING, "ICE servers: too many requests from %s: 429",
                             address, kind="ice-rate")
            headers["Retry-After"] = "1"
            return web.Response(status=429, text="too many requests\n", headers=headers)
        return web.Response(body=self.answer(), content_type="application/json",
                            headers=headers)


def build_app(supervisor: Supervisor) -> web.Application:
    app = web.Application()
    sig = supervisor.config.signalling
    ice = _IceServersEndpoint(PageIceServers.from_config(supervisor.config.ice_servers()),
                              supervisor.config.appliance.id)
    ice.answer()  # a secret file that cannot be read is in the log from the start

    async def root(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=p.MAX_FRAME_BYTES,
                                   compress=False)
        if not ws.can_prepare(request).ok:
            index = STATIC_DIR / "VideoCall.html"
            if index.exists():
                raise web.HTTPFound("/VideoCall.html")
            return web.Response(text="WebRTC-to-SIP appliance: signalling at wss://<host>/\n")
        await ws.prepare(request)
        await _Connection(supervisor, sig, ws, request.remote or "").run()
        return ws

    app.router.add_get("/", root)
    app.router.add_get(ICE_SERVERS_PATH, ice.handle)  # before the static files' catch-all
    if STATIC_DIR.is_dir():
        app.router.add_static("/", STATIC_DIR, show_index=False)
    return app


def build_runner(supervisor: Supervisor) -> web.AppRunner:
    """The public port's runner: aiohttp's keep-alive timer is our request-head timeout."""
    sig = supervisor.config.signalling
    return web.AppRunner(build_app(supervisor), access_log=None, handle_signals=False,
                         keepalive_timeout=sig.header_timeout)


class _Gate(asyncio.Protocol):
    """In front of aiohttp's per-connection protocol: counts the connection against the
    caps once TLS is up, and answers 503 itself when a cap is reached."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard,
                 trimmer: HeapTrimmer) -> None:
        self._inner = inner
        self._guard = guard
        self._trimmer = trimmer
        self._address: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = address_key(str(peer[0])) if peer else "?"
        refusal = self._guard.admit(address)
        if refusal is not None:
            _log_limited.log(logging.WARNING, "refused a connection from %s: %s "
                             "(%d open from there, %d in all)", address, refusal,
                             self._guard.open_from(address), self._guard.open_total,
                             kind="cap")
            body = f"{refusal}\n".encode()
            writer = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\n"
                            b"Content-Type: text/plain; charset=utf-8\r\nRetry-After: 10\r\n"
                            b"Connection: close\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
            writer.close()
            return
        self._address = address
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._address is None:
            return
        self._guard.closed(self._address)
        self._address = None
        self._inner.connection_lost(exc)
        self._trimmer.connection_closed()

    def data_received(self, data: bytes) -> None:
        if self._address is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._address is not None else None

    def pause_writing(self) -> None:
        if self._address is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._address is not None:
            self._inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCPSite with a TLS handshake timeout and the connection caps."""

    def __init__(self, runner: web.AppRunner, sig: SignallingConfig, **kwargs: Any) -> None:
        super().__init__(runner, sig.listen, sig.port, **kwargs)
        self.guard = ConnectionGuard(sig.max_connections, sig.max_connections_per_address)
        self._handshake_timeout = sig.handshake_timeout
        self.trimmer = HeapTrimmer()

    async def start(self) -> None:
        self._runner._reg_site(self)  # what BaseSite.start does; TCPSite.start is replaced
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self._handshake_timeout}
        self._server = await loop.create_server(
            lambda: _Gate(server(), self.guard, self.trimmer), self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port, **tls,
        )
