"""Who may talk SIP to a worker's port: the source-address policy, sans-IO.

The SIP port is public. A stranger who knows a call's Call-ID and tags (a log, a packet
capture, a CDR) could otherwise end it with a BYE or take its voice with a re-INVITE that
names the stranger's own RTP address. So every datagram is checked against where it came
from before any call sees it (agent.py):

- a request or response that belongs to a call is accepted only from that call's peers:
  the proxy its INVITE went to, and the hosts of the Record-Route entries and the Contact
  the dialog was built from (and refreshed by the peer's own later requests). Those are the
  only hosts we send the call's requests to. Hosts are taken when they are IP literals;
  a host name there means "the proxy" for us anyway (we do no DNS, see Dialog.next_hop);
- a request outside any call (OPTIONS pings, a stray BYE for a call long gone) only from
  the proxy's own address(es) and the operator's `allowed_sources` networks, which are
  also accepted inside every call (a PBX cluster whose other node sends the BYE).

The comparison is by IP: a PBX may send from another port than the one it listens on
(RFC 3261 promises nothing about the source port of a request), so the port is compared
only with `strict_port` (then against the proxy's, a route's or the Contact's port exactly).
An IP check does not stop an attacker who can forge the PBX's own source address on the
path; that needs TLS or digest-authenticating the PBX, which this stack does not do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from appliance.core.netaddr import normal_ip, parse_networks

from .message import SipParseError, parse_name_addr, parse_uri
from .transaction import Addr


@lru_cache(maxsize=4096)
def _hosts_of(entries: tuple[str, ...]) -> frozenset[Addr]:
    """The IP-literal host:port of each name-addr or URI (unparsable and names skipped)."""
    peers: set[Addr] = set()
    for entry in entries:
        try:
            uri = parse_name_addr(entry).uri if "<" in entry else entry
            parsed = parse_uri(uri)
            ipaddress.ip_address(parsed.host.strip("[]"))
        except (SipParseError, ValueError):
            continue
        peers.add((normal_ip(parsed.host), parsed.port or 5060))
    return frozenset(peers)


def dialog_peers(route_set: Iterable[str], remote_target: str) -> frozenset[Addr]:
    """The hosts a dialog sends to: its route set and its remote target (cached: a call
    asks on every datagram, and the dialog changes rarely)."""
    return _hosts_of((*route_set, remote_target))


class SourcePolicy:
    def __init__(
        self,
        proxies: Iterable[Addr],
        allowed: Iterable[str] = (),
        *,
        strict_port: bool = False,
    ) -> None:
        """`proxies`: the proxy's address(es), resolved (an IP each); `allowed`: the
        operator's extra sources, as for parse_networks()."""
        self.proxies = frozenset((normal_ip(host), port) for host, port in proxies)
        self.networks = tuple(parse_networks(allowed))
        self.strict_port = strict_port

    def allows_out_of_dialog(self, source: Addr) -> bool:
        """A request that belongs to no call: from the proxy or an allowed network."""
        ip = normal_ip(source[0])
        return self._among(ip, source[1], self.proxies) or self._in_networks(ip)

    def allows_peer(self, source: Addr, peers: frozenset[Addr]) -> bool:
        """A datagram of a call whose peers (normal_ip form) are `peers`."""
        ip = normal_ip(source[0])
        return (
            self._among(ip, source[1], peers)
            or self._among(ip, source[1], self.proxies)
            or self._in_networks(ip)
        )

    def _among(self, ip: str, port: int, peers: frozenset[Addr]) -> bool:
        if self.strict_port:
            return (ip, port) in peers
        return any(peer_ip == ip for peer_ip, _ in peers)

    def _in_networks(self, ip: str) -> bool:
        if not self.networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.networks)
