"""The plain-RTP side of a call: one UDP socket pair (RTP on an even port, RTCP on the
next odd one) towards the desk phone / PBX, from the configured port range."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Any

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


class _NativeRtp:
    """The RTP socket drained by the native loop (appliance.native's PortLoop, made by the
    worker's factory): what the loop does not relay itself comes up to the receiver."""

    def __init__(self, sock: socket.socket, receiver: _Receiver,
                 make_loop: Callable[[int], Any]) -> None:
        self.sock = sock
        self.receiver = receiver
        self.loop = make_loop(sock.fileno())
        self.dropped = 0
        self._events = asyncio.get_running_loop()
        self._events.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for data, addr in self.loop.drain(time.monotonic(), time.time()):
            self.receiver.datagram_received(data, addr)

    def sendto(self, data: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:  # full buffer, or an ICMP error from an earlier packet surfacing now
            self.dropped += 1

    def close(self) -> None:
        self._events.remove_reader(self.sock.fileno())
        self.sock.close()


def _bind_udp(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


class RtpSocketPair:
    def __init__(self, rtp: _Receiver, rtcp: _Receiver, address: str, port: int,
                 native: _NativeRtp | None = None) -> None:
        self._rtp = rtp
        self._rtcp = rtcp
        self._native = native
        self._rtp_out: DirectSender | _NativeRtp
        if native is not None:
            self._rtp_out = native
        else:
            assert rtp.transport is not None
            self._rtp_out = DirectSender(rtp.transport)
        self.address = address
        self.port = port
        self.remote_rtp: Address | None = None
        self.remote_rtcp: Address | None = None

    @property
    def native_loop(self) -> Any:
        """The native loop draining the RTP socket, or None (asyncio reads it)."""
        return self._native.loop if self._native is not None else None

    @property
    def rtp_fileno(self) -> int:
        """The RTP socket's descriptor, for the native loop to send the phone's RTP from."""
        if self._native is not None:
            return self._native.sock.fileno()
        assert self._rtp.transport is not None
        return int(self._rtp.transport.get_extra_info("socket").fileno())

    @classmethod
    async def open(
        cls,
        address: str,
        port_min: int,
        port_max: int,
        on_rtp: Callable[[bytes, Address], None],
        on_rtcp: Callable[[bytes, Address], None],
        native_loop: Callable[[int], Any] | None = None,
    ) -> RtpSocketPair:
        """`native_loop(fd)`: the native loop to drain the RTP socket with (None: asyncio)."""
        loop = asyncio.get_running_loop()
        first_even = port_min + (port_min % 2)
        evens = range(first_even, port_max, 2)  # port_max itself may be the RTCP port
        candidates = random.sample(evens, min(_ATTEMPTS, len(evens))) if evens else []
        for port in candidates:
            rtp_p = _Receiver(on_rtp)
            rtp_t: asyncio.BaseTransport | None = None
            rtp_sock: socket.socket | None = None
            try:
                if native_loop is not None:
                    rtp_sock = _bind_udp(address, port)
                else:
                    rtp_t, _ = await loop.create_datagram_endpoint(
                        lambda r=rtp_p: r, local_addr=(address, port))
            except OSError:
                continue
            try:
                _rtcp_t, rtcp_p = await loop.create_datagram_endpoint(
                    lambda: _Receiver(on_rtcp), local_addr=(address, port + 1)
                )
            except OSError:
                if rtp_t is not None:
                    rtp_t.close()
                if rtp_sock is not None:
                    rtp_sock.close()
                continue
            if rtp_sock is None:
                return cls(rtp_p, rtcp_p, address, port)
            try:
                native = _NativeRtp(rtp_sock, rtp_p, native_loop)  # type: ignore[arg-type]
            except Exception:
                rtp_sock.close()
                _rtcp_t.close()
                raise
            return cls(rtp_p, rtcp_p, address, port, native)
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
        self._rtp_out.close()  # the native loop's socket with it
        for receiver in (self._rtp, self._rtcp):
            if receiver.transport is not None:
                receiver.transport.close()
