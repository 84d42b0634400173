"""The active side of ICE-TCP (RFC 6544) for an aiortc client: calls whose offer carries
`protocol: "TCP"` (PROTOCOL.md), from the SDK and from the bench's TCP callers.

aioice has no ICE-TCP. `ActiveTcpConnection` takes the place of aioice's `Connection`
under aiortc (lite_transport.swap_ice_connection; the members aiortc uses are
lite_transport.CONNECTION_MEMBERS) as a full, controlling agent that speaks only ICE-TCP
to an ICE-lite answerer such as the appliance's worker port:

- one active host candidate (RFC 6544 section 4.5: port 9, `tcptype active`);
- `connect()` opens a TCP connection to the answer's passive candidates in priority
  order and sends one nominating check (USE-CANDIDATE) on each until one is answered with
  a valid MESSAGE-INTEGRITY and FINGERPRINT. Over TCP a check is never retransmitted
  (RFC 6544 section 7.1): one answer within CHECK_TIMEOUT or the next candidate;
- consent (RFC 7675): a check every ~CONSENT_INTERVAL; no valid answer for
  CONSENT_TIMEOUT ends the connection, as a peer that stops answering is gone;
- RFC 4571 frames both ways (appliance.ice.framing), the send side through the same
  bounded writer as the worker's (appliance.ice.tcp_writer): a stalled answerer costs
  dropped frames, never unbounded memory; what the answerer sends is bounded the same way.

The selected pair has `send()`, as the worker port's pairs do, so SrtpFastPath sends its
SRTP straight into the frame writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections import deque
from typing import Any, cast

from aioice import Candidate, ConnectionClosed
from aiortc import RTCPeerConnection

from appliance.ice import demux, framing, stun
from appliance.ice.lite import Credentials, new_credentials, valid_credentials
from appliance.ice.tcp_writer import DEFAULT_LIMIT, FramedWriter

from .lite_transport import ICE_TRANSPORTS_ATTR, swap_ice_connection

log = logging.getLogger("appliance.ice_tcp_active")

CONNECT_TIMEOUT = 5.0  # the TCP handshake to one passive candidate
CHECK_TIMEOUT = 5.0  # its answer to our one check on that connection
CANDIDATE_WAIT = 10.0  # for a passive candidate to arrive (trickled `ice` actions)
CONSENT_INTERVAL = 5.0  # RFC 7675 section 5.1: every 5 s, randomised by 0.8..1.2
CONSENT_TIMEOUT = 30.0
MAX_REMOTE_CANDIDATES = 16  # what a hostile answer may make us keep
RX_QUEUE = 512  # frames received and not yet read by aiortc's DTLS (SRTP rarely waits here)
# RFC 8445 section 5.1.2.1 with type preference 110 (peer-reflexive: what a check's
# PRIORITY carries) and RFC 6544 section 4.2's local preference for an active candidate.
_CHECK_PRIORITY = (110 << 24) | (((6 << 13) | 8191) << 8) | 255
_CANDIDATE_PRIORITY = (126 << 24) | (((6 << 13) | 8191) << 8) | 255


class ActivePair:
    """The selected pair: one TCP connection to the answerer's passive candidate."""

    __slots__ = ("_stream", "candidate", "remote_addr")

    def __init__(self, stream: _FrameStream, candidate: Candidate) -> None:
        self._stream = stream
        self.candidate = candidate
        self.remote_addr = (candidate.host, candidate.port)

    def send(self, data: bytes) -> None:
        self._stream.send(data)


