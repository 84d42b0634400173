"""One spelling per IP address, for comparing a datagram's source with an address that a
header, an SDP or a config file wrote (SIP sources, the phone's RTP source, per-address
limits), and the networks an operator lists."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=1024)
def normal_ip(host: str) -> str:
    """"::ffff:10.0.0.1" is 10.0.0.1, brackets dropped, IPv6 compressed; a name is kept as
    it is written."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """`allowed_sources` entries: an address ("10.1.2.3", "2001:db8::5") or a network
    ("10.1.2.0/24"). Raises ValueError naming the bad entry."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"not an address or network: {entry!r} ({exc})") from None
    return networks
