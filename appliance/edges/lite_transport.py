"""The worker's one media port for every call (issue 12, decision record 0006): one UDP
socket and one ICE-TCP listener per configured address, answered as ICE-lite by
`appliance.ice.lite.LiteAgent`, under aiortc's own DTLS-SRTP, RTP senders and
`rtc_adapter.SrtpFastPath`.

What this module owns - the I/O edge and the aiortc glue; the ICE logic is LiteAgent's:
- `WorkerMediaPort`: the sockets, and the one LiteAgent every UDP datagram and every RFC
  4571 frame goes through. The agent's answers go back on the path they came from, its
  media to the session's `LiteConnection`, its events onto that connection (decision 0006,
  "Consequences"): Nominated, and SelectedPathChanged after it, select the pair aiortc and
  the fast path send on; ConsentLost ends the call with `failure = "consent expired"`; no
  nomination within `connect_timeout` ends it with "no nomination". The agent's consent
  deadlines and ours share one `loop.call_at`, armed on the earliest (no tick).
- The UDP side (`SharedUdpPort`, `UdpPair`): one socket per address, sent on directly
  (a full socket buffer drops a datagram, counted; asyncio would queue without bound).
- ICE-TCP, RFC 6544's passive side, is its own module (ice_tcp.py: `IceTcpEdge`, its
  connections' caps, deadlines and bounded writers, `TcpPair`). The port owns one edge
  and shares its agent with it; what the agent makes of a frame comes back to the port's
  `_media` and `_on_events`, as from a datagram.
- `LiteConnection`: stands in for aioice's `Connection` under aiortc's RTCIceGatherer and
  RTCIceTransport; `use_lite_transport(pc, port)` swaps it in after setRemoteDescription.
  Its selected pair (`UdpPair` or `TcpPair`) has `send(data)`: a TCP pair frames, so the
  fast path sends over TCP unchanged.

aiortc touches a connection only through the members listed in `CONNECTION_MEMBERS`;
`check_lite_hooks()` reads aiortc's source for `_connection.<name>` and fails if it ever
uses one we do not provide (aiortc is pinned; an upgrade must fail in CI, not in a rack);
rtc_adapter.check_hooks() runs it. Nothing here is the worker's default transport yet.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import ipaddress
import itertools
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from aioice import Candidate, ConnectionClosed
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc import RTCPeerConnection
from aiortc.rtcicetransport import RTCIceParameters, RTCIceTransport

from appliance import native
from appliance.core.throttle import Tally
from appliance.edges.ice_tcp import IceTcpEdge, TcpPair, TcpSettings
from appliance.ice.lite import (
    ConsentLost,
    Credentials,
    Event,
    LiteAgent,
    LiteError,
    Nominated,
    Path,
    Received,
    SelectedPathChanged,
    new_credentials,
    udp_path,
)
from appliance.media.datagrams import fits

log = logging.getLogger("appliance.rtc")

Addr = tuple[str, int]

# RFC 8445 section 5.1.2.1 / RFC 6544 section 4.2: UDP host candidates keep the top local
# preference; a passive TCP one gets 2^13 * direction-pref (passive: 4) + other-pref, so
# every UDP candidate sorts before every TCP one. Address i of the port takes pref - i.
UDP_LOCAL_PREF = 65535
TCP_PASSIVE_LOCAL_PREF = (1 << 13) * 4 + 8191
_MAX_ADDRESSES = 16  # a worker announces one address per family, maybe a few more
ICE_TRANSPORTS_ATTR = "_RTCPeerConnection__iceTransports"
_SOCKET_BUFFER = 1 << 20  # every call's packets share one UDP socket's buffers
_REMOTE_CANDIDATES_KEPT = 16

# What aiortc (rtcicetransport, rtcpeerconnection, rtcdtlstransport) and rtc_adapter's
# SrtpFastPath read or call on `_connection`; LiteConnection provides each of them.
CONNECTION_MEMBERS = frozenset({
    "ice_controlling", "remote_is_lite", "remote_username", "remote_password",
    "local_username", "local_password", "local_candidates", "remote_candidates",
    "gather_candidates", "add_remote_candidate", "connect", "close", "get_event", "recv",
    "send", "data_received", "_nominated",
})
# Of those, the ones LiteConnection sets on the instance (the rest are class members).
_INSTANCE_MEMBERS = frozenset({"ice_controlling", "remote_is_lite", "remote_username",
                               "remote_password", "_nominated"})


class BindAnnounce(Protocol):
    """Where to bind and what to announce: rtc_adapter.HostAddress (not imported here, so
    rtc_adapter can import this module for its hook checks without a cycle)."""

    @property
    def bind(self) -> str: ...

    @property
    def announce(self) -> str: ...


_TCP_DEFAULTS = TcpSettings()


@dataclass(frozen=True)
class LiteSettings:
    consent_timeout: float = 30.0  # RFC 7675: no valid check on the selected path
    connect_timeout: float = 30.0  # no nomination at all (the leg's dtls_timeout is shorter)
    max_calls: int = 1024  # per port; the worker's channels bound it first
    max_paths: int = 8  # per call: a browser checks from each of its candidates
    check_rate: float = 50.0  # checks per call per second we verify (HMACs we compute)
    check_burst: float = 100.0
    queue: int = 256  # datagrams waiting for aiortc's DTLS reader (the fast path takes SRTP)
    # Drain the UDP socket with the native loop (appliance.native: recvmmsg in batches) when
    # it is built; what it does not relay itself comes up as before.
    native_loop: bool = False
    # ICE-TCP: ice_tcp.TcpSettings' fields, its defaults and its bounds (and consent_timeout).
    tcp_send_buffer: int = _TCP_DEFAULTS.tcp_send_buffer
    max_tcp_connections: int = _TCP_DEFAULTS.max_tcp_connections
    max_tcp_per_address: int = _TCP_DEFAULTS.max_tcp_per_address
    tcp_first_check_timeout: float = _TCP_DEFAULTS.tcp_first_check_timeout
    tcp_max_frame: int = _TCP_DEFAULTS.tcp_max_frame

    def __post_init__(self) -> None:
        if min(self.consent_timeout, self.connect_timeout, self.check_rate,
               self.check_burst) <= 0:
            raise ValueError("timeouts and check rates must be > 0")
        if min(self.max_calls, self.max_paths, self.queue) < 1:
            raise ValueError("counts and caps must be >= 1")
        self.tcp()  # ValueError if a TCP bound is out of range

    def tcp(self) -> TcpSettings:
        """The ICE-TCP edge's share of these settings."""
        return TcpSettings(**{f.name: getattr(self, f.name) for f in fields(TcpSettings)})


