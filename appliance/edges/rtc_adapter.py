"""Every use of aiortc's and aioice's private hooks lives here and in lite_transport.py
(the ICE-lite media port's swap of aiortc's ICE connection), and nowhere else.

aiortc is pinned exactly in pyproject.toml; `check_hooks()` - which runs lite_transport's
`check_lite_hooks()` too - is run by a unit test so that an upgrade that moves a hook fails
loudly in CI instead of silently in a customer's rack.

Why we need hooks at all:
- aioice gathers host candidates from every interface *except* 127.0.0.1 and binds random
  ports. An appliance must announce exactly the addresses it is configured with (a rack
  server has a known public address; tests run on loopback only) from a configured UDP
  port range (so the operator's firewall can be opened for it). `apply_candidate_policy`
  replaces aioice's gathering with the policy's: those host candidates, a server-reflexive
  one when a STUN server is configured, and - only where the policy says `relay` (the SDK,
  a client that may sit where no UDP gets out) - a relayed one from the configured TURN
  server, as aioice's own gathering would; both bounded by `gather_timeout`.
- Relayed media must not take aiortc's receive chain (ICE queue -> DTLS transport task ->
  receiver -> decoder: a coroutine hop per packet, and a decode we do not want). Once DTLS
  is up, `SrtpFastPath` takes RTP straight from aioice's datagram callback through
  pylibsrtp to our handler, and sends with one protect + sendto. aiortc keeps ICE checks and
  consent, the DTLS handshake and keys, and RTCP.
- The ICE port takes datagrams from anyone. aiortc's receive loop fails the whole DTLS
  transport on an exception (an empty datagram is an IndexError there, one over 1500 bytes
  a ValueError from pylibsrtp), so our candidate sockets drop those before aioice sees them
  (`_GuardedStunProtocol`), and the fast path never lets a hostile packet raise.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import pylibsrtp
from aioice import Candidate
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import Connection, StunProtocol, relayed_candidate, server_reflexive_candidate
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdtlstransport import RTCDtlsTransport

from appliance.core.throttle import Tally
from appliance.edges.lite_transport import (
    CONNECTION_MEMBERS,
    ICE_TRANSPORTS_ATTR,
    check_lite_hooks,
)
from appliance.ice.demux import KIND_BY_FIRST_BYTE as _KIND_BY_FIRST_BYTE
from appliance.ice.demux import SRTP as _SRTP
from appliance.media.datagrams import DROPS, fits
from appliance.media.udp_send import DirectSender

log = logging.getLogger("appliance.rtc")

_BIND_ATTEMPTS = 64
# Per worker process, one line per interval: what strangers (or a hostile browser) send.
_oversized = Tally(log, "datagrams on an ICE port that cannot be media (empty or > 1500 B)")
_unusable = Tally(log, "SRTP/SRTCP packets the relay could not use", level=logging.WARNING)


class _GuardedStunProtocol(StunProtocol):
    """aioice's socket protocol, minus datagrams no media or ICE packet can be."""

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if not isinstance(data, bytes) or not fits(data):
            _oversized.note(time.monotonic(), (str(addr[0]), int(addr[1])),
                            f"{len(data)} bytes")
            return
        super().datagram_received(data, addr)


@dataclass(frozen=True)
class HostAddress:
    """Where to bind a candidate socket, and what address to announce for it.

    They differ behind a 1:1 NAT (bind the private address, announce the public one).
    """

    bind: str
    announce: str

    @classmethod
    def parse(cls, text: str) -> HostAddress:
        """`"10.0.0.5"` or `"10.0.0.5=203.0.113.7"` (bind=announce)."""
        bind, _, announce = text.partition("=")
        bind = bind.strip()
        announce = announce.strip() or bind
        ipaddress.ip_address(bind)
        ipaddress.ip_address(announce)
        return cls(bind, announce)


