"""The media port's ICE-TCP edge (RFC 6544, passive candidates only): the listening
sockets, every connection accepted on them, what each may cost, and the pair a call sends
on over one. ICE itself is not here: each connection's RFC 4571 frames go into the port's
`LiteAgent` on that connection's own path, and the port (lite_transport.WorkerMediaPort)
gets what the agent makes of them: media for a call, and the events that select a pair.

Everything here faces whoever connects to the worker's TCP port, so:
- caps: at most `max_tcp_connections` per port and `max_tcp_per_address` per source
  address; one over is reset at once (RST, no state kept) and counted.
- a stranger is closed at its first frame: an RFC 4571 `Decoder` with `stun_first` closes
  a connection whose first frame is not a STUN Binding request (an HTTP or TLS client, a
  scanner), or that claims a frame over `tcp_max_frame`.
- deadlines: the first valid check within `tcp_first_check_timeout` (a silent or slowloris
  connection is closed), then one at least every `consent_timeout` (RFC 7675: the
  browser's consent checks keep a connection it still uses; a quiet one is closed).
- a bounded writer: everything sent on a connection - STUN answers, DTLS, SRTP - goes
  through its `FramedWriter` (tcp_writer.py), so a reader that stops reading costs its own
  call dropped frames (counted), never the worker a blocked loop or unbounded memory.
- a closed connection's path is forgotten by the agent (`forget_path`): a call routed on
  it waits for the browser's next valid check, on another connection or on UDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from appliance.core.netaddr import normal_ip
from appliance.core.throttle import Tally
from appliance.ice.framing import HEADER_BYTES, Decoder, FramingError
from appliance.ice.lite import Event, LiteAgent, Path, Received, tcp_path
from appliance.ice.tcp_writer import DEFAULT_LIMIT, MAX_LIMIT, MIN_LIMIT, FramedWriter
from appliance.media.datagrams import MAX_DATAGRAM

log = logging.getLogger("appliance.rtc")

Addr = tuple[str, int]

_TCP_BACKLOG = 128

_refused = Tally(log, "ICE-TCP connections refused (over max_tcp_connections or "
                      "max_tcp_per_address)")
_not_ice = Tally(log, "ICE-TCP connections closed: not RFC 4571 ICE")


@dataclass(frozen=True)
class TcpSettings:
    """The edge's bounds; lite_transport.LiteSettings carries them under the same names.
    Memory per connection: tcp_send_buffer + tcp_writer's 2 * WRITE_CHUNK + one frame being
    read; max_tcp_connections of them per port."""

    tcp_send_buffer: int = DEFAULT_LIMIT  # bytes queued towards a slow reader, then drops
    max_tcp_connections: int = 512  # per port (a call has one or two)
    # Per source address: a whole office behind one NAT (where UDP is blocked, the very
    # case TCP is for) shares one, so this is a bound on one host, not one caller.
    max_tcp_per_address: int = 100
    tcp_first_check_timeout: float = 10.0  # accepted -> first valid check, else closed
    tcp_max_frame: int = MAX_DATAGRAM  # a longer RFC 4571 frame cannot be media: closed
    consent_timeout: float = 30.0  # checked -> no valid check for this long: closed

    def __post_init__(self) -> None:
        if min(self.tcp_first_check_timeout, self.consent_timeout) <= 0:
            raise ValueError("tcp_first_check_timeout and consent_timeout must be > 0")
        if min(self.max_tcp_connections, self.max_tcp_per_address) < 1:
            raise ValueError("max_tcp_connections and max_tcp_per_address must be >= 1")
        if not MIN_LIMIT <= self.tcp_send_buffer <= MAX_LIMIT:
            raise ValueError(f"tcp_send_buffer must be {MIN_LIMIT}..{MAX_LIMIT} bytes")
        if not 20 <= self.tcp_max_frame <= 0xFFFF:  # a STUN header .. RFC 4571's LENGTH
            raise ValueError("tcp_max_frame must be 20..65535 bytes")


@dataclass
class TcpCounters:
    """The edge's counters since the port opened (WorkerMediaPort.stats() keys)."""

    tcp_accepted: int = 0
    tcp_refused: int = 0  # over max_tcp_connections or max_tcp_per_address
    tcp_not_ice: int = 0  # closed: first frame not a Binding request, or a frame too long
    tcp_first_check_timeouts: int = 0  # closed: no valid check within the first deadline
    tcp_idle_timeouts: int = 0  # closed: no valid check for consent_timeout
    tcp_frames_dropped: int = 0  # not sent: the reader was behind, or the connection gone


