"""Spike for issue 12 (decision record 0006): one UDP socket per worker, answering every
call as ICE-lite, under aiortc's own DTLS-SRTP, RTP senders and our SrtpFastPath.

What this module owns, in three parts that are split when the lead wires it in:

1. Minimal STUN for an ICE-lite answerer: parse a connectivity check, sign its answer.
   TO BE REPLACED by appliance.ice.stun (another engineer's, in progress).
2. `LiteDemux`, sans-IO (`now` passed in): which call a datagram on the shared port is
   for - STUN by the username fragment, everything else by the remote address a valid
   check taught us - plus nomination (USE-CANDIDATE), address moves and consent (RFC
   7675) deadlines. TO BE REPLACED by appliance.ice.lite (LiteAgent).
3. The I/O edge and the aiortc glue (stays in appliance.edges): `SharedUdpPort`, the
   worker's socket, and `LiteConnection`, the object that stands in for aioice's
   `Connection` under aiortc's RTCIceGatherer/RTCIceTransport. `use_lite_transport(pc,
   port)` swaps it in after setRemoteDescription, so RTCDtlsTransport, the RTP senders and
   `rtc_adapter.SrtpFastPath` run unchanged on top of it.

aiortc touches a connection only through the members listed in `CONNECTION_MEMBERS`;
`check_lite_hooks()` reads aiortc's source for `_connection.<name>` and fails if it ever
uses one we do not provide (aiortc is pinned; an upgrade must fail in CI, not in a rack).
Nothing here is used by the worker yet: today's per-call aioice transport stays the default.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import inspect
import ipaddress
import logging
import re
import secrets
import socket
import string
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aioice import Candidate, ConnectionClosed
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc import RTCPeerConnection
from aiortc.rtcicetransport import RTCIceParameters

from appliance.core.throttle import Tally, TokenBucket
from appliance.media.datagrams import MAX_DATAGRAM, fits

log = logging.getLogger("appliance.rtc")

Addr = tuple[str, int]

# --------------------------------------------------------------------------------------
# 1. Minimal STUN (RFC 8489) for answering ICE checks. TO BE REPLACED by appliance.ice.stun.
# --------------------------------------------------------------------------------------

HEADER = 20
COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A
MAX_USERNAME = 513  # RFC 5389 section 15.3: fewer than 513 bytes
MAX_ATTRIBUTES = 32  # a browser's check has about 7; the bound keeps a parse cheap


class StunError(ValueError):
    """The only exception the STUN parser raises, whatever the bytes."""


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """A parsed connectivity check (RFC 8445 section 7.1.1), FINGERPRINT already verified;
    MESSAGE-INTEGRITY is checked with `authentic()` once we know whose password applies."""

    transaction_id: bytes
    username: str  # "<our ufrag>:<their ufrag>"
    use_candidate: bool
    controlling: bool
    controlled: bool
    priority: int | None
    signed: bytes  # what the HMAC covers: the message up to MESSAGE-INTEGRITY, length fixed
    integrity: bytes

    def authentic(self, key: bytes) -> bool:
        mac = hmac.new(key, self.signed, hashlib.sha1).digest()
        return hmac.compare_digest(mac, self.integrity)


def _with_length(data: bytes, length: int) -> bytes:
    return data[:2] + struct.pack("!H", length) + data[4:]


def parse_binding_request(data: bytes) -> BindingRequest:
    """A Binding request with USERNAME, MESSAGE-INTEGRITY and a valid FINGERPRINT, or
    StunError. Attributes after MESSAGE-INTEGRITY other than FINGERPRINT are ignored
    (RFC 8489 section 14.5); unknown comprehension-optional ones too."""
    size = len(data)
    if size < HEADER or size > MAX_DATAGRAM:
        raise StunError("size")
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    if cookie != COOKIE or msg_type != BINDING_REQUEST:
        raise StunError("not a STUN Binding request")
    if length != size - HEADER or length % 4:
        raise StunError("length")
    username: str | None = None
    integrity_at = -1
    integrity = b""
    fingerprinted = use_candidate = controlling = controlled = False
    priority: int | None = None
    pos, count = HEADER, 0
    while pos < size:
        if size - pos < 4:
            raise StunError("truncated attribute header")
        kind, alen = struct.unpack_from("!HH", data, pos)
        start, end = pos + 4, pos + 4 + alen
        if end > size:
            raise StunError("attribute overruns the message")
        count += 1
        if count > MAX_ATTRIBUTES or fingerprinted:
            raise StunError("too many attributes, or one after FINGERPRINT")
        value = data[start:end]
        if kind == FINGERPRINT:
            if alen != 4:
                raise StunError("FINGERPRINT length")
            crc = binascii.crc32(_with_length(data[:pos], pos - HEADER + 8)) ^ FINGERPRINT_XOR
            if struct.unpack("!I", value)[0] != crc:
                raise StunError("FINGERPRINT mismatch")
            fingerprinted = True
        elif integrity_at >= 0:
            pass  # not covered by MESSAGE-INTEGRITY: ignored
        elif kind == MESSAGE_INTEGRITY:
            if alen != 20:
                raise StunError("MESSAGE-INTEGRITY length")
            integrity_at, integrity = pos, value
        elif kind == USERNAME:
            if alen > MAX_USERNAME:
                raise StunError("USERNAME too long")
            try:
                username = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise StunError("USERNAME is not UTF-8") from exc
        elif kind == PRIORITY:
            if alen != 4:
                raise StunError("PRIORITY length")
            priority = struct.unpack("!I", value)[0]
        elif kind == USE_CANDIDATE:
            if alen != 0:
                raise StunError("USE-CANDIDATE length")
            use_candidate = True
        elif kind in (ICE_CONTROLLING, ICE_CONTROLLED):
            if alen != 8:
                raise StunError("ICE-CONTROLLING/CONTROLLED length")
            controlling = controlling or kind == ICE_CONTROLLING
            controlled = controlled or kind == ICE_CONTROLLED
        elif kind < 0x8000:
            # Comprehension-required and unknown: RFC 8489 would answer 420; a browser's
            # check never carries one, so it is not worth an answer to a stranger.
            raise StunError(f"unknown comprehension-required attribute {kind:#06x}")
        pos = start + ((alen + 3) & ~3)
    if pos != size:
        raise StunError("padding overruns the message")
    if username is None or integrity_at < 0 or not fingerprinted:
        raise StunError("a check needs USERNAME, MESSAGE-INTEGRITY and FINGERPRINT")
    signed = _with_length(data[:integrity_at], integrity_at - HEADER + 24)
    return BindingRequest(bytes(data[8:20]), username, use_candidate, controlling, controlled,
                          priority, signed, integrity)


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\x00" * (-len(value) % 4)


def binding_success(transaction_id: bytes, mapped: Addr, key: bytes) -> bytes:
    """The signed answer to a check: XOR-MAPPED-ADDRESS (the browser learns its
    peer-reflexive address), MESSAGE-INTEGRITY with our password, FINGERPRINT.
    ValueError if `mapped` is not an IP address and port."""
    ip = ipaddress.ip_address(mapped[0].partition("%")[0])
    port = int(mapped[1])
    if not 0 <= port <= 0xFFFF or len(transaction_id) != 12:
        raise ValueError("port or transaction id")
    family = 1 if ip.version == 4 else 2
    pad = struct.pack("!I", COOKIE) + (b"" if ip.version == 4 else transaction_id)
    xored = bytes(a ^ b for a, b in zip(ip.packed, pad, strict=True))
    body = _attribute(XOR_MAPPED_ADDRESS,
                      struct.pack("!BBH", 0, family, port ^ (COOKIE >> 16)) + xored)
    head = struct.pack("!HHI", BINDING_SUCCESS, len(body) + 24, COOKIE) + transaction_id
    body += _attribute(MESSAGE_INTEGRITY, hmac.new(key, head + body, hashlib.sha1).digest())
    head = _with_length(head, len(body) + 8)
    crc = binascii.crc32(head + body) ^ FINGERPRINT_XOR
    return head + body + _attribute(FINGERPRINT, struct.pack("!I", crc))


# --------------------------------------------------------------------------------------
# 2. Sans-IO demultiplexing and ICE-lite state. TO BE REPLACED by appliance.ice.lite.
# --------------------------------------------------------------------------------------

_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")  # RFC 8839 section 5.4 ice-char


@dataclass(frozen=True)
class LiteSettings:
    consent_timeout: float = 30.0  # RFC 7675: no valid check from the selected address
    connect_timeout: float = 30.0  # no nomination at all (the leg's dtls_timeout is shorter)
    max_calls: int = 1024  # per port; the worker's channels bound it first
    max_addresses: int = 8  # per call: a browser checks from each of its candidates
    check_rate: float = 50.0  # valid-looking checks per call per second (HMACs we compute)
    check_burst: float = 100.0
    queue: int = 256  # datagrams waiting for aiortc's DTLS reader (the fast path takes SRTP)
    tick: float = 1.0  # how often deadlines are looked at


@dataclass(frozen=True, slots=True)
class Answer:
    """A valid check: send `reply` to `addr`; `selected` when it (re)selected `addr`."""

    ufrag: str
    reply: bytes
    addr: Addr
    selected: bool


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str  # a counter key; nothing is sent back


@dataclass
class _Call:
    ufrag: str
    password: bytes
    created: float
    bucket: TokenBucket
    remote_ufrag: str | None = None
    addresses: OrderedDict[Addr, None] = field(default_factory=OrderedDict)  # LRU
    selected: Addr | None = None
    consent_at: float = 0.0


class LiteDemux:
    """The ICE-lite side of every call on one shared port (RFC 8445 section 7.3 as a lite
    agent: answer checks, never send any; the controlling browser nominates)."""

    def __init__(self, settings: LiteSettings = LiteSettings()) -> None:
        self.settings = settings
        self._calls: dict[str, _Call] = {}
        self._by_addr: dict[Addr, str] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def add_call(self, now: float, ufrag: str, password: str) -> None:
        if not (4 <= len(ufrag) <= 256 and _ICE_CHARS.fullmatch(ufrag)):
            raise ValueError("ufrag must be 4..256 ice-chars")
        if not (22 <= len(password) <= 256 and _ICE_CHARS.fullmatch(password)):
            raise ValueError("password must be 22..256 ice-chars")
        if ufrag in self._calls:
            raise ValueError("ufrag already in use on this port")
        if len(self._calls) >= self.settings.max_calls:
            raise ValueError("too many calls on this port")
        bucket = TokenBucket(self.settings.check_rate, self.settings.check_burst)
        self._calls[ufrag] = _Call(ufrag, password.encode("ascii"), now, bucket)

    def has_call(self, ufrag: str) -> bool:
        return ufrag in self._calls

    def set_remote_ufrag(self, ufrag: str, remote_ufrag: str | None) -> None:
        """Once the browser's ufrag is known, checks must name it (RFC 8445 section 7.3)."""
        call = self._calls.get(ufrag)
        if call is not None:
            call.remote_ufrag = remote_ufrag

    def remove_call(self, ufrag: str) -> None:
        call = self._calls.pop(ufrag, None)
        if call is None:
            return
        for addr in call.addresses:
            if self._by_addr.get(addr) == ufrag:
                del self._by_addr[addr]

    def selected(self, ufrag: str) -> Addr | None:
        call = self._calls.get(ufrag)
        return call.selected if call else None

    def route(self, addr: Addr) -> str | None:
        """Whose call a non-STUN datagram (DTLS, SRTP, SRTCP) from `addr` belongs to."""
        return self._by_addr.get(addr)

    def on_stun(self, now: float, data: bytes, addr: Addr) -> Answer | Refused:
        try:
            request = parse_binding_request(data)
        except StunError:
            return Refused("malformed")
        ours, colon, theirs = request.username.partition(":")
        call = self._calls.get(ours)
        if call is None or not colon:
            return Refused("unknown ufrag")
        if call.remote_ufrag is not None and theirs != call.remote_ufrag:
            return Refused("wrong remote ufrag")
        # Before the HMAC: the ufrag is plaintext on the wire, so an on-path stranger can
        # name a live call; the bucket caps the hashing that costs us.
        if not call.bucket.take(now):
            return Refused("check rate")
        if not request.authentic(call.password):
            return Refused("bad integrity")
        if not request.controlling or request.controlled:
            # A lite agent is always controlled; a peer that thinks so too cannot connect.
            return Refused("peer not controlling")
        owner = self._by_addr.get(addr)
        if owner is not None and owner != ours:
            other = self._calls[owner]
            if other.selected == addr:
                # Another live call's path: a spoofed source must not hijack its media.
                return Refused("address taken")
            del other.addresses[addr]
        try:
            reply = binding_success(request.transaction_id, addr, call.password)
        except ValueError:
            return Refused("unanswerable address")
        self._learn(call, addr)
        selected = request.use_candidate and call.selected != addr
        if selected:
            call.selected = addr  # first nomination, or the browser moved (a new pair)
        if addr == call.selected:
            call.consent_at = now  # consent freshness: a valid check on the selected pair
        return Answer(ours, reply, addr, selected)

    def _learn(self, call: _Call, addr: Addr) -> None:
        call.addresses[addr] = None
        call.addresses.move_to_end(addr)
        self._by_addr[addr] = call.ufrag
        while len(call.addresses) > self.settings.max_addresses:
            stale = next(a for a in call.addresses if a != call.selected)
            del call.addresses[stale]
            if self._by_addr.get(stale) == call.ufrag:
                del self._by_addr[stale]

    def expired(self, now: float) -> list[tuple[str, str]]:
        """Calls whose deadline passed, removed: (ufrag, reason)."""
        out: list[tuple[str, str]] = []
        for ufrag, call in self._calls.items():
            if call.selected is None:
                if now - call.created >= self.settings.connect_timeout:
                    out.append((ufrag, "no nomination"))
            elif now - call.consent_at >= self.settings.consent_timeout:
                out.append((ufrag, "consent expired"))
        for ufrag, _ in out:
            self.remove_call(ufrag)
        return out


