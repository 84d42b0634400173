"""Which source the phone's RTP and RTCP may come from, sans-IO.

The SIP-side RTP port is public and easy to guess (a known range, one pair per call). A
packet from anyone else than the phone would otherwise reach the browser as the agent's
voice or as a key press. The phone's address is what its SDP said (the 183/200 answer, or
a later re-INVITE of the dialog: a moved media address is legitimate when the dialog's
peer says so), so:

- strict (the default): only the SDP's address and port, RTCP from the SDP's port + 1;
- latching (`[sip] rtp_latching`): the first packet from the SDP's *IP*, whatever its
  port, is the phone (a NAT in front of it may rewrite the port); from then on only that
  address:port, and our own RTP goes there too (symmetric RTP, RFC 4961). Like Asterisk's
  strictrtp with comedia. A new SDP from the dialog starts a new latch.

Before any SDP (INVITE sent, no 183/200 yet) nothing is accepted.
"""

from __future__ import annotations

from appliance.core.netaddr import normal_ip

Address = tuple[str, int]

UNSPECIFIED = ("0.0.0.0", "::")  # c=0.0.0.0 hold: says nothing about where media comes from


class _Expected:
    """One stream's (RTP or RTCP) expected source."""

    __slots__ = ("address", "latched")

    def __init__(self) -> None:
        self.address: Address | None = None
        self.latched: Address | None = None


class PeerFilter:
    def __init__(self, latching: bool = False) -> None:
        self.latching = latching
        self._rtp = _Expected()
        self._rtcp = _Expected()
        self.refused = 0

    @property
    def known(self) -> bool:
        """Whether the phone's SDP told us where its media comes from."""
        return self._rtp.address is not None

    def expect(self, host: str, port: int, rtcp_port: int | None = None) -> None:
        """The phone's SDP (answer or re-INVITE). An unspecified address (c=0.0.0.0 hold)
        keeps what we had: the phone still sends from where it did."""
        host = normal_ip(host)
        if host in UNSPECIFIED or not 0 < port < 65536:
            return
        rtcp = rtcp_port if rtcp_port is not None else port + 1
        for stream, address in ((self._rtp, (host, port)), (self._rtcp, (host, rtcp))):
            if stream.address != address:
                stream.address = address
                stream.latched = None

    def accept_rtp(self, source: Address) -> bool:
        return self._accept(self._rtp, source)

    def accept_rtcp(self, source: Address) -> bool:
        return self._accept(self._rtcp, source)

    def expected(self, rtcp: bool = False) -> Address | None:
        """The source the SDP gave for RTP (or RTCP); None before any SDP."""
        return (self._rtcp if rtcp else self._rtp).address

    def latched_rtp(self) -> Address | None:
        """Where symmetric RTP sends (latching only, once the phone's first packet came)."""
        return self._rtp.latched

    def latched_rtcp(self) -> Address | None:
        return self._rtcp.latched

    def _accept(self, stream: _Expected, source: Address) -> bool:
        expected = stream.address
        if expected is not None:
            if not self.latching:
                if source == expected:
                    return True
            elif stream.latched is not None:
                if source == stream.latched:
                    return True
            elif source[0] == expected[0]:
                stream.latched = source
                return True
        self.refused += 1
        return False