@dataclass
class PortCounters:
    """The port's own counters since it opened (the agent and the TCP edge have theirs)."""

    no_nomination: int = 0  # calls never nominated within connect_timeout
    rx_queue_drops: int = 0  # aiortc's DTLS reader was behind
    udp_oversized: int = 0  # empty, or over MAX_DATAGRAM
    udp_send_errors: int = 0  # full socket buffer, or an ICMP error surfacing


def _normalise(ip: str) -> str:
    """An IPv4 peer as itself: a dual-stack socket reports it as ::ffff:a.b.c.d, but the
    browser knows its address as a.b.c.d (XOR-MAPPED-ADDRESS), and so must its path. Per
    datagram, so a string test, not netaddr.normal_ip (which ice_tcp uses per connection:
    its cache would churn under spoofed sources)."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class UdpPair:
    """A call's selected pair on UDP: what LiteConnection and SrtpFastPath send with."""

    __slots__ = ("_dest", "_socket", "path", "remote_addr")

    def __init__(self, sock: SharedUdpPort, dest: tuple[Any, ...], path: Path) -> None:
        self._socket = sock
        self._dest = dest  # as the kernel reported it (a dual-stack socket wants ::ffff:)
        self.path = path
        self.remote_addr: Addr = (path[1], path[2])

    def send(self, data: bytes) -> None:
        self._socket.sendto(data, self._dest)

    @property
    def socket(self) -> SharedUdpPort:
        return self._socket

    @property
    def dest(self) -> tuple[Any, ...]:
        """The browser's address as the kernel reports it (::ffff:-mapped on dual stack)."""
        return self._dest


