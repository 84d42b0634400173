"""The plain-RTP side of a call: one UDP socket pair (RTP on an even port, RTCP on the
next odd one) towards the desk phone / PBX, from the configured port range."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from appliance.core.throttle import Tally
from appliance.media.datagrams import DROPS, fits
from appliance.media.udp_send import DirectSender

log = logging.getLogger("appliance.rtp")

Address = tuple[str, int]
_ATTEMPTS = 64
# A handler that trips on a datagram is a bug to fix, not a reason for a traceback per
# packet: one line per interval for the whole process.
_handler_errors = Tally(log, "phone-side RTP/RTCP datagrams a handler could not use",
                        level=logging.WARNING)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not fits(data):
            return
        try:
            self.on_datagram(data, (addr[0], addr[1]))
        except Exception as exc:  # hostile bytes must never escape into the loop
            DROPS.malformed += 1
            _handler_errors.note(time.monotonic(), (addr[0], addr[1]),
                                 f"{type(exc).__name__}: {exc}")

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a phone that has not opened its port yet: not fatal.
        log.debug("RTP socket error: %s", exc)


class RtpSocketPair:
    def __init__(self, rtp: _Receiver, rtcp: _Receiver, address: str, port: int) -> None:
        self._rtp = rtp
        self._rtcp = rtcp
        assert rtp.transport is not None
        self._rtp_out = DirectSender(rtp.transport)
        self.address = address
        self.port = port
        self.remote_rtp: Address | None = None
        self.remote_rtcp: Address | None = None

    @classmethod
    async def open(
        cls,
        address: str,
        port_min: int,
        port_max: int,
        on_rtp: Callable[[bytes, Address], None],
        on_rtcp: Callable[[bytes, Address], None],
    ) -> RtpSocketPair:
        loop = asyncio.get_running_loop()
        first_even = port_min + (port_min % 2)
        evens = range(first_even, port_max, 2)  # port_max itself may be the RTCP port
        candidates = random.sample(evens, min(_ATTEMPTS, len(evens))) if evens else []
        for port in candidates:
            try:
                rtp_t, rtp_p = await loop.create_datagram_endpoint(
                    lambda: _Receiver(on_rtp), local_addr=(address, port)
                )
            except OSError:
                continue
            try:
                _rtcp_t, rtcp_p = await loop.create_datagram_endpoint(
                    lambda: _Receiver(on_rtcp), local_addr=(address, port + 1)
                )
            except OSError:
                rtp_t.close()
                continue
            return cls(rtp_p, rtcp_p, address, port)
        raise OSError(f"no free RTP port pair on {address} in {port_min}-{port_max}")

    def set_remote(self, host: str, port: int, rtcp_port: int | None = None) -> None:
        self.remote_rtp = (host, port)
        self.remote_rtcp = (host, rtcp_port if rtcp_port is not None else port + 1)

    def send_rtp(self, packet: bytes) -> None:
        if self.remote_rtp is not None:
            self._rtp_out.sendto(packet, self.remote_rtp)

    def send_rtcp(self, packet: bytes) -> None:
        if self.remote_rtcp is not None and self._rtcp.transport is not None:
            self._rtcp.transport.sendto(packet, self.remote_rtcp)

    def close(self) -> None:
        self._rtp_out.close()
        for receiver in (self._rtp, self._rtcp):
            if receiver.transport is not None:
                receiver.transport.close()