@dataclass(frozen=True)
class CandidatePolicy:
    addresses: tuple[HostAddress, ...]
    port_min: int = 0  # 0: any ephemeral port
    port_max: int = 0
    # A relayed candidate from the configuration's TURN server, if it has one. Off on the
    # appliance's side (its workers announce their own public addresses and hold no TURN
    # credential); on for the SDK, whose network may let no UDP out.
    relay: bool = False
    # Server-reflexive and relayed candidates not in by then are given up (aioice: 5 s):
    # setLocalDescription, which gathers, never waits longer on a STUN or TURN server.
    gather_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.gather_timeout <= 30:
            raise ValueError("gather_timeout must be in (0, 30] seconds")

    @classmethod
    def from_strings(
        cls, addresses: Sequence[str], port_min: int = 0, port_max: int = 0, *,
        relay: bool = False,
    ) -> CandidatePolicy:
        return cls(tuple(HostAddress.parse(a) for a in addresses), port_min, port_max, relay)


def make_configuration(ice_servers: Sequence[dict[str, Any]]) -> RTCConfiguration:
    """An RTCConfiguration with exactly the configured ICE servers.

    `RTCConfiguration()` with iceServers=None makes aiortc reach for a public STUN server;
    an explicit (possibly empty) list never does. An entry with a `secret_file` (a
    `[media] ice_servers` TURN server run with coturn's use-auth-secret, as the workers get
    the config) is left out: it is the source of the pages' per-call credentials, not a
    server anyone here can log in to.
    """
    servers = [
        RTCIceServer(
            urls=s["urls"], username=s.get("username"), credential=s.get("credential")
        )
        for s in ice_servers
        if not s.get("secret_file")
    ]
    return RTCConfiguration(iceServers=servers)


def _ice_connections(pc: RTCPeerConnection) -> list[Connection]:
    transports = getattr(pc, ICE_TRANSPORTS_ATTR)
    return [t.iceGatherer._connection for t in transports]


def apply_candidate_policy(pc: RTCPeerConnection, policy: CandidatePolicy) -> None:
    """Make every ICE connection of `pc` gather only the policy's host candidates.

    Call after the transceivers exist (offerer: after addTransceiver; answerer: after
    setRemoteDescription) and before setLocalDescription, which is what gathers.
    """
    for conn in _ice_connections(pc):
        if conn._local_candidates_start:
            continue

        async def gather(conn: Connection = conn) -> None:
            await _gather_host_candidates(conn, policy)

        conn.gather_candidates = gather  # type: ignore[method-assign]


async def _bind(
    loop: asyncio.AbstractEventLoop, conn: Connection, address: str, policy: CandidatePolicy
) -> tuple[asyncio.DatagramTransport, StunProtocol]:
    if policy.port_min <= 0:
        ports = [0]
    else:
        span = range(policy.port_min, policy.port_max + 1)
        ports = random.sample(span, min(_BIND_ATTEMPTS, len(span)))
    last_error: OSError | None = None
    for port in ports:
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _GuardedStunProtocol(conn), local_addr=(address, port)
            )
            return transport, protocol
        except OSError as exc:  # port taken by another call or process: try another
            last_error = exc
    raise OSError(f"no free UDP port on {address} in {policy.port_min}-{policy.port_max}") from (
        last_error
    )


async def _gather_host_candidates(conn: Connection, policy: CandidatePolicy) -> None:
    if conn._local_candidates_start:
        return
    conn._local_candidates_start = True
    loop = asyncio.get_running_loop()
    protocols: list[StunProtocol] = []
    for component in sorted(conn._components):
        for address in policy.addresses:
            try:
                transport, protocol = await _bind(loop, conn, address.bind, policy)
            except OSError as exc:
                log.warning("ICE: cannot bind %s: %s", address.bind, exc)
                continue
            port = transport.get_extra_info("sockname")[1]
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", address.announce),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=address.announce,
                port=port,
                type="host",
            )
            protocols.append(protocol)
            conn._local_candidates.append(protocol.local_candidate)
    conn._protocols += protocols
    lookups: list[asyncio.Task[tuple[Candidate, StunProtocol | None]]] = []
    if conn.stun_server:
        # Server-reflexive candidates only when the operator configured a STUN server.
        lookups += [
            asyncio.create_task(_server_reflexive(p, conn.stun_server))
            for p in protocols
            if ipaddress.ip_address(p.local_candidate.host).version == 4
        ]
    if policy.relay and conn.turn_server:
        lookups += [
            asyncio.create_task(_relayed(conn, component))
            for component in sorted(conn._components)
        ]
    if lookups:
        try:
            _, pending = await asyncio.wait(lookups, timeout=policy.gather_timeout)
        except BaseException:  # cancelled (the pc closed while gathering): keep nothing
            for task in lookups:
                task.cancel()
                task.add_done_callback(_close_unused)
            raise
        for task in pending:
            task.cancel()  # a TURN allocation under way closes its socket (aioice)
        await asyncio.gather(*pending, return_exceptions=True)
        for task in lookups:
            if task in pending or task.exception() is not None:
                log.info("ICE: a server-reflexive or relayed candidate failed: %r",
                         "timed out" if task in pending else task.exception())
                continue
            candidate, relay_protocol = task.result()
            conn._local_candidates.append(candidate)
            if relay_protocol is not None:
                conn._protocols.append(relay_protocol)  # closed with the connection
    conn._local_candidates_end = True


