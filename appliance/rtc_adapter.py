"""Every use of aiortc's and aioice's private hooks lives here, and only here.

aiortc is pinned exactly in pyproject.toml; `check_hooks()` is run by a unit test so that an
upgrade that moves a hook fails loudly in CI instead of silently in a customer's rack.

Why we need hooks at all:
- aioice gathers host candidates from every interface *except* 127.0.0.1 and binds random
  ports. An appliance must announce exactly the addresses it is configured with (a rack
  server has a known public address; tests run on loopback only) from a configured UDP
  port range (so the operator's firewall can be opened for it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aioice import Candidate
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import Connection, StunProtocol, server_reflexive_candidate
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

log = logging.getLogger("appliance.rtc")

_ICE_TRANSPORTS_ATTR = "_RTCPeerConnection__iceTransports"
_BIND_ATTEMPTS = 64


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

    @classmethod
    def from_strings(
        cls, addresses: Sequence[str], port_min: int = 0, port_max: int = 0
    ) -> CandidatePolicy:
        return cls(tuple(HostAddress.parse(a) for a in addresses), port_min, port_max)


def make_configuration(ice_servers: Sequence[dict[str, Any]]) -> RTCConfiguration:
    """An RTCConfiguration with exactly the configured ICE servers.

    `RTCConfiguration()` with iceServers=None makes aiortc reach for a public STUN server;
    an explicit (possibly empty) list never does.
    """
    servers = [
        RTCIceServer(
            urls=s["urls"], username=s.get("username"), credential=s.get("credential")
        )
        for s in ice_servers
    ]
    return RTCConfiguration(iceServers=servers)


def _ice_connections(pc: RTCPeerConnection) -> list[Connection]:
    transports = getattr(pc, _ICE_TRANSPORTS_ATTR)
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
                lambda: StunProtocol(conn), local_addr=(address, port)
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
    if conn.stun_server:
        # Server-reflexive candidates only when the operator configured a STUN server.
        results = await asyncio.gather(
            *(
                server_reflexive_candidate(p, conn.stun_server)
                for p in protocols
                if ipaddress.ip_address(p.local_candidate.host).version == 4
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, Candidate):
                conn._local_candidates.append(result)
    conn._local_candidates_end = True


def check_hooks() -> None:
    """Raise AssertionError if a private hook this module relies on has moved."""
    pc = RTCPeerConnection(make_configuration([]))
    try:
        pc.addTransceiver("audio")
        assert hasattr(pc, _ICE_TRANSPORTS_ATTR), "RTCPeerConnection ice transports moved"
        conns = _ice_connections(pc)
        assert conns and all(isinstance(c, Connection) for c in conns)
        for attr in (
            "_local_candidates_start",
            "_local_candidates_end",
            "_local_candidates",
            "_protocols",
            "_components",
            "stun_server",
        ):
            assert hasattr(conns[0], attr), f"aioice Connection.{attr} moved"
        assert hasattr(StunProtocol, "datagram_received")
    finally:
        # close() is a coroutine; nothing was started, so dropping the pc is enough.
        pass