class _FrameStream(asyncio.Protocol):
    """One TCP connection's RFC 4571 frames, to and from its ActiveTcpConnection."""

    def __init__(self, owner: ActiveTcpConnection, send_limit: int) -> None:
        self._owner = owner
        self._send_limit = send_limit
        # The answerer speaks first only in answers: no opening-frame rule on this side.
        self._decoder = framing.Decoder(stun_first=False)
        self._writer: FramedWriter | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.answered = False  # a check of ours was answered with success on it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)
        self._writer = FramedWriter(self.transport, self._send_limit)

    def send(self, data: bytes) -> None:
        if self._writer is not None and not self.lost:
            self._writer.send(data)

    @property
    def frames_dropped(self) -> int:
        return self._writer.buffer.counters.frames_dropped if self._writer else 0

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except framing.FramingError as exc:
            self.abort(f"the answerer's stream is not RFC 4571: {exc}")
            return
        for frame in frames:
            self._owner._frame(self, frame)

    def pause_writing(self) -> None:
        if self._writer is not None:
            self._writer.pause_writing()

    def resume_writing(self) -> None:
        if self._writer is not None:
            self._writer.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._writer is not None:
            self._writer.connection_lost()
        self._owner._stream_lost(self, "the answerer closed the TCP connection"
                                 + (f" ({exc})" if exc else ""))

    def abort(self, reason: str) -> None:
        if self.transport is not None and not self.lost:
            log.warning("ICE-TCP: %s", reason)
            self.transport.abort()


def _random_tiebreaker() -> int:
    return int.from_bytes(os.urandom(8), "big")