# --------------------------------------------------------------------------------------
# 3. The I/O edge and the aiortc glue.
# --------------------------------------------------------------------------------------

# RFC 6544 section 4.2: local preference = 2^13 * direction-pref + other-pref, passive 4.
TCP_PASSIVE_LOCAL_PREF = (1 << 13) * 4 + 8191
_UFRAG_LEN = 16  # random, so an off-path stranger cannot guess a live call's demux key
_PASSWORD_LEN = 24
_ICE_ALPHABET = string.ascii_letters + string.digits + "+/"
_ICE_TRANSPORTS_ATTR = "_RTCPeerConnection__iceTransports"
_SOCKET_BUFFER = 1 << 20  # every call's packets share one socket's buffers

# What aiortc (rtcicetransport, rtcpeerconnection, rtcdtlstransport) and rtc_adapter's
# SrtpFastPath read or call on `_connection`; LiteConnection provides each of them.
CONNECTION_MEMBERS = frozenset({
    "ice_controlling", "remote_is_lite", "remote_username", "remote_password",
    "local_username", "local_password", "local_candidates", "remote_candidates",
    "gather_candidates", "add_remote_candidate", "connect", "close", "get_event", "recv",
    "send", "data_received", "_nominated",
})
# Of those, the ones LiteConnection sets on the instance (the rest are class members).
_INSTANCE_MEMBERS = frozenset({"ice_controlling", "remote_is_lite", "remote_password",
                               "_nominated"})

