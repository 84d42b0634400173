"""Test-side ICE peers for the worker's media port (appliance/edges/lite_transport.py).

- `check()`: a connectivity check as aioice (the full agent under aiortc, our reference)
  builds one.
- `TcpIceClient`: the smallest honest ICE-TCP active side (RFC 6544): a TCP connection to
  the port's passive candidate carrying RFC 4571 frames (2-byte length, then the packet),
  framed and deframed here with asyncio streams, not with appliance.ice.framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import string

from aioice import stun as ref

PRIORITY = 1853824767
_ALPHABET = string.ascii_letters + string.digits


def check(ufrag: str, password: str, *, nominate: bool = False, controlling: bool = True,
          remote: str = "brws", transaction_id: bytes | None = None) -> bytes:
    """A connectivity check as aioice builds one (FINGERPRINT after MESSAGE-INTEGRITY)."""
    msg = ref.Message(message_method=ref.Method.BINDING, message_class=ref.Class.REQUEST,
                      transaction_id=transaction_id or os.urandom(12))
    msg.attributes["USERNAME"] = f"{ufrag}:{remote}"
    msg.attributes["PRIORITY"] = PRIORITY
    if controlling:
        msg.attributes["ICE-CONTROLLING"] = 0x1122334455667788
        if nominate:
            msg.attributes["USE-CANDIDATE"] = None
    else:
        msg.attributes["ICE-CONTROLLED"] = 0x1122334455667788
    msg.add_message_integrity(password.encode())
    return bytes(msg)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the test namespace is ours alone)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TcpIceClient:
    """One ICE-TCP connection from the browser's side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", *, source: str = "127.0.0.1",
                      rcvbuf: int | None = None) -> TcpIceClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connect: the window is fixed from the SYN on
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((source, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=2048)
        return cls(reader, writer)

    @property
    def local(self) -> tuple[str, int]:
        name = self.writer.get_extra_info("sockname")
        return (name[0], int(name[1]))

    def send_frame(self, data: bytes) -> None:
        self.writer.write(len(data).to_bytes(2, "big") + data)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_frame(self, timeout: float = 2.0) -> bytes:
        async def read() -> bytes:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
            return await self.reader.readexactly(length)
        return await asyncio.wait_for(read(), timeout)

    async def ask(self, data: bytes, timeout: float = 2.0) -> ref.Message:
        """Send a framed check; the next frame, parsed by aioice (FINGERPRINT checked)."""
        self.send_frame(data)
        return ref.parse_message(await self.read_frame(timeout))

    async def closed_by_peer(self, timeout: float) -> bytes:
        """Wait for the other side to close (EOF or RST); what it sent until then.
        TimeoutError if the connection is still open after `timeout`."""
        got = bytearray()

        async def drain() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await self.reader.read(4096):
                    got.extend(chunk)
        await asyncio.wait_for(drain(), timeout)
        return bytes(got)

    def close(self) -> None:
        self.writer.transport.abort()