def _close_unused(task: asyncio.Task[tuple[Candidate, StunProtocol | None]]) -> None:
    """A lookup whose gathering was cancelled: a TURN allocation it made is released."""
    if not task.cancelled() and task.exception() is None:
        _, protocol = task.result()
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


async def _server_reflexive(
    protocol: StunProtocol, stun_server: tuple[str, int]
) -> tuple[Candidate, StunProtocol | None]:
    return await server_reflexive_candidate(protocol, stun_server), None


async def _relayed(conn: Connection, component: int) -> tuple[Candidate, StunProtocol | None]:
    """A relayed candidate from the connection's TURN server (aiortc put its address and
    credential there from the configuration), received through our guarded protocol."""
    candidate, protocol = await relayed_candidate(
        component=component,
        hide_related_address=False,
        protocol_factory=lambda: _GuardedStunProtocol(conn),
        turn_server=conn.turn_server,
        turn_username=conn.turn_username,
        turn_password=conn.turn_password,
        turn_ssl=conn.turn_ssl,
        turn_transport=conn.turn_transport,
    )
    return candidate, protocol


class SilentTrack(MediaStreamTrack):
    """A track that yields no frame until another track is attached to it.

    It makes aiortc answer `sendrecv` (a transceiver needs a track to send) while the
    packets on that stream really come from `SrtpFastPath.send_rtp`. Only the bench's
    baseline attaches a real track (decode and re-encode through aiortc); an attached track
    takes effect even though aiortc's sender is already waiting on this one.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._source: asyncio.Future[MediaStreamTrack] = (
            asyncio.get_running_loop().create_future()
        )

    def attach(self, source: MediaStreamTrack) -> None:
        if not self._source.done():
            self._source.set_result(source)

    async def recv(self) -> Any:
        source = await self._source
        return await source.recv()

    def stop(self) -> None:
        super().stop()
        if not self._source.done():
            self._source.cancel()


class SrtpFastPath:
    """The short path for relayed RTP on one connected peer connection (BUNDLE: one
    transport carries every m-line)."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        on_rtp: Callable[[bytes], None],
        on_rtcp: Callable[[bytes], None] | None = None,
        handled_pts: Container[int] | None = None,
    ) -> None:
        dtls = _dtls_transport(pc)
        if dtls is None or dtls._rx_srtp is None or dtls._tx_srtp is None:
            raise RuntimeError("DTLS-SRTP is not established on this peer connection")
        self._rx: pylibsrtp.Session = dtls._rx_srtp
        self._tx: pylibsrtp.Session = dtls._tx_srtp
        self._conn: Connection = dtls.transport._connection
        self._on_rtp = on_rtp
        # With on_rtcp, the relay owns RTCP too (feedback about relayed streams must reach
        # the other browser, which aiortc knows nothing of); without it aiortc keeps it.
        self._on_rtcp = on_rtcp
        # Payload types the relay consumes (a live view: consumers come and go); packets
        # of any other type are left to aiortc. None: every RTP packet is ours.
        self._handled = handled_pts
        self._chain = self._conn.data_received
        self._conn.data_received = self._data_received  # type: ignore[method-assign]
        self.received = 0
        self.sent = 0
        self.unprotect_errors = 0  # failed SRTP authentication/replay: not the keyed peer
        self.handler_errors = 0  # authenticated, then a handler could not use it
        self.protect_errors = 0  # too big to protect (a browser's near-MTU packet + our ext)
        # One direct sender per aioice candidate pair's socket (the nominated pair rarely
        # changes); the send function of the pair last used, so a packet costs no lookup.
        self._senders: dict[int, DirectSender] = {}
        self._last_pair: object = None
        self._last_send: Callable[[bytes], None] | None = None
        self._detached = False
        self._tx_by_ssrc: dict[int, Any] = {}

    def _data_received(self, data: bytes, component: int) -> None:
        if not fits(data):
            return
        # RFC 7983 by demux's table (fits() lets no empty datagram through; an index is
        # cheaper than a call). RFC 5761 below: RTCP packet types are 192..223.
        if _KIND_BY_FIRST_BYTE[data[0]] is not _SRTP:
            self._chain(data, component)  # DTLS (and STUN that aioice did not take)
            return
        if len(data) < 12:
            self._unprotect_failed()  # shorter than any RTP header: never worth a call
            return
        if not 192 <= data[1] <= 223:
            if self._handled is not None and data[1] & 0x7F not in self._handled:
                self._chain(data, component)  # SRTP leaves the RTP header in clear
                return
            try:
                packet = self._rx.unprotect(data)
            except (pylibsrtp.Error, ValueError):
                self._unprotect_failed()
                return
            self.received += 1
            try:
                self._on_rtp(packet)
            except Exception as exc:  # the keyed browser itself may be hostile
                self._handler_failed(exc)
            return
        if self._on_rtcp is None:
            self._chain(data, component)
            return
        try:
            packet = self._rx.unprotect_rtcp(data)
        except (pylibsrtp.Error, ValueError):
            self._unprotect_failed()
            return
        try:
            self._on_rtcp(packet)
        except Exception as exc:
            self._handler_failed(exc)

    def _peer(self) -> tuple[str, int]:
        pair = self._conn._nominated.get(1)
        return (str(pair.remote_addr[0]), int(pair.remote_addr[1])) if pair else ("?", 0)

    def _unprotect_failed(self) -> None:
        # Anyone can send these (or a network duplicates a packet: replay): count only.
        self.unprotect_errors += 1
        DROPS.unprotect_failed += 1

    def _handler_failed(self, exc: Exception) -> None:
        self.handler_errors += 1
        DROPS.malformed += 1
        _unusable.note(time.monotonic(), self._peer(), f"{type(exc).__name__}: {exc}")

    def _send_function(self, pair: Any) -> Callable[[bytes], None]:
        """How to put one protected packet on the selected pair. The ICE-lite port's pairs
        send themselves (`pair.send`: a datagram on the shared socket, or an RFC 4571 frame
        through an ICE-TCP connection's bounded writer); aioice's CandidatePair has no
        such method, so a dup of its socket sends with one sendto."""
        if pair is self._last_pair and self._last_send is not None:
            return self._last_send
        send = getattr(pair, "send", None)
        if send is None and pair.protocol.transport.get_extra_info("socket") is None:
            # A relayed pair: aioice's TurnTransport has no socket of its own to send on
            # (its sendto wraps each packet for the TURN server).
            send = functools.partial(pair.protocol.transport.sendto, addr=pair.remote_addr)
        elif send is None:
            sender = self._senders.get(id(pair.protocol))
            if sender is None:
                sender = self._senders[id(pair.protocol)] = DirectSender(pair.protocol.transport)
            addr = pair.remote_addr

            def send(data: bytes, sender: DirectSender = sender, addr: Any = addr) -> None:
                sender.sendto(data, addr)

        self._last_pair, self._last_send = pair, send
        return send

    def nominated_udp(self) -> tuple[Any, Any, tuple[str, int]] | None:
        """(aioice's datagram protocol, its socket, the remote address) of the selected pair
        when it is a plain UDP pair of aioice's own on a selector event loop (whose reader a
        caller may take over); None otherwise (ICE-TCP, TURN, the ICE-lite port's pairs,
        uvloop's transports, no pair yet). For a caller that drains that socket itself."""
        pair = self._conn._nominated.get(1)
        if pair is None or hasattr(pair, "send"):
            return None
        transport = getattr(pair.protocol, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or getattr(transport, "_read_ready", None) is None:
            return None
        return pair.protocol, sock, (str(pair.remote_addr[0]), int(pair.remote_addr[1]))

    def use_tx_for(self, ssrc: int, session: Any) -> None:
        """Protect our stream `ssrc` with `session` from now on: the native loop's sender
        for a stream it sends too (appliance.native's Srtp, pylibsrtp's API), so that one
        sender's rollover counter follows the stream whoever sends its next packet."""
        self._tx_by_ssrc[ssrc] = session

    def send_rtp(self, packet: bytes) -> None:
        pair = self._conn._nominated.get(1)
        if pair is None or self._detached:  # ICE restarting, or the leg is being torn down
            return
        tx = self._tx
        if self._tx_by_ssrc and len(packet) >= 12:
            tx = self._tx_by_ssrc.get(int.from_bytes(packet[8:12], "big"), tx)
        try:
            protected = tx.protect(packet)
        except (pylibsrtp.Error, ValueError) as exc:
            self._protect_failed(exc)
            return
        self._send_function(pair)(protected)
        self.sent += 1

    def send_rtcp(self, packet: bytes) -> None:
        pair = self._conn._nominated.get(1)
        if pair is None or self._detached:
            return
        try:
            protected = self._tx.protect_rtcp(packet)
        except (pylibsrtp.Error, ValueError) as exc:
            self._protect_failed(exc)
            return
        self._send_function(pair)(protected)

    def _protect_failed(self, exc: Exception) -> None:
        self.protect_errors += 1
        _unusable.note(time.monotonic(), self._peer(), f"not sent: {type(exc).__name__}: {exc}")

    def detach(self) -> None:
        self._detached = True
        if self._conn.data_received == self._data_received:
            self._conn.data_received = self._chain  # type: ignore[method-assign]
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        self._last_pair = self._last_send = None


@dataclass(frozen=True)
class SrtpKeys:
    """One connected leg's SRTP keys, as aiortc derived them for its own sessions (RFC 5764
    section 4.2): for the native packet path, whose sessions must match aiortc's."""

    profile: int  # libsrtp's srtp_profile_t (pylibsrtp.Policy.SRTP_PROFILE_*)
    rx: bytes = field(repr=False)  # key + salt of what the browser sends us
    tx: bytes = field(repr=False)  # key + salt of what we send the browser


def srtp_keys(pc: RTCPeerConnection) -> SrtpKeys:
    """The SRTP keys of `pc`'s DTLS transport (BUNDLE: one), re-derived exactly as
    RTCDtlsTransport._setup_srtp does. RuntimeError before DTLS is up."""
    dtls = _dtls_transport(pc)
    if dtls is None or dtls._rx_srtp is None or dtls._ssl is None:
        raise RuntimeError("DTLS-SRTP is not established on this peer connection")
    selected = dtls._ssl.get_selected_srtp_profile()
    profile = next((p for p in dtls._srtp_profiles if p.openssl_profile == selected), None)
    if profile is None:
        raise RuntimeError(f"no SRTP profile for {selected!r}")
    view = dtls._ssl.export_keying_material(
        b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length))
    ours, theirs = (1, 0) if dtls._role == "server" else (0, 1)
    return SrtpKeys(profile.libsrtp_profile, rx=profile.get_key_and_salt(view, theirs),
                    tx=profile.get_key_and_salt(view, ours))


