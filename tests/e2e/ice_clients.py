"""Test-side ICE peers for the worker's media port (appliance/edges/lite_transport.py).

- `check()`: a connectivity check as aioice (the full agent under aiortc, our reference)
  builds one.
- `TcpIceClient`: the smallest honest ICE-TCP active side (RFC 6544): a TCP connection to
  the port's passive candidate carrying RFC 4571 frames (2-byte length, then the packet),
  framed and deframed here with asyncio streams, not with appliance.ice.framing.
- `TcpIceConnection`: a full ICE agent's connection for aiortc, in the shape aiortc's
  RTCIceTransport uses (lite_transport.CONNECTION_MEMBERS), over a TcpIceClient: aioice has
  no ICE-TCP, so this is how an aiortc "browser" places a whole DTLS-SRTP call over TCP.
  It connects to the answer's passive TCP candidate, nominates with its first check
  (USE-CANDIDATE, ICE-CONTROLLING), keeps consent with a check every `consent_interval`,
  and carries DTLS/SRTP in frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import string

from aioice import Candidate, ConnectionClosed
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


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


class TcpIceConnection:
    """What aiortc's RTCIceGatherer/RTCIceTransport use of aioice's Connection, as a full
    agent that speaks only ICE-TCP (active) to an ICE-lite answerer."""

    def __init__(self, consent_interval: float = 1.0) -> None:
        self.ice_controlling = True
        self.local_username = _random(8)
        self.local_password = _random(24)
        self.remote_is_lite = False
        self.remote_username: str | None = None
        self.remote_password: str | None = None
        self._remote_candidates: list[Candidate] = []
        self._nominated: dict[int, object] = {}
        self._consent_interval = consent_interval
        self._client: TcpIceClient | None = None
        self._rx: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.responses = 0  # consent answers read
        # RFC 6544 section 4.5: an active candidate announces port 9 (the discard port).
        self._candidates = [Candidate(
            foundation="1", component=1, transport="tcp", priority=1, host="127.0.0.1",
            port=9, type="host", tcptype="active")]

    @property
    def local_candidates(self) -> list[Candidate]:
        return list(self._candidates)

    @property
    def remote_candidates(self) -> list[Candidate]:
        return list(self._remote_candidates)

    async def gather_candidates(self) -> None:
        pass

    async def add_remote_candidate(self, candidate: Candidate | None) -> None:
        if candidate is not None:
            self._remote_candidates.append(candidate)

    def _check(self, nominate: bool) -> bytes:
        assert self.remote_username is not None and self.remote_password is not None
        return check(self.remote_username, self.remote_password, nominate=nominate,
                     remote=self.local_username)

    async def connect(self) -> None:
        passive = [c for c in self._remote_candidates
                   if c.transport.lower() == "tcp" and c.tcptype == "passive"]
        if not passive or self.remote_password is None:
            raise ConnectionError("no passive TCP candidate to connect to")
        target = passive[0]
        try:
            self._client = await TcpIceClient.connect(target.port, target.host)
            answer = await self._client.ask(self._check(nominate=True))
        except (TimeoutError, OSError, ValueError) as exc:
            raise ConnectionError(f"ICE-TCP check failed: {exc}") from exc
        if (answer.message_class != ref.Class.RESPONSE
                or not answer.check_message_integrity(self.remote_password.encode())):
            raise ConnectionError(f"ICE-TCP check answered {answer}")
        self._nominated[1] = target
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._consent())]

    async def _read(self) -> None:
        assert self._client is not None
        try:
            while True:
                frame = await self._client.read_frame(timeout=3600)
                if frame and frame[0] < 4:
                    self.responses += 1  # a consent answer (RFC 7983: STUN)
                else:
                    self._rx.put_nowait(frame)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._closed.set()
            self._rx.put_nowait(None)

    async def _consent(self) -> None:
        assert self._client is not None
        while not self._closed.is_set():
            await asyncio.sleep(self._consent_interval)
            self._client.send_frame(self._check(nominate=False))

    async def recv(self) -> bytes:
        frame = await self._rx.get()
        if frame is None:
            self._rx.put_nowait(None)
            raise ConnectionError("ICE-TCP connection closed")
        return frame

    async def send(self, data: bytes) -> None:
        if self._client is None or self._closed.is_set():
            raise ConnectionError("ICE-TCP not connected")
        self._client.send_frame(data)

    async def get_event(self) -> ConnectionClosed:
        await self._closed.wait()
        return ConnectionClosed()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._client is not None:
            self._client.close()
        self._closed.set()
        self._rx.put_nowait(None)