SelectedPair = UdpPair | TcpPair


_handler_failed = Tally(log, "media datagrams whose handling raised (the rest of the batch "
                            "went on)")


class SharedUdpPort(asyncio.DatagramProtocol):
    """One bound address's UDP socket: every call's ICE, DTLS and SRTP on it. Read by
    asyncio's datagram transport, or - `native` - drained by the native loop from a reader
    callback, which hands up what it does not relay itself."""

    def __init__(self, port: WorkerMediaPort, sock: socket.socket, announce: str) -> None:
        self._port = port
        self._agent = port._agent
        self._sock = sock
        self.announce = announce
        self.port = int(sock.getsockname()[1])
        self.transport: asyncio.DatagramTransport | None = None
        self.native: Any = None  # appliance.native's PortLoop on this socket

    @property
    def fileno(self) -> int:
        """The socket's descriptor (the native loop sends a phone's voice from it)."""
        return self._sock.fileno()

    def use_native(self) -> None:
        """Drain this socket with the native loop (instead of a datagram transport)."""
        self.native = native.module().PortLoop(self._sock.fileno())
        self._port._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        loop = self._port._loop
        # time.monotonic(), not loop.time(): uvloop's clock is cached per iteration, in
        # milliseconds (8 units of an 8 kHz clock: jitter the meters would invent).
        for data, addr in self.native.drain(time.monotonic(), time.time()):
            try:
                self.datagram_received(data, addr)
            except Exception as exc:  # one datagram's failure must not drop the batch
                _handler_failed.note(loop.time(), (str(addr[0]), int(addr[1])),
                                     f"{type(exc).__name__}: {exc}")

    def native_stats(self) -> dict[str, int]:
        return self.native.stats() if self.native is not None else {}

    def close(self) -> None:
        if self.native is not None:
            self._port._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        elif self.transport is not None:
            self.transport.close()
        else:
            self._sock.close()

    def sendto(self, data: bytes, dest: tuple[Any, ...]) -> None:
        # Straight on the socket: asyncio's transport would queue without bound when the
        # socket buffer is full; a real-time datagram is dropped instead (counted).
        try:
            self._sock.sendto(data, dest)
        except OSError:
            self._port.counters.udp_send_errors += 1

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        port = self._port
        if not isinstance(data, bytes) or not fits(data):
            port.counters.udp_oversized += 1
            return
        path = udp_path(_normalise(addr[0]), addr[1])
        out = self._agent.receive(path, data, port._loop.time())
        if out.media is not None:
            port._media(out)
            return
        if out.reply is not None:
            self.sendto(out.reply, addr)
        if out.events:
            port._on_events(out.events, UdpPair(self, addr, path))

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier datagram (a browser gone): consent will tell.
        self._port.counters.udp_send_errors += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._port._socket_lost()


