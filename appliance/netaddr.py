"""One spelling per IP address, for comparing a datagram's source with an address that a
header, an SDP or a config file wrote (SIP sources, the phone's RTP source, per-address
limits)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache


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
