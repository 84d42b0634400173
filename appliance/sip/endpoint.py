"""SipEndpoint: the thin asyncio shell around a SipAgent on one UDP port (aioquic's shape).

Datagrams go into the agent with `loop.time()`; after every input the endpoint sends what
the agent returns, hands each event to the callback of the call it belongs to, and re-arms
ONE timer at the agent's earliest deadline. This is the only SIP module that touches a
socket or a clock.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import cast

from .agent import SipAgent
from .auth import Credentials
from .call import OutgoingCall
from .events import CallEvent, Terminated
from .transaction import DEFAULT_TIMERS, Addr, TimerConfig

log = logging.getLogger("appliance.sip")

EventCallback = Callable[[CallEvent], None]


class SipEndpoint(asyncio.DatagramProtocol):
    def __init__(
        self,
        proxy: Addr,
        *,
        user_agent: str = "",
        timers: TimerConfig = DEFAULT_TIMERS,
        advertise: str | None = None,
    ) -> None:
        self._proxy = proxy
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

    @classmethod
    async def create(
        cls,
        local: Addr,
        proxy: Addr,
        *,
        user_agent: str = "",
        timers: TimerConfig = DEFAULT_TIMERS,
        advertise: str | None = None,
    ) -> SipEndpoint:
        """Bind `local` (port 0 picks a free one) and return the running endpoint.

        `advertise` is the host our Via, Contact and From name; by default the bound one,
        or for a wildcard bind (0.0.0.0) the address the system would send to the proxy from.
        """
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: cls(proxy, user_agent=user_agent, timers=timers, advertise=advertise),
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
    ) -> OutgoingCall:
        """Send an INVITE now; every event of the call goes to `on_event`, Terminated last."""
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
        try:
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
            (host, port), self._proxy, user_agent=self._user_agent, timers=self._timers
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

    def _rearm(self, deadline: float | None) -> None:
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)


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