class WorkerMediaPort:
    """The worker's one UDP and one TCP media port (per configured address) for every
    call; see the module docstring."""

    def __init__(self, settings: LiteSettings = LiteSettings()) -> None:
        self.settings = settings
        self.counters = PortCounters()
        self._agent = LiteAgent(
            max_sessions=settings.max_calls, max_paths=settings.max_paths,
            consent_timeout=settings.consent_timeout, check_rate=settings.check_rate,
            check_burst=settings.check_burst)
        self._loop = asyncio.get_running_loop()
        self._udp: list[SharedUdpPort] = []
        self._tcp = IceTcpEdge(self._agent, settings.tcp(), self._media, self._on_events)
        self._conns: dict[str, LiteConnection] = {}
        # Connect deadlines: (when, serial, ufrag); stale entries are skipped when due.
        self._connect_deadlines: list[tuple[float, int, str]] = []
        self._serials = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False

    @classmethod
    async def open(cls, addresses: Sequence[BindAnnounce], udp_port: int, tcp_port: int,
                   settings: LiteSettings = LiteSettings()) -> WorkerMediaPort:
        """Bind `udp_port` (0: an ephemeral one) and, unless `tcp_port` is 0, listen on
        `tcp_port` on every address's `bind`; announce its `announce`. OSError if a port
        is taken (nothing stays bound then)."""
        if not 1 <= len(addresses) <= _MAX_ADDRESSES:
            raise ValueError(f"1..{_MAX_ADDRESSES} addresses")
        if not (0 <= udp_port <= 0xFFFF and 0 <= tcp_port <= 0xFFFF):
            raise ValueError("ports are 0..65535")
        self = cls(settings)
        try:
            for address in addresses:
                await self._open_udp(address, udp_port)
                if tcp_port:
                    await self._tcp.listen(address.bind, address.announce, tcp_port)
        except BaseException:
            self.close()
            raise
        return self

    async def _open_udp(self, address: BindAnnounce, port: int) -> None:
        sock = socket.socket(_family(address.bind), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            sock.bind((address.bind, port))
        except OSError:
            sock.close()
            raise
        shared = SharedUdpPort(self, sock, address.announce)
        self._udp.append(shared)
        if self.settings.native_loop and native.AVAILABLE:
            shared.use_native()
        else:
            await self._loop.create_datagram_endpoint(lambda: shared, sock=sock)

    @property
    def native_loop(self) -> bool:
        """Whether the native loop drains this port's UDP sockets."""
        return bool(self._udp) and all(shared.native is not None for shared in self._udp)

    # -- what the worker reads ------------------------------------------------------------

    @property
    def udp_port(self) -> int:
        return self._udp[0].port

    @property
    def tcp_port(self) -> int:
        """0 when there is no TCP listener."""
        listeners = self._tcp.listeners
        return listeners[0][1] if listeners else 0

    @property
    def calls(self) -> int:
        return len(self._conns)

    def stats(self) -> dict[str, int]:
        """Counters since the port opened, for WorkerStats and /metrics: the agent's
        (lite.LiteCounters: checks, valid_checks, bad_integrity, unknown_ufrag,
        unknown_path_drops, consent_lost, checks_over_rate, ...), this edge's
        (PortCounters: no_nomination, rx_queue_drops, udp_oversized, udp_send_errors), the
        TCP edge's (ice_tcp.TcpCounters: tcp_accepted, tcp_refused, tcp_not_ice,
        tcp_first_check_timeouts, tcp_idle_timeouts, tcp_frames_dropped; no name is in two),
        and the gauges `calls` and `tcp_open`."""
        out = self._agent.counters.as_dict()
        for counters in (self.counters, self._tcp.counters):
            out.update({f.name: getattr(counters, f.name) for f in fields(counters)})
        out["calls"] = len(self._conns)
        out["tcp_open"] = self._tcp.open_connections
        out["native_loop"] = int(self.native_loop)
        for key in ("datagrams", "routed_in", "relayed", "handed_up", "oversized",
                    "send_errors"):
            out[f"native_{key}"] = sum(s.native_stats().get(key, 0) for s in self._udp)
        out["udp_oversized"] += out["native_oversized"]  # too long for media either way
        return out

    def close(self) -> None:
        """Close every socket and end every call on them ("the media port closed")."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ufrag in list(self._conns):
            self._release(ufrag, "the media port closed")
        self._tcp.close()
        for shared in self._udp:
            shared.close()

    # -- calls ----------------------------------------------------------------------------

    def connection(self, *, tcp_only: bool = False) -> LiteConnection:
        """A new call's ICE-lite side: random credentials, this port's candidates (only
        the TCP ones with `tcp_only`). ConnectionError if the port is closed or full."""
        if self._closed:
            raise ConnectionError("the media port is closed")
        if tcp_only and not self._tcp.listeners:
            raise ValueError("tcp_only, but this port has no TCP listener")
        while True:
            creds = new_credentials()
            try:
                ufrag = self._agent.register(creds)
                break
            except LiteError as exc:
                if creds.ufrag not in self._agent:  # full, not a (95-bit) coincidence
                    raise ConnectionError(f"the media port is full: {exc}") from None
        serial = next(self._serials)
        conn = LiteConnection(self, creds, self._candidates(tcp_only), serial)
        self._conns[ufrag] = conn
        heap = self._connect_deadlines
        if len(heap) > 2 * len(self._conns) + 64:
            heap[:] = [e for e in heap if self._connect_pending(e)]
            heapq.heapify(heap)
        heapq.heappush(heap, (self._loop.time() + self.settings.connect_timeout, serial, ufrag))
        self._arm()
        return conn

    def _candidates(self, tcp_only: bool) -> list[Candidate]:
        out: list[Candidate] = []
        if not tcp_only:
            for i, shared in enumerate(self._udp):
                out.append(Candidate(
                    foundation=candidate_foundation("host", "udp", shared.announce),
                    component=1, transport="udp",
                    priority=candidate_priority(1, "host", UDP_LOCAL_PREF - i),
                    host=shared.announce, port=shared.port, type="host"))
        for i, (announce, port) in enumerate(self._tcp.listeners):
            out.append(Candidate(
                foundation=candidate_foundation("host", "tcp", announce),
                component=1, transport="tcp",
                priority=candidate_priority(1, "host", TCP_PASSIVE_LOCAL_PREF - i),
                host=announce, port=port, type="host", tcptype="passive"))
        return out

    def _set_remote(self, ufrag: str, remote: Credentials) -> None:
        self._agent.set_remote(ufrag, remote)  # LiteError if malformed

    def forget(self, ufrag: str) -> None:
        """The call is closing (LiteConnection.close): its checks go unanswered now."""
        self._agent.remove(ufrag)
        self._conns.pop(ufrag, None)

    def _release(self, ufrag: str, reason: str) -> None:
        self._agent.remove(ufrag)
        conn = self._conns.pop(ufrag, None)
        if conn is not None:
            log.info("ICE-lite: call %s released: %s", ufrag, reason)
            conn._shutdown(reason)

    # -- what the sockets hand in ---------------------------------------------------------

    def _media(self, out: Received) -> None:
        conn = self._conns.get(out.session) if out.session is not None else None
        if conn is not None and out.media is not None:
            # Looked up on each datagram: SrtpFastPath replaces it on the instance.
            conn.data_received(out.media, 1)

    def _on_events(self, events: Sequence[Event], pair: SelectedPair) -> None:
        """The events of one check, which came on `pair.path`: a route-changing event
        names the path its check came from (LiteAgent), so `pair` is where it points."""
        for event in events:
            conn = self._conns.get(event.session)
            if conn is None:
                continue
            if isinstance(event, Nominated) and event.path == pair.path:
                conn._select(pair, nominated=True)
            elif (isinstance(event, SelectedPathChanged) and event.path == pair.path
                  and conn.nominated):
                # The browser moved, or re-checked after its route's TCP connection closed.
                conn._select(pair, nominated=True)
            # PathValidated: the route before nomination; aiortc waits for the nomination.
        self._arm()  # a first validation scheduled a consent deadline

    def _socket_lost(self) -> None:
        if not self._closed:
            log.warning("ICE-lite: a media socket closed under the port; closing it")
            self.close()

    # -- deadlines: the agent's consent and our connect deadlines, one timer --------------

    def _connect_pending(self, entry: tuple[float, int, str]) -> bool:
        conn = self._conns.get(entry[2])
        return conn is not None and conn._serial == entry[1] and not conn.nominated

    def _next_deadline(self) -> float | None:
        heap = self._connect_deadlines
        while heap and not self._connect_pending(heap[0]):
            heapq.heappop(heap)
        consent = self._agent.next_deadline()
        connect = heap[0][0] if heap else None
        if consent is None or connect is None:
            return consent if connect is None else connect
        return min(consent, connect)

    def _arm(self) -> None:
        if self._closed:
            return
        when = self._next_deadline()
        if when is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return  # it fires first, does what is due, and re-arms
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        for event in self._agent.timer(now):
            if isinstance(event, ConsentLost):
                self._release(event.session, "consent expired")
        heap = self._connect_deadlines
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._connect_pending(entry):
                self.counters.no_nomination += 1
                self._release(entry[2], "no nomination")
        self._arm()


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


class LiteConnection:
    """One call's ICE-lite side, in the shape of aioice's `Connection` as aiortc uses it
    (see CONNECTION_MEMBERS): no sockets of its own, no checks sent, no consent timer of
    its own - the port answers checks and keeps the deadlines."""

    def __init__(self, port: WorkerMediaPort, creds: Credentials,
                 candidates: list[Candidate], serial: int) -> None:
        self._port = port
        self._creds = creds
        self._candidates = candidates
        self._serial = serial
        self.ice_controlling = False  # a lite agent is always controlled
        self.remote_is_lite = False
        self.remote_username: str | None = None
        self.remote_password: str | None = None
        self._remote_candidates: list[Candidate] = []  # kept for getStats-like readers only
        self._gathered = False
        self._nominated: dict[int, SelectedPair] = {}
        self.nominated = False  # the browser nominated a pair (and may move it since)
        self._rx: deque[bytes] = deque()
        self._rx_waiter: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        self._connected: asyncio.Future[None] = loop.create_future()
        self._event_waiter: asyncio.Future[None] | None = None
        self.failure: str | None = None  # why the transport ended, for the release cause
        self.queue_drops = 0
        # Called with the new selected pair when it changes, and with None when the
        # connection ends (the native relay follows a browser that moves).
        self.on_select: list[Callable[[SelectedPair | None], None]] = []

    def __repr__(self) -> str:
        return f"LiteConnection({self._creds.ufrag})"

    # -- what RTCIceGatherer reads ------------------------------------------------------

    @property
    def local_username(self) -> str:
        return self._creds.ufrag

    @property
    def local_password(self) -> str:
        return self._creds.pwd

    def local_parameters(self) -> RTCIceParameters:
        """Replaces the gatherer's getLocalParameters: iceLite makes aiortc's SDP writer
        put `a=ice-lite` at session level in the answer."""
        return RTCIceParameters(usernameFragment=self._creds.ufrag, password=self._creds.pwd,
                                iceLite=True)

    @property
    def local_candidates(self) -> list[Candidate]:
        # Empty before gathering, as aioice: aiortc's __connect starts ICE on the first
        # call that finds candidates, and must not before the answer is set.
        return list(self._candidates) if self._gathered else []

    async def gather_candidates(self) -> None:
        self._gathered = True  # our candidates are the worker's ports: nothing to gather

    # -- what RTCIceTransport sets and calls ------------------------------------------------

    @property
    def remote_candidates(self) -> list[Candidate]:
        return list(self._remote_candidates)

    async def add_remote_candidate(self, candidate: Candidate | None) -> None:
        # A lite agent learns the browser's address from its checks; signalled candidates
        # are never contacted (nor mDNS-resolved). A few are kept for inspection.
        if candidate is not None and len(self._remote_candidates) < _REMOTE_CANDIDATES_KEPT:
            self._remote_candidates.append(candidate)

    async def connect(self) -> None:
        """Returns once the browser nominated a pair (USE-CANDIDATE in a valid check);
        ConnectionError if the connection closes first (the port's connect deadline) or
        the offer's ice-ufrag/ice-pwd are malformed."""
        if self.remote_username is None or self.remote_password is None:
            raise ConnectionError("Remote username or password is missing")
        if self.failure is None:
            try:
                # From now on every check must name the browser's ufrag (RFC 8445 7.3).
                self._port._set_remote(self._creds.ufrag, Credentials(
                    self.remote_username, self.remote_password))
            except LiteError:
                self._port._release(self._creds.ufrag, "malformed remote ICE credentials")
        await asyncio.shield(self._connected)

    async def get_event(self) -> ConnectionClosed:
        # RTCIceTransport's monitor waits for this (one waiter at a time, as aioice); it
        # never returns None (aiortc's monitor would spin on None after a close).
        if self.failure is None:
            self._event_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._event_waiter
            finally:
                self._event_waiter = None
        return ConnectionClosed()

    async def recv(self) -> bytes:
        while not self._rx:
            if self.failure is not None:
                raise ConnectionError(f"ICE-lite: {self.failure}")
            self._rx_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._rx_waiter
            finally:
                self._rx_waiter = None
        if self.failure is not None:
            raise ConnectionError(f"ICE-lite: {self.failure}")
        return self._rx.popleft()

    async def recvfrom(self) -> tuple[bytes, int]:
        return await self.recv(), 1

    async def send(self, data: bytes) -> None:
        await self.sendto(data, 1)

    async def sendto(self, data: bytes, component: int) -> None:
        pair = self._nominated.get(component)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        pair.send(data)

    async def close(self) -> None:
        self._port.forget(self._creds.ufrag)
        self._shutdown("closed")

    # -- what the port calls --------------------------------------------------------------

    def data_received(self, data: bytes, component: int) -> None:
        """A datagram from one of this call's paths. SrtpFastPath wraps this (as it wraps
        aioice's) and passes on only what is not relayed SRTP."""
        if self.failure is not None:
            return
        if len(self._rx) >= self._port.settings.queue:
            self.queue_drops += 1
            self._port.counters.rx_queue_drops += 1
            return
        self._rx.append(data)
        if self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_result(None)

    def _select(self, pair: SelectedPair, *, nominated: bool) -> None:
        if self.failure is not None:
            return
        previous = self._nominated.get(1)
        self._nominated[1] = pair
        if previous is not None and previous is not pair and (
                getattr(previous, "path", None) != getattr(pair, "path", None)):
            self._notify(pair)
        self.nominated = self.nominated or nominated
        if not self._connected.done():
            self._connected.set_result(None)

    def _notify(self, pair: SelectedPair | None) -> None:
        for observer in list(self.on_select):
            try:
                observer(pair)
            except Exception:  # an observer's bug must not break the transport
                log.exception("ICE-lite: a selected-pair observer failed")

    def _shutdown(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._nominated.clear()  # SrtpFastPath stops sending when there is no pair
        self._notify(None)
        self._rx.clear()
        # The ICE monitor is woken before the DTLS reader (asyncio runs them in this
        # order): the peer connection then goes "failed" - what the leg releases on -
        # before aiortc sees DTLS closed and closes the whole pc ("closed").
        if self._event_waiter is not None and not self._event_waiter.done():
            self._event_waiter.set_result(None)
        if self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_result(None)
        if not self._connected.done():
            self._connected.set_exception(ConnectionError(f"ICE-lite: {reason}"))
            self._connected.exception()  # retrieved: nobody may be awaiting connect()


def offer_without_candidates(sdp: str) -> str:
    """The offer minus its `a=candidate` lines: a lite agent never contacts them, and
    aiortc would otherwise hand them to the throw-away aioice Connection (mDNS names are
    resolved there, on the network, during setRemoteDescription)."""
    return "".join(line for line in sdp.splitlines(keepends=True)
                   if not line.startswith("a=candidate:"))


def swap_ice_connection(transport: RTCIceTransport, conn: Any) -> None:
    """Put `conn` in place of an RTCIceTransport's aioice Connection (and its gatherer's):
    the one place these private hooks are written."""
    transport.iceGatherer._connection = conn
    transport._connection = conn
    # RTCIceTransport bound these at construction; RTCDtlsTransport calls them.
    transport._recv = conn.recv
    transport._send = conn.send


async def use_lite_transport(pc: RTCPeerConnection, port: WorkerMediaPort, *,
                             tcp_only: bool = False) -> list[LiteConnection]:
    """Put `pc`'s ICE on the worker's media port: call after setRemoteDescription(offer)
    and before createAnswer/setLocalDescription. One LiteConnection per ICE transport (one
    with BUNDLE). `tcp_only` (the offer's protocol "TCP"): announce only the TCP
    candidates. ValueError if the offer is ICE-lite too (two lite agents cannot connect)
    or `tcp_only` on a port without TCP; ConnectionError if the port is closed or full."""
    if pc.signalingState != "have-remote-offer":
        raise RuntimeError("use_lite_transport needs a remote offer and no answer yet")
    transports = getattr(pc, ICE_TRANSPORTS_ATTR)
    conns: list[LiteConnection] = []
    for transport in list(transports):
        old = transport._connection
        if isinstance(old, LiteConnection):
            conns.append(old)
            continue
        if old._local_candidates_start:
            raise RuntimeError("ICE gathering already started on this peer connection")
        if old.ice_controlling:  # aiortc set it from the offer's a=ice-lite
            raise ValueError("the offer is ICE-lite: it cannot connect to an ICE-lite answer")
        conn = port.connection(tcp_only=tcp_only)
        swap_ice_connection(transport, conn)
        transport.iceGatherer.getLocalParameters = conn.local_parameters  # type: ignore
        conns.append(conn)
        await old.close()  # it never gathered: no socket, no task; this drops its state
    return conns


def _connection_uses(sources: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for text in sources:
        found.update(re.findall(r"_connection\.(\w+)", text))
    return found


def check_lite_hooks() -> None:
    """Raise AssertionError if aiortc moved a hook this module relies on, or started using
    a member of its ICE connection that LiteConnection does not provide. Needs a running
    event loop (it builds an RTCPeerConnection)."""
    import aiortc.rtcdtlstransport
    import aiortc.rtcicetransport
    import aiortc.rtcpeerconnection
    from aiortc import RTCConfiguration

    uses = _connection_uses(inspect.getsource(m) for m in (
        aiortc.rtcicetransport, aiortc.rtcpeerconnection, aiortc.rtcdtlstransport))
    missing = uses - CONNECTION_MEMBERS
    assert not missing, f"aiortc uses Connection members LiteConnection lacks: {missing}"
    absent = {name for name in CONNECTION_MEMBERS - _INSTANCE_MEMBERS
              if not hasattr(LiteConnection, name)}
    assert not absent, f"LiteConnection lacks {absent}"
    assert "iceLite" in RTCIceParameters.__dataclass_fields__, "RTCIceParameters.iceLite moved"
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    transports = getattr(pc, ICE_TRANSPORTS_ATTR, None)
    assert transports, "RTCPeerConnection ice transports moved"
    transport = next(iter(transports))
    for attr in ("_connection", "_recv", "_send"):
        assert hasattr(transport, attr), f"RTCIceTransport.{attr} moved"
    assert transport._recv == transport._connection.recv, "RTCIceTransport._recv changed"
    gatherer = transport.iceGatherer
    assert gatherer._connection is transport._connection, "RTCIceGatherer._connection moved"
    assert hasattr(transport._connection, "_local_candidates_start")