_refused = Tally(log, "datagrams refused on the shared ICE port")


@dataclass
class PortCounters:
    """Per port since it opened (the worker adds them to its /metrics stats)."""

    checks: int = 0  # valid checks answered
    refused: dict[str, int] = field(default_factory=dict)  # STUN refused, by reason
    unknown_source: int = 0  # non-STUN from an address no valid check came from
    oversized: int = 0
    consent_failures: int = 0
    connect_failures: int = 0  # never nominated within connect_timeout
    queue_drops: int = 0  # aiortc's reader was behind
    send_errors: int = 0


class SelectedPair:
    """A call's selected path. `protocol.transport` and `remote_addr` are what SrtpFastPath
    reads of an aioice CandidatePair today (its DirectSender dups the socket)."""

    __slots__ = ("protocol", "remote_addr")

    def __init__(self, protocol: SharedUdpPort, remote_addr: Addr) -> None:
        self.protocol = protocol
        self.remote_addr = remote_addr

    def send(self, data: bytes) -> None:
        self.protocol.sendto(data, self.remote_addr)


class SharedUdpPort(asyncio.DatagramProtocol):
    """The worker's one UDP socket for every call's ICE, DTLS and SRTP."""

    def __init__(self, announce: str, tcp_port: int | None, settings: LiteSettings) -> None:
        self.announce = announce
        self.tcp_port = tcp_port
        self.settings = settings
        self.counters = PortCounters()
        self._demux = LiteDemux(settings)
        self._conns: dict[str, LiteConnection] = {}
        self._sock: socket.socket | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @classmethod
    async def open(cls, bind: str, port: int = 0, *, announce: str | None = None,
                   tcp_port: int | None = None,
                   settings: LiteSettings = LiteSettings()) -> SharedUdpPort:
        """Bind `bind:port`; announce `announce` (behind a 1:1 NAT) or the bound address.
        `tcp_port`: the worker's ICE-TCP port, announced as a passive candidate (its
        listener is not part of this spike)."""
        family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            sock.bind((bind, port))
        except OSError:
            sock.close()
            raise
        self = cls(announce or bind, tcp_port, settings)
        self._sock = sock
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._timer = loop.call_later(settings.tick, self._tick)
        return self

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def calls(self) -> int:
        return len(self._conns)

    # -- calls -----------------------------------------------------------------------

    def connection(self) -> LiteConnection:
        """A new call's ICE-lite side (random credentials, our candidates)."""
        if self._closed:
            raise ConnectionError("the shared port is closed")
        while True:
            ufrag = "".join(secrets.choice(_ICE_ALPHABET) for _ in range(_UFRAG_LEN))
            if not self._demux.has_call(ufrag):
                break
        password = "".join(secrets.choice(_ICE_ALPHABET) for _ in range(_PASSWORD_LEN))
        self._demux.add_call(time.monotonic(), ufrag, password)
        conn = LiteConnection(self, ufrag, password, self._candidates())
        self._conns[ufrag] = conn
        return conn

    def _candidates(self) -> list[Candidate]:
        udp = Candidate(foundation=candidate_foundation("host", "udp", self.announce),
                        component=1, transport="udp", priority=candidate_priority(1, "host"),
                        host=self.announce, port=self.port, type="host")
        if self.tcp_port is None:
            return [udp]
        tcp = Candidate(foundation=candidate_foundation("host", "tcp", self.announce),
                        component=1, transport="tcp",
                        priority=candidate_priority(1, "host", TCP_PASSIVE_LOCAL_PREF),
                        host=self.announce, port=self.tcp_port, type="host", tcptype="passive")
        return [udp, tcp]

    def set_remote_ufrag(self, ufrag: str, remote: str | None) -> None:
        self._demux.set_remote_ufrag(ufrag, remote)

    def forget(self, ufrag: str) -> None:
        self._demux.remove_call(ufrag)
        self._conns.pop(ufrag, None)

    # -- the socket --------------------------------------------------------------------

    def sendto(self, data: bytes, addr: Addr) -> None:
        # Straight on the socket: asyncio's transport would queue without bound when the
        # socket buffer is full; a real-time datagram is dropped instead (counted).
        if self._sock is None:
            return
        try:
            self._sock.sendto(data, addr)
        except OSError:
            self.counters.send_errors += 1

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if not isinstance(data, bytes) or not fits(data):
            self.counters.oversized += 1
            return
        source = (str(addr[0]), int(addr[1]))  # an IPv6 source is a 4-tuple
        if data[0] < 4:  # RFC 7983: 0..3 is STUN
            self._stun(data, source)
            return
        ufrag = self._demux.route(source)
        conn = self._conns.get(ufrag) if ufrag is not None else None
        if conn is None:
            self.counters.unknown_source += 1
            _refused.note(time.monotonic(), source, "not STUN, and no valid check from there")
            return
        # Looked up on each datagram: SrtpFastPath replaces it on the instance.
        conn.data_received(data, 1)

    def _stun(self, data: bytes, source: Addr) -> None:
        now = time.monotonic()
        outcome = self._demux.on_stun(now, data, source)
        if isinstance(outcome, Refused):
            refused = self.counters.refused
            refused[outcome.reason] = refused.get(outcome.reason, 0) + 1
            _refused.note(now, source, f"STUN: {outcome.reason}")
            return
        self.counters.checks += 1
        self.sendto(outcome.reply, source)
        conn = self._conns.get(outcome.ufrag)
        if conn is not None and outcome.selected:
            conn._select(SelectedPair(self, source))

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier datagram (a browser gone): consent will tell.
        self.counters.send_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._shutdown_all("the shared port closed")

    def _tick(self) -> None:
        now = time.monotonic()
        for ufrag, reason in self._demux.expired(now):
            if reason == "consent expired":
                self.counters.consent_failures += 1
            else:
                self.counters.connect_failures += 1
            conn = self._conns.pop(ufrag, None)
            if conn is not None:
                log.info("ICE-lite: call %s released: %s", ufrag, reason)
                conn._shutdown(reason)
        _refused.flush(now)
        if not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self.settings.tick, self._tick)

    def _shutdown_all(self, reason: str) -> None:
        for conn in list(self._conns.values()):
            conn._shutdown(reason)
        self._conns.clear()

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._shutdown_all("the shared port closed")
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