def _dtls_transport(pc: RTCPeerConnection) -> RTCDtlsTransport | None:
    for transceiver in pc.getTransceivers():
        transport = transceiver.sender.transport
        if transport is not None:
            return transport
    return None


@dataclass(frozen=True)
class AudioSender:
    sender: RTCRtpSender

    @property
    def ssrc(self) -> int:
        """The SSRC aiortc announced for this sender in the answer (a=ssrc)."""
        return int(self.sender._ssrc)


def audio_sender(pc: RTCPeerConnection) -> AudioSender:
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio":
            return AudioSender(transceiver.sender)
    raise LookupError("no audio transceiver")


def sender_ssrc(pc: RTCPeerConnection, kind: str) -> int:
    """Our SSRC for `kind` on this leg, as announced in the answer (a=ssrc)."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind == kind:
            return int(transceiver.sender._ssrc)
    raise LookupError(f"no {kind} transceiver")


def sync_sender_report(sender: RTCRtpSender, packets: int, octets: int, rtp_timestamp: int,
                       ntp_timestamp: int) -> None:
    """Make aiortc's periodic RTCP sender report describe the packets we relayed on its
    SSRC (it only counts what its own encoder sent, which is nothing)."""
    sender._RTCRtpSender__packet_count = packets  # type: ignore[attr-defined]
    sender._RTCRtpSender__octet_count = octets  # type: ignore[attr-defined]
    sender._RTCRtpSender__rtp_timestamp = rtp_timestamp  # type: ignore[attr-defined]
    sender._RTCRtpSender__ntp_timestamp = ntp_timestamp  # type: ignore[attr-defined]


class DecoderCounter:
    """Counts every media decoder aiortc creates in this process.

    The relay must never decode what it only forwards; this makes that a number an operator
    (and a test) can read in /metrics rather than a promise.
    """

    def __init__(self) -> None:
        self.created = 0
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        import aiortc.rtcrtpreceiver as receiver_module

        original = receiver_module.get_decoder

        def counting_get_decoder(codec: Any) -> Any:
            self.created += 1
            log.warning("a %s decoder was created: media is being decoded", codec.mimeType)
            return original(codec)

        receiver_module.get_decoder = counting_get_decoder  # type: ignore[assignment]
        self._installed = True


DECODERS = DecoderCounter()


def check_hooks() -> None:
    """Raise AssertionError if a private hook this module or lite_transport relies on has
    moved (needs a running event loop: it builds RTCPeerConnections)."""
    check_lite_hooks()
    # The fast path runs on lite_transport's LiteConnection too: every member of the ICE
    # connection it touches must be one LiteConnection provides.
    uses = set(re.findall(r"self\._conn\.(\w+)", inspect.getsource(SrtpFastPath)))
    assert uses <= CONNECTION_MEMBERS, f"SrtpFastPath uses {uses - CONNECTION_MEMBERS}"
    pc = RTCPeerConnection(make_configuration([]))
    try:
        pc.addTransceiver("audio")
        assert hasattr(pc, ICE_TRANSPORTS_ATTR), "RTCPeerConnection ice transports moved"
        conns = _ice_connections(pc)
        assert conns and all(isinstance(c, Connection) for c in conns)
        for attr in (
            "_local_candidates_start",
            "_local_candidates_end",
            "_local_candidates",
            "_protocols",
            "_components",
            "stun_server",
            "turn_server",
            "turn_username",
            "turn_password",
            "turn_ssl",
            "turn_transport",
        ):
            assert hasattr(conns[0], attr), f"aioice Connection.{attr} moved"
        relay_args = set(inspect.signature(relayed_candidate).parameters)
        assert relay_args == {"component", "hide_related_address", "protocol_factory",
                              "turn_server", "turn_username", "turn_password", "turn_ssl",
                              "turn_transport"}, f"aioice relayed_candidate changed: {relay_args}"
        assert hasattr(StunProtocol, "datagram_received")
        import aiortc.rtcrtpreceiver as receiver_module

        assert callable(receiver_module.get_decoder), "aiortc get_decoder moved"
        assert hasattr(conns[0], "data_received") and hasattr(conns[0], "_nominated")
        dtls = _dtls_transport(pc)
        assert dtls is not None
        for attr in ("_rx_srtp", "_tx_srtp", "transport"):
            assert hasattr(dtls, attr), f"RTCDtlsTransport.{attr} moved"
        sender = pc.getTransceivers()[0].sender
        assert isinstance(audio_sender(pc).ssrc, int)
        for attr in ("__packet_count", "__octet_count", "__rtp_timestamp", "__ntp_timestamp"):
            assert hasattr(sender, "_RTCRtpSender" + attr), f"RTCRtpSender.{attr} moved"
    finally:
        # close() is a coroutine; nothing was started, so dropping the pc is enough.
        pass
