"""The public HTTPS port: the signalling WebSocket at `/` (and, later, the two pages)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from aiohttp import WSMsgType, web

from appliance import protocol as p
from supervisor.app import Supervisor

log = logging.getLogger("appliance.front")

STATIC_DIR = Path(__file__).resolve().parent.parent / "appliance" / "static"


class _WsSink:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    async def send_frame(self, data: bytes) -> None:
        if self.ws.closed:
            return
        # A browser that went away is released by the close path, not here.
        with contextlib.suppress(ConnectionError):
            await self.ws.send_str(data.decode())


def build_app(supervisor: Supervisor) -> web.Application:
    app = web.Application()

    async def root(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=p.MAX_FRAME_BYTES * 2)
        if not ws.can_prepare(request).ok:
            index = STATIC_DIR / "VideoCall.html"
            if index.exists():
                raise web.HTTPFound("/VideoCall.html")
            return web.Response(text="WebRTC-to-SIP appliance: signalling at wss://<host>/\n")
        await ws.prepare(request)
        conn = supervisor.open_conn(_WsSink(ws))
        peer = request.remote
        log.info("conn %d: WebSocket from %s", conn.id, peer)
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await supervisor.handle_frame(conn, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    log.info("conn %d: WebSocket error %s", conn.id, ws.exception())
        finally:
            supervisor.close_conn(conn)
            log.info("conn %d: WebSocket closed", conn.id)
        return ws

    app.router.add_get("/", root)
    if STATIC_DIR.is_dir():
        app.router.add_static("/", STATIC_DIR, show_index=False)
    return app