class LiteConnection:
    """One call's ICE-lite side, in the shape of aioice's `Connection` as aiortc uses it
    (see CONNECTION_MEMBERS): no sockets of its own, no checks sent, no consent timer of
    its own - the shared port answers checks and keeps the deadlines."""

    def __init__(self, port: SharedUdpPort, ufrag: str, password: str,
                 candidates: list[Candidate]) -> None:
        self._port = port
        self._ufrag = ufrag
        self._password = password
        self._candidates = candidates
        self.ice_controlling = False  # a lite agent is always controlled
        self.remote_is_lite = False
        self.remote_password: str | None = None
        self._remote_username: str | None = None
        self._remote_candidates: list[Candidate] = []  # kept for getStats-like readers only
        self._gathered = False
        self._nominated: dict[int, SelectedPair] = {}
        self._rx: deque[bytes] = deque()
        self._rx_waiter: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        self._connected: asyncio.Future[None] = loop.create_future()
        self._event_waiter: asyncio.Future[None] | None = None
        self.failure: str | None = None  # why the transport ended, for the release cause
        self.queue_drops = 0

    def __repr__(self) -> str:
        return f"LiteConnection({self._ufrag})"

    # -- what RTCIceGatherer reads ------------------------------------------------------

    @property
    def local_username(self) -> str:
        return self._ufrag

    @property
    def local_password(self) -> str:
        return self._password

    def local_parameters(self) -> RTCIceParameters:
        """Replaces the gatherer's getLocalParameters: iceLite makes aiortc's SDP writer
        put `a=ice-lite` at session level in the answer."""
        return RTCIceParameters(usernameFragment=self._ufrag, password=self._password,
                                iceLite=True)

    @property
    def local_candidates(self) -> list[Candidate]:
        # None before gathering, as aioice: aiortc's __connect starts ICE on the first
        # call that finds candidates, and must not before the answer is set.
        return list(self._candidates) if self._gathered else []

    async def gather_candidates(self) -> None:
        self._gathered = True  # our candidates are the worker's ports: nothing to gather

    # -- what RTCIceTransport sets and calls ------------------------------------------------

    @property
    def remote_username(self) -> str | None:
        return self._remote_username

    @remote_username.setter
    def remote_username(self, value: str | None) -> None:
        self._remote_username = value
        self._port.set_remote_ufrag(self._ufrag, value)

    @property
    def remote_candidates(self) -> list[Candidate]:
        return list(self._remote_candidates)

    async def add_remote_candidate(self, candidate: Candidate | None) -> None:
        # A lite agent learns the browser's address from its checks; signalled candidates
        # are never contacted (nor mDNS-resolved). A few are kept for inspection.
        if candidate is not None and len(self._remote_candidates) < 16:
            self._remote_candidates.append(candidate)

    async def connect(self) -> None:
        """Returns once the browser nominated a pair (USE-CANDIDATE in a valid check);
        ConnectionError if the connection closes first (the port's connect deadline)."""
        if self.remote_username is None or self.remote_password is None:
            raise ConnectionError("Remote username or password is missing")
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
        self._port.forget(self._ufrag)
        self._shutdown("closed")

    # -- what the shared port calls ---------------------------------------------------

    def data_received(self, data: bytes, component: int) -> None:
        """A datagram from one of this call's addresses. SrtpFastPath wraps this (as it
        wraps aioice's) and passes on only what is not relayed SRTP."""
        if self.failure is not None:
            return
        if len(self._rx) >= self._port.settings.queue:
            self.queue_drops += 1
            self._port.counters.queue_drops += 1
            return
        self._rx.append(data)
        if self._rx_waiter is not None and not self._rx_waiter.done():
            self._rx_waiter.set_result(None)

    def _select(self, pair: SelectedPair) -> None:
        self._nominated[1] = pair
        if not self._connected.done():
            self._connected.set_result(None)

    def _shutdown(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._nominated.clear()  # SrtpFastPath stops sending when there is no pair
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


async def use_lite_transport(pc: RTCPeerConnection, port: SharedUdpPort
                             ) -> list[LiteConnection]:
    """Put `pc`'s ICE on the shared port: call after setRemoteDescription(offer) and before
    createAnswer/setLocalDescription. One LiteConnection per ICE transport (one with
    BUNDLE). ValueError if the offer is ICE-lite too (two lite agents cannot connect)."""
    if pc.signalingState != "have-remote-offer":
        raise RuntimeError("use_lite_transport needs a remote offer and no answer yet")
    transports = getattr(pc, _ICE_TRANSPORTS_ATTR)
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
        conn = port.connection()
        gatherer = transport.iceGatherer
        gatherer._connection = conn
        gatherer.getLocalParameters = conn.local_parameters
        transport._connection = conn
        # RTCIceTransport bound these at construction; RTCDtlsTransport calls them.
        transport._recv = conn.recv
        transport._send = conn.send
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
    a member of its ICE connection that LiteConnection does not provide."""
    import aiortc.rtcdtlstransport
    import aiortc.rtcicetransport
    import aiortc.rtcpeerconnection
    from aiortc import RTCConfiguration

    from appliance.edges.rtc_adapter import SrtpFastPath

    uses = _connection_uses(inspect.getsource(m) for m in (
        aiortc.rtcicetransport, aiortc.rtcpeerconnection, aiortc.rtcdtlstransport))
    uses.update(re.findall(r"self\._conn\.(\w+)", inspect.getsource(SrtpFastPath)))
    missing = uses - CONNECTION_MEMBERS
    assert not missing, f"aiortc or SrtpFastPath use Connection members we lack: {missing}"
    absent = {name for name in CONNECTION_MEMBERS - _INSTANCE_MEMBERS
              if not hasattr(LiteConnection, name)}
    assert not absent, f"LiteConnection lacks {absent}"
    assert "iceLite" in RTCIceParameters.__dataclass_fields__, "RTCIceParameters.iceLite moved"
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    transports = getattr(pc, _ICE_TRANSPORTS_ATTR, None)
    assert transports, "RTCPeerConnection ice transports moved"
    transport = next(iter(transports))
    for attr in ("_connection", "_recv", "_send"):
        assert hasattr(transport, attr), f"RTCIceTransport.{attr} moved"
    assert transport._recv == transport._connection.recv, "RTCIceTransport._recv changed"
    gatherer = transport.iceGatherer
    assert gatherer._connection is transport._connection, "RTCIceGatherer._connection moved"
    assert hasattr(transport._connection, "_local_candidates_start")
