"""SipEndpoint: the thin asyncio shell around a SipAgent on one UDP port (aioquic's shape).

Datagrams go into the agent with `loop.time()`; after every input the endpoint sends what
the agent returns, hands each event to the callback of the call it belongs to, and re-arms
ONE timer at the agent's earliest deadline. This is the only SIP module that touches a
socket or a clock, and the only one that resolves a name: the proxy's, once, at start, so
that the agent knows which source addresses are the proxy (sources.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from .agent import SipAgent
from .auth import Credentials
from .call import OutgoingCall
from .events import CallEvent, DialogUpdated, Terminated
from .message import SipParseError
from .orphan import DialogClosed, OrphanedDialog
from .session_timer import TimerSettings
from .snapshot import DialogSnapshot
from .sources import SourcePolicy
from .transaction import DEFAULT_TIMERS, Addr, TimerConfig

log = logging.getLogger("appliance.sip")

EventCallback = Callable[[CallEvent], None]
DialogCallback = Callable[[str, "DialogSnapshot | None"], None]


class SipEndpoint(asyncio.DatagramProtocol):
    def __init__(
        self,
        proxy: Addr,
        *,
        user_agent: str = "",
        timers: TimerConfig = DEFAULT_TIMERS,
        advertise: str | None = None,
        sources: SourcePolicy | None = None,
    ) -> None:
        self._proxy = proxy
        self._sources = sources  # None: the agent's default, the proxy as given
        self._advertise = advertise
        self._user_agent = user_agent
        self._timers = timers
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._agent: SipAgent | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._callbacks: dict[str, EventCallback] = {}
        self._closed = self._loop.create_future()
        # Told of every confirmed dialog (snapshot) and of its end (None), by Call-ID: the
        # worker keeps the supervisor's copy, for BYE should this process die (snapshot.py).
        self.on_dialog: DialogCallback | None = None

    @classmethod
    async def create(
        cls,
        local: Addr,
        proxy: Addr,
        *,
        user_agent: str = "",
        timers: TimerConfig = DEFAULT_TIMERS,
        advertise: str | None = None,
        allowed_sources: Sequence[str] = (),
        strict_source_port: bool = False,
    ) -> SipEndpoint:
        """Bind `local` (port 0 picks a free one) and return the running endpoint.

        `advertise` is the host our Via, Contact and From name; by default the bound one,
        or for a wildcard bind (0.0.0.0) the address the system would send to the proxy from.
        SIP is accepted from the proxy (every address its name resolves to now), from
        `allowed_sources` (addresses or networks) and from each call's own peers; with
        `strict_source_port` a peer's port must match too (sources.py).
        """
        loop = asyncio.get_running_loop()
        sources = SourcePolicy(
            await _resolve(proxy), allowed_sources, strict_port=strict_source_port
        )
        _, protocol = await loop.create_datagram_endpoint(
            lambda: cls(
                proxy, user_agent=user_agent, timers=timers, advertise=advertise, sources=sources
            ),
            local_addr=local,
        )
        return protocol

    @property
    def agent(self) -> SipAgent:
        if self._agent is None:
            raise RuntimeError("endpoint not bound")
        return self._agent

    @property
    def local_address(self) -> Addr:
        return self.agent.local

    @property
    def stats(self) -> dict[str, int]:
        """`sip_parse_errors`, `sip_refused_source`, `sip_replies_limited` since start."""
        return self.agent.stats if self._agent is not None else {}

    # ------------------------------------------------------------------ the owner's commands

    def place_call(
        self,
        caller: str,
        callee: str,
        local_sdp: str,
        on_event: EventCallback,
        *,
        caller_display: str | None = None,
        callee_display: str | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
        credentials: Credentials | tuple[str, str] | None = None,
        ring_timeout: float | None = None,
        session_timer: TimerSettings | None = None,
    ) -> OutgoingCall:
        """Send an INVITE now; every event of the call goes to `on_event`, Terminated last.
        `session_timer`: RFC 4028 towards the peer (session_timer.py); None: none."""
        call = self.agent.create_call(
            caller,
            callee,
            local_sdp,
            caller_display=caller_display,
            callee_display=callee_display,
            extra_headers=extra_headers,
            credentials=credentials,
            ring_timeout=ring_timeout,
        )
        self._callbacks[call.call_id] = on_event
        call.reports_dialog = self.on_dialog is not None
        try:
            if session_timer is not None:
                call.use_session_timer(session_timer)
            call.start(self._loop.time())
        except Exception:
            self.agent.calls.pop(call.call_id, None)
            self._callbacks.pop(call.call_id, None)
            raise
        self._transmit()
        return call

    def hangup(self, call_id: str) -> None:
        """BYE if answered, CANCEL if still ringing; a call already gone is ignored."""
        call = self.agent.calls.get(call_id)
        if call is not None:
            call.hangup(self._loop.time())
            self._transmit()

    def send_info_dtmf(self, call_id: str, key: str, duration_ms: int = 160) -> bool:
        call = self.agent.calls.get(call_id)
        if call is None:
            return False
        sent = call.send_info_dtmf(key, duration_ms, self._loop.time())
        self._transmit()
        return sent

    def close_dialogs(
        self,
        snapshots: Iterable[DialogSnapshot],
        on_closed: Callable[[DialogClosed], None],
        *,
        cause: int,
        credentials: Credentials | None = None,
    ) -> int:
        """BYE for each dialog another process left confirmed (orphan.py), from this port;
        `on_closed` gets each outcome. Returns how many BYEs went out."""
        now = self._loop.time()
        count = 0
        for snapshot in snapshots:
            if snapshot.call_id in self.agent.calls:
                continue  # a call of ours already (cannot happen: Call-IDs are random)
            try:
                orphan = OrphanedDialog(snapshot, local=self.agent.local,
                                        user_agent=self._user_agent, credentials=credentials,
                                        timers=self._timers, cause=cause)
            except SipParseError as exc:
                log.warning("cannot end dialog %s: unreadable snapshot: %s",
                            snapshot.call_id, exc)
                continue
            # Routed by Call-ID like a call of ours (it speaks the same sans-IO interface).
            self.agent.calls[orphan.call_id] = orphan  # type: ignore[assignment]
            self._callbacks[orphan.call_id] = _closed_callback(on_closed)
            orphan.start(now)
            count += 1
        self._transmit()
        return count

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport.
        transport = cast(asyncio.DatagramTransport, transport)
        self._transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        host = self._advertise or host
        if host in ("0.0.0.0", "::"):
            host = _source_address_towards(self._proxy)
        self._agent = SipAgent(
            (host, port), self._proxy, user_agent=self._user_agent, timers=self._timers,
            sources=self._sources,
        )

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.agent.receive_datagram(data, (addr[0], addr[1]), self._loop.time())
        self._transmit()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the transactions' timers handle the silence.
        log.debug("SIP socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._closed.done():
            self._closed.set_result(None)

    # ------------------------------------------------------------------ the shell

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.agent.handle_timer(self._loop.time())
        self._transmit()

    def _transmit(self) -> None:
        agent = self.agent
        datagrams = agent.datagrams_to_send()  # drained even when closing: never pile up
        if self._transport is not None and not self._transport.is_closing():
            for data, addr in datagrams:
                self._transport.sendto(data, addr)
        while (event := agent.next_event()) is not None:
            if isinstance(event, DialogUpdated):
                if self.on_dialog is not None:
                    self._tell_dialog(event)
                continue
            callback = self._callbacks.get(event.call_id)
            if isinstance(event, Terminated):
                self._callbacks.pop(event.call_id, None)
            if callback is None:
                continue
            try:
                callback(event)
            except Exception:
                log.exception("SIP event callback failed for call %s", event.call_id)
        self._rearm(agent.get_timer())

    def _tell_dialog(self, event: DialogUpdated) -> None:
        assert self.on_dialog is not None
        try:
            self.on_dialog(event.call_id, event.snapshot)
        except Exception:
            log.exception("dialog callback failed for call %s", event.call_id)

    def _rearm(self, deadline: float | None) -> None:
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)


def _closed_callback(on_closed: Callable[[DialogClosed], None]) -> EventCallback:
    def callback(event: CallEvent) -> None:
        if isinstance(event, DialogClosed):
            on_closed(event)

    return callback


async def _resolve(proxy: Addr) -> list[Addr]:
    """Every address of the proxy's host (an IP literal is its own). A name that does not
    resolve now is kept as is: calls to it fail on their own, and nothing is let in by it."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy[0], proxy[1], type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        log.warning("cannot resolve the SIP proxy %s: %s", proxy[0], exc)
        return [proxy]
    return [proxy, *((str(info[4][0]), proxy[1]) for info in infos)]


def _source_address_towards(dest: Addr) -> str:
    """The local address the kernel would use to reach `dest`. connect() on a UDP socket
    only consults the routing table: no packet leaves."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(dest)
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1" if family == socket.AF_INET else "::1"