class ActiveTcpConnection:
    """A controlling ICE agent with one active TCP candidate, in the shape of aioice's
    Connection as aiortc uses it."""

    def __init__(self, local_address: str | None = None, *,
                 consent_interval: float = CONSENT_INTERVAL,
                 consent_timeout: float = CONSENT_TIMEOUT,
                 send_limit: int = DEFAULT_LIMIT) -> None:
        if not 0 < consent_interval < consent_timeout:
            raise ValueError("consent_interval must be positive and under consent_timeout")
        self._creds: Credentials = new_credentials()
        self._source = local_address  # the address to connect from (None: the OS's choice)
        self._consent_interval = consent_interval
        self._consent_timeout = consent_timeout
        self._send_limit = send_limit
        self.ice_controlling = True  # the answerer is lite: we always control
        self.remote_is_lite = False
        self.remote_username: str | None = None
        self.remote_password: str | None = None
        self._tiebreaker = _random_tiebreaker()
        self._remote_candidates: list[Candidate] = []
        self._candidates_changed = asyncio.Event()
        self._end_of_candidates = False
        self._gathered = False
        self._nominated: dict[int, ActivePair] = {}
        self._stream: _FrameStream | None = None
        self._pending: dict[bytes, asyncio.Future[stun.Message]] = {}
        self._rx: deque[bytes] = deque()
        self._rx_waiter: asyncio.Future[None] | None = None
        self._closed = asyncio.Event()
        self._consent_task: asyncio.Task[None] | None = None
        self._last_consent = 0.0
        self.failure: str | None = None  # why the connection ended
        self.checks_sent = 0
        self.checks_answered = 0
        self.rx_queue_drops = 0
        self.stray_frames = 0  # STUN that answers nothing we asked: dropped

    def __repr__(self) -> str:
        return f"ActiveTcpConnection({self._creds.ufrag})"

    # -- what RTCIceGatherer reads ----------------------------------------------------------

    @property
    def local_username(self) -> str:
        return self._creds.ufrag

    @property
    def local_password(self) -> str:
        return self._creds.pwd

    @property
    def local_candidates(self) -> list[Candidate]:
        if not self._gathered:
            return []
        host = self._source or "0.0.0.0"
        return [Candidate(foundation="tcpact", component=1, transport="tcp",
                          priority=_CANDIDATE_PRIORITY, host=host, port=9, type="host",
                          tcptype="active")]

    async def gather_candidates(self) -> None:
        self._gathered = True  # an active candidate has no socket until it connects

    # -- what RTCIceTransport sets and calls -------------------------------------------------

    @property
    def remote_candidates(self) -> list[Candidate]:
        return list(self._remote_candidates)

    async def add_remote_candidate(self, candidate: Candidate | None) -> None:
        if candidate is None:
            self._end_of_candidates = True
        elif len(self._remote_candidates) < MAX_REMOTE_CANDIDATES:
            self._remote_candidates.append(candidate)
        self._candidates_changed.set()

    def _passive(self, tried: set[tuple[str, int]]) -> list[Candidate]:
        found = [c for c in self._remote_candidates
                 if c.transport.lower() == "tcp" and c.tcptype == "passive"
                 and c.component == 1 and (c.host, c.port) not in tried]
        return sorted(found, key=lambda c: c.priority, reverse=True)

    async def connect(self) -> None:
        """Returns once a passive candidate answered our nominating check; ConnectionError
        when none does (or none arrives within CANDIDATE_WAIT)."""
        if self.remote_username is None or self.remote_password is None:
            raise ConnectionError("Remote username or password is missing")
        if not valid_credentials(Credentials(self.remote_username, self.remote_password)):
            raise ConnectionError("malformed remote ICE credentials")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANDIDATE_WAIT
        tried: set[tuple[str, int]] = set()
        errors: list[str] = []
        while self.failure is None:
            for candidate in self._passive(tried):
                tried.add((candidate.host, candidate.port))
                try:
                    await self._try(candidate)
                    return
                except (OSError, TimeoutError, ConnectionError) as exc:
                    errors.append(f"{candidate.host}:{candidate.port}: {exc or type(exc)}")
            left = deadline - loop.time()
            if self._end_of_candidates or left <= 0:
                break
            self._candidates_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._candidates_changed.wait(), left)
        reason = "; ".join(errors) if errors else "no passive TCP candidate in the answer"
        raise ConnectionError(f"ICE-TCP failed: {reason}")

    async def _try(self, candidate: Candidate) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in candidate.host else socket.AF_INET
        source = (self._source, 0) if self._source and (":" in self._source) == (
            family == socket.AF_INET6) else None
        transport, stream = await asyncio.wait_for(loop.create_connection(
            lambda: _FrameStream(self, self._send_limit), candidate.host, candidate.port,
            local_addr=source), CONNECT_TIMEOUT)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # media: no Nagle delay on small SRTP frames
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._check(stream, nominate=True, timeout=CHECK_TIMEOUT)
        except BaseException:
            transport.abort()
            raise
        self._stream = stream
        self._nominated[1] = ActivePair(stream, candidate)
        self._last_consent = loop.time()
        self._consent_task = asyncio.create_task(self._keep_consent())

    async def _check(self, stream: _FrameStream, *, nominate: bool,
                     timeout: float) -> stun.Message:
        """Send one Binding request on `stream`; its success answer, verified."""
        assert self.remote_username is not None and self.remote_password is not None
        transaction = os.urandom(stun.TRANSACTION_ID_BYTES)
        attributes = [
            (stun.USERNAME, f"{self.remote_username}:{self.local_username}".encode()),
            (stun.PRIORITY, stun.encode_u32(_CHECK_PRIORITY)),
            (stun.ICE_CONTROLLING, stun.encode_u64(self._tiebreaker)),
        ]
        if nominate:
            attributes.append((stun.USE_CANDIDATE, b""))
        request = stun.build(stun.BINDING, stun.StunClass.REQUEST, transaction, attributes,
                             integrity_key=self.remote_password.encode())
        answer: asyncio.Future[stun.Message] = asyncio.get_running_loop().create_future()
        self._pending[transaction] = answer
        try:
            stream.send(request)
            self.checks_sent += 1
            reply = await asyncio.wait_for(answer, timeout)
        finally:
            self._pending.pop(transaction, None)
        if reply.cls is not stun.StunClass.SUCCESS:
            code = reply.error_code
            raise ConnectionError(f"check answered {code[0]} {code[1]}" if code
                                  else "check answered with an error")
        self.checks_answered += 1
        return reply

    def _frame(self, stream: _FrameStream, frame: bytes) -> None:
        kind = demux.classify(frame)  # RFC 7983; an empty frame (RFC 4571 allows it): garbage
        if kind is demux.STUN:
            self._stun(stream, frame)
        elif kind is not demux.GARBAGE and stream.answered:
            # Media from the connection our check was answered on (it may come in the same
            # read as the answer, before connect() has made it the selected pair).
            self.data_received(frame, 1)
        else:
            self.stray_frames += 1

    def _stun(self, stream: _FrameStream, frame: bytes) -> None:
        try:
            message = stun.parse(frame)
        except stun.StunError:
            self.stray_frames += 1
            return
        waiter = self._pending.get(message.transaction_id)
        if (waiter is None or waiter.done() or message.method != stun.BINDING
                or message.cls not in (stun.StunClass.SUCCESS, stun.StunClass.ERROR)):
            self.stray_frames += 1
            return
        assert self.remote_password is not None
        # An answer that cannot prove it knows the password is not the answerer's (RFC
        # 8445 section 7.2.5.2.1); it does not count as consent either.
        if not (message.check_integrity(self.remote_password.encode())
                and message.check_fingerprint()):
            self.stray_frames += 1
            return
        if message.cls is stun.StunClass.SUCCESS:
            stream.answered = True
        waiter.set_result(message)

    async def _keep_consent(self) -> None:
        loop = asyncio.get_running_loop()
        while self.failure is None and self._stream is not None:
            await asyncio.sleep(self._consent_interval * random.uniform(0.8, 1.2))
            stream = self._stream
            if stream is None or self.failure is not None:
                return
            try:
                await self._check(stream, nominate=False, timeout=self._consent_interval)
                self._last_consent = loop.time()
            except (TimeoutError, ConnectionError):
                pass
            if loop.time() - self._last_consent > self._consent_timeout:
                self._shutdown("consent expired: the answerer stopped answering checks")
                return

    def _stream_lost(self, stream: _FrameStream, reason: str) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError(reason))
                waiter.exception()  # retrieved, whoever awaits it
        if stream is self._stream:
            self._shutdown(reason)

    # -- the data path ----------------------------------------------------------------------

    def data_received(self, data: bytes, component: int) -> None:
        """A frame of media (DTLS, SRTP). SrtpFastPath wraps this, as it wraps aioice's."""
        if self.failure is not None:
            return
        if len(self._rx) >= RX_QUEUE:
            self.rx_queue_drops += 1
            return
        self._rx.append(data)
        if self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_result(None)

    async def recv(self) -> bytes:
        while not self._rx:
            if self.failure is not None:
                raise ConnectionError(f"ICE-TCP: {self.failure}")
            self._rx_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._rx_waiter
            finally:
                self._rx_waiter = None
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

    async def get_event(self) -> ConnectionClosed:
        await self._closed.wait()
        return ConnectionClosed()

    @property
    def frames_dropped(self) -> int:
        """Frames our bounded writer dropped because the answerer did not read them."""
        return self._stream.frames_dropped if self._stream is not None else 0

    async def close(self) -> None:
        self._shutdown("closed")

    def _shutdown(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._nominated.clear()  # SrtpFastPath stops sending when there is no pair
        self._rx.clear()
        task, self._consent_task = self._consent_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        stream, self._stream = self._stream, None
        if stream is not None and stream.transport is not None:
            stream.transport.abort()
        self._closed.set()
        if self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_result(None)


async def use_active_tcp(pc: RTCPeerConnection, local_address: str | None = None, **options: Any
                         ) -> list[ActiveTcpConnection]:
    """Put `pc`'s ICE on ICE-TCP, active side: call after the transceivers exist and
    before createOffer (which gathers). One ActiveTcpConnection per ICE transport; with
    BUNDLE only the first ever connects. `options` go to ActiveTcpConnection."""
    conns: list[ActiveTcpConnection] = []
    for transport in list(getattr(pc, ICE_TRANSPORTS_ATTR)):
        old = transport._connection
        if isinstance(old, ActiveTcpConnection):
            conns.append(old)
            continue
        if old._local_candidates_start:
            raise RuntimeError("ICE gathering already started on this peer connection")
        conn = ActiveTcpConnection(local_address, **options)
        swap_ice_connection(transport, conn)
        conns.append(conn)
        await old.close()  # it never gathered: no socket, no task
    return conns