class TcpPair:
    """A call's selected pair on an ICE-TCP connection: `send` frames (RFC 4571) through
    the connection's bounded writer, and drops (counted) once the connection is gone."""

    __slots__ = ("_conn", "path", "remote_addr")

    def __init__(self, conn: IceTcpConnection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self.remote_addr: Addr = (path[1], path[2])

    def send(self, data: bytes) -> None:
        self._conn.send(data)


# What the edge hands its owner: a frame the agent says is a call's media (DTLS, SRTP);
# the events of a check that came on a connection, with that connection's pair.
OnMedia = Callable[[Received], None]
OnEvents = Callable[[Sequence[Event], TcpPair], None]


class IceTcpEdge:
    """One media port's ICE-TCP listeners (one per bound address) and their connections."""

    def __init__(self, agent: LiteAgent, settings: TcpSettings, on_media: OnMedia,
                 on_events: OnEvents) -> None:
        self.settings = settings
        self.counters = TcpCounters()
        self._agent = agent
        self._on_media = on_media
        self._on_events = on_events
        self._loop = asyncio.get_running_loop()
        self._servers: list[tuple[asyncio.Server, str, int]] = []  # server, announce, port
        self._conns: set[IceTcpConnection] = set()
        self._per_ip: dict[str, int] = {}
        self._ids = itertools.count(1)  # a path per connection, even from one address:port
        self._closed = False

    async def listen(self, bind: str, announce: str, port: int) -> None:
        """Listen on bind:port (0: an ephemeral port), announced as `announce`. OSError if
        the port is taken."""
        family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Rebinding after a restart while old connections sit in TIME_WAIT; a live
            # listener on the port still makes bind fail (Linux: that needs SO_REUSEPORT).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((bind, port))
            sock.listen(_TCP_BACKLOG)
        except OSError:
            sock.close()
            raise
        try:
            server = await self._loop.create_server(lambda: IceTcpConnection(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._servers.append((server, announce, int(sock.getsockname()[1])))

    @property
    def listeners(self) -> list[tuple[str, int]]:
        """(announced address, port) of each listener, in the order they were opened."""
        return [(announce, port) for _, announce, port in self._servers]

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        """Abort every connection (forgetting its path) and stop listening."""
        self._closed = True
        for conn in list(self._conns):
            conn.close()
        for server, _, _ in self._servers:
            server.close()

    # -- what its connections call ---------------------------------------------------------

    def _admit(self, conn: IceTcpConnection, ip: str) -> bool:
        s = self.settings
        if self._closed:
            return False
        if (len(self._conns) >= s.max_tcp_connections
                or self._per_ip.get(ip, 0) >= s.max_tcp_per_address):
            self.counters.tcp_refused += 1
            _refused.note(self._loop.time(), (ip, 0), f"{len(self._conns)} open, "
                          f"{self._per_ip.get(ip, 0)} from this address")
            return False
        self._conns.add(conn)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self.counters.tcp_accepted += 1
        return True

    def _closed_conn(self, conn: IceTcpConnection, path: Path) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        ip = path[1]
        left = self._per_ip.get(ip, 1) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)
        # Its path carries nothing more; a call routed on it waits for its next valid check
        # (and consent keeps counting). Its pair stays selected and drops, counted: aiortc
        # treats a send that raises as the end of the transport.
        self._agent.forget_path(path)


class IceTcpConnection(asyncio.Protocol):
    """One accepted ICE-TCP connection (RFC 6544, we are passive): RFC 4571 frames in,
    into the port's LiteAgent on this connection's own path; frames out through a bounded
    writer. See the module docstring for its deadlines and caps."""

    def __init__(self, edge: IceTcpEdge) -> None:
        self._edge = edge
        self._transport: asyncio.Transport | None = None
        self._writer: FramedWriter | None = None
        self._decoder = Decoder(max_buffered=HEADER_BYTES + edge.settings.tcp_max_frame)
        self._peer: Addr = ("?", 0)
        self.path: Path | None = None  # set once admitted
        self._pair: TcpPair | None = None
        self._validated = False
        self._valid_by = 0.0  # closed unless a valid check comes by then
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's, or uvloop's in a worker (which is no subclass of
        # asyncio.Transport but has its interface), so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        edge = self._edge
        peer = transport.get_extra_info("peername")
        try:
            # The browser knows an IPv4 address as a.b.c.d, not the ::ffff:a.b.c.d a
            # dual-stack socket reports (XOR-MAPPED-ADDRESS comes from the path).
            ip, peer_port = normal_ip(str(peer[0])), int(peer[1])
        except (TypeError, IndexError, ValueError):
            self._closed = True  # not an IP peer: nothing to answer
            transport.abort()
            return
        self._peer = (ip, peer_port)
        if not edge._admit(self, ip):
            self._closed = True
            transport.abort()  # RST: no state kept, nothing lingers
            return
        _with_nodelay(self._transport)
        self.path = tcp_path(ip, peer_port, next(edge._ids))
        self._pair = TcpPair(self, self.path)
        self._writer = FramedWriter(self._transport, edge.settings.tcp_send_buffer)
        self._valid_by = edge._loop.time() + edge.settings.tcp_first_check_timeout
        self._timer = edge._loop.call_at(self._valid_by, self._deadline)

    def data_received(self, data: bytes) -> None:
        if self._closed or self.path is None:
            return
        edge = self._edge
        try:
            frames = self._decoder.feed(data)
        except FramingError as exc:
            edge.counters.tcp_not_ice += 1
            _not_ice.note(edge._loop.time(), self._peer, str(exc))
            self.close()
            return
        agent = edge._agent
        for frame in frames:
            if self.path is None:  # closed meanwhile (the port closed)
                return
            now = edge._loop.time()
            out = agent.receive(self.path, frame, now)
            if out.media is not None:
                edge._on_media(out)
                continue
            if out.reply is not None:
                self.send(out.reply)
            if out.session is not None:  # a valid check: answered with a success
                self._validated = True
                self._valid_by = now + edge.settings.consent_timeout
            if out.events:
                assert self._pair is not None
                edge._on_events(out.events, self._pair)

    def send(self, frame: bytes) -> None:
        """One frame towards the peer; dropped (counted) when the writer has no room."""
        if self._writer is None or not self._writer.send(frame):
            self._edge.counters.tcp_frames_dropped += 1

    def pause_writing(self) -> None:
        if self._writer is not None:
            self._writer.pause_writing()

    def resume_writing(self) -> None:
        if self._writer is not None:
            self._writer.resume_writing()

    def _deadline(self) -> None:
        self._timer = None
        if self._closed:
            return
        edge = self._edge
        if edge._loop.time() < self._valid_by:  # a valid check came since: wait for it
            self._timer = edge._loop.call_at(self._valid_by, self._deadline)
            return
        if self._validated:
            edge.counters.tcp_idle_timeouts += 1
        else:
            edge.counters.tcp_first_check_timeouts += 1
        self.close()

    def close(self) -> None:
        """Abort the connection and forget its path (idempotent)."""
        if not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.abort()
        self._release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._release()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            self._writer.connection_lost()
        if self.path is not None:
            path, self.path = self.path, None
            self._edge._closed_conn(self, path)


def _with_nodelay(transport: asyncio.Transport) -> None:
    # Media: a frame goes out when written, not when Nagle has gathered more.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
