"""The active side of ICE-TCP (appliance/edges/ice_tcp_active.py), what the SDK and the
bench's TCP callers connect with: against the worker's real media port, and against
answerers that misbehave (written here with plain asyncio streams and aioice's STUN, not
with the appliance's framing or STUN code the client itself uses).

Run in the loopback-only namespace: tests/in-loopback-netns.sh .venv/bin/python -m pytest
tests/e2e/test_ice_tcp_active.py
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aioice import Candidate
from aioice import stun as ref

from appliance.edges import ice_tcp_active
from appliance.edges.ice_tcp_active import ActivePair, ActiveTcpConnection
from appliance.edges.lite_transport import CONNECTION_MEMBERS, LiteSettings, WorkerMediaPort
from appliance.edges.rtc_adapter import HostAddress
from bench.system import loopback_only
from tests.e2e.ice_clients import free_tcp_port

HERE = [HostAddress("127.0.0.1", "127.0.0.1")]
DTLS = bytes([23, 0xFE, 0xFD]) + bytes(30)
REMOTE_UFRAG = "answ"
REMOTE_PWD = "p" * 24

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _loopback_netns(monkeypatch: pytest.MonkeyPatch) -> None:
    if not loopback_only():
        pytest.fail("this test opens sockets: run it in the loopback-only namespace, "
                    "tests/in-loopback-netns.sh .venv/bin/python -m pytest "
                    "tests/e2e/test_ice_tcp_active.py")
    # The waits a real network needs, shortened so a failing answerer fails fast.
    monkeypatch.setattr(ice_tcp_active, "CHECK_TIMEOUT", 0.5)
    monkeypatch.setattr(ice_tcp_active, "CANDIDATE_WAIT", 0.5)


def passive(port: int, priority: int = 1000, host: str = "127.0.0.1") -> Candidate:
    return Candidate(foundation="p", component=1, transport="tcp", priority=priority,
                     host=host, port=port, type="host", tcptype="passive")


def client(ufrag: str = REMOTE_UFRAG, pwd: str = REMOTE_PWD, **kw: Any
           ) -> ActiveTcpConnection:
    conn = ActiveTcpConnection("127.0.0.1", **kw)
    conn.remote_username, conn.remote_password = ufrag, pwd
    return conn


# -- against the worker's media port ---------------------------------------------------


async def test_it_connects_to_the_worker_port_and_carries_frames_both_ways() -> None:
    port = await WorkerMediaPort.open(HERE, 0, free_tcp_port(), LiteSettings())
    lite = port.connection(tcp_only=True)
    conn = ActiveTcpConnection("127.0.0.1", consent_interval=0.2)
    try:
        await conn.gather_candidates()
        (local,) = conn.local_candidates
        assert (local.transport, local.port, local.tcptype) == ("tcp", 9, "active")
        conn.remote_username, conn.remote_password = lite.local_username, lite.local_password
        lite.remote_username, lite.remote_password = conn.local_username, conn.local_password
        for candidate in lite.local_candidates or [passive(port.tcp_port)]:
            await conn.add_remote_candidate(candidate)
        await asyncio.wait_for(conn.connect(), 3)
        await asyncio.wait_for(lite.connect(), 1)  # our check nominated the pair
        assert isinstance(conn._nominated[1], ActivePair)
        assert conn._nominated[1].remote_addr == ("127.0.0.1", port.tcp_port)
        await conn.send(DTLS)
        assert await asyncio.wait_for(lite.recv(), 2) == DTLS
        back = bytes([23, 0xFE, 0xFD]) + b"back"
        await lite.send(back)
        assert await asyncio.wait_for(conn.recv(), 2) == back
        await asyncio.sleep(0.7)  # consent checks, each answered on the same stream
        assert conn.checks_answered >= 3 and conn.failure is None
        assert port.stats()["tcp_accepted"] == 1
    finally:
        await conn.close()
        await lite.close()
        port.close()
    assert conn.failure == "closed"
    with pytest.raises(ConnectionError):
        await conn.send(DTLS)


# -- answerers that misbehave ------------------------------------------------------------


Answer = Callable[[ref.Message, asyncio.StreamWriter], Awaitable[None]]


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def success(request: ref.Message, pwd: str = REMOTE_PWD) -> bytes:
    reply = ref.Message(message_method=ref.Method.BINDING, message_class=ref.Class.RESPONSE,
                        transaction_id=request.transaction_id)
    reply.attributes["XOR-MAPPED-ADDRESS"] = ("127.0.0.1", 40000)
    reply.add_message_integrity(pwd.encode())
    return bytes(reply)


@contextlib.asynccontextmanager
async def answerer(answer: Answer) -> AsyncIterator[dict[str, Any]]:
    """A TCP server reading RFC 4571 frames; every STUN request goes to `answer`."""
    seen: dict[str, Any] = {"requests": [], "connections": 0}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                if data[0] < 4:
                    request = ref.parse_message(data)
                    seen["requests"].append(request)
                    await answer(request, writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    seen["port"] = server.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.close()


async def test_its_checks_carry_what_rfc_8445_asks_and_a_valid_answer_connects() -> None:
    async def answer(request: ref.Message, writer: asyncio.StreamWriter) -> None:
        writer.write(frame(success(request)))

    async with answerer(answer) as seen:
        conn = client()
        await conn.add_remote_candidate(passive(seen["port"]))
        await asyncio.wait_for(conn.connect(), 2)
        (request,) = seen["requests"]
        # aioice parsed it: FINGERPRINT is right; the answerer's password signed it.
        assert request.check_message_integrity(REMOTE_PWD.encode())
        assert request.attributes["USERNAME"] == f"{REMOTE_UFRAG}:{conn.local_username}"
        assert "USE-CANDIDATE" in request.attributes
        assert "ICE-CONTROLLING" in request.attributes and request.attributes["PRIORITY"] > 0
        await conn.close()


async def test_an_answer_signed_with_another_password_is_not_a_connection() -> None:
    async def answer(request: ref.Message, writer: asyncio.StreamWriter) -> None:
        writer.write(frame(success(request, pwd="x" * 24)))

    async with answerer(answer) as seen:
        conn = client()
        await conn.add_remote_candidate(passive(seen["port"]))
        with pytest.raises(ConnectionError, match="ICE-TCP failed"):
            await asyncio.wait_for(conn.connect(), 3)
        assert conn.stray_frames == 1 and not conn._nominated


async def test_an_error_answer_fails_that_candidate_and_the_next_one_is_tried() -> None:
    async def refuse(request: ref.Message, writer: asyncio.StreamWriter) -> None:
        reply = ref.Message(message_method=ref.Method.BINDING, message_class=ref.Class.ERROR,
                            transaction_id=request.transaction_id)
        reply.attributes["ERROR-CODE"] = (401, "Unauthorized")
        reply.add_message_integrity(REMOTE_PWD.encode())
        writer.write(frame(bytes(reply)))

    async def accept(request: ref.Message, writer: asyncio.StreamWriter) -> None:
        writer.write(frame(success(request)))

    async with answerer(refuse) as bad, answerer(accept) as good:
        conn = client()
        closed = free_tcp_port()  # nobody listens: refused at once
        for candidate in (passive(closed, 3000), passive(bad["port"], 2000),
                          passive(good["port"], 1000)):
            await conn.add_remote_candidate(candidate)
        await asyncio.wait_for(conn.connect(), 3)
        assert conn._nominated[1].remote_addr == ("127.0.0.1", good["port"])
        assert bad["connections"] == 1 and good["connections"] == 1
        await conn.close()


async def test_garbage_from_the_answerer_is_dropped_and_its_close_ends_the_connection(
) -> None:
    async def answer(request: ref.Message, writer: asyncio.StreamWriter) -> None:
        # The answer and the first media in one write, then what no call carries: an
        # empty frame, a frame that is not STUN/DTLS/SRTP (RFC 7983), a STUN answer to
        # nothing asked, a 64 KiB frame; then a frame cut short, and the close.
        writer.write(frame(success(request)) + frame(DTLS) + frame(b"") + frame(b"\xff" * 40)
                     + frame(success(request)) + frame(bytes([0x80]) + bytes(0xFFFE))
                     + frame(DTLS)[:10])
        await writer.drain()
        await asyncio.sleep(0.3)  # what is queued when the connection ends is dropped
        writer.close()

    async with answerer(answer) as seen:
        conn = client()
        await conn.add_remote_candidate(passive(seen["port"]))
        await asyncio.wait_for(conn.connect(), 2)
        assert await asyncio.wait_for(conn.recv(), 2) == DTLS
        await asyncio.wait_for(conn.get_event(), 3)
        assert conn.failure is not None and "closed the TCP connection" in conn.failure
        assert conn.stray_frames == 3  # the empty frame, the 0xff one, the second answer
        assert conn.rx_queue_drops == 0
        # The 64 KiB frame is SRTP-shaped: handed on for SRTP to reject, then dropped
        # with everything queued when the connection ended.
        with pytest.raises(ConnectionError):
            await conn.recv()


async def test_an_answerer_that_stops_answering_loses_consent() -> None:
    async def answer_once(request: ref.Message, writer: asyncio.StreamWriter) -> None:
        if "USE-CANDIDATE" in request.attributes:
            writer.write(frame(success(request)))

    async with answerer(answer_once) as seen:
        conn = client(consent_interval=0.1, consent_timeout=0.5)
        await conn.add_remote_candidate(passive(seen["port"]))
        await asyncio.wait_for(conn.connect(), 2)
        await asyncio.wait_for(conn.get_event(), 3)
        assert conn.failure is not None and conn.failure.startswith("consent expired")
        assert len(seen["requests"]) >= 3 and not conn._nominated


async def test_no_passive_candidate_fails_after_the_wait_and_at_end_of_candidates() -> None:
    conn = client()
    udp = Candidate(foundation="u", component=1, transport="udp", priority=1,
                    host="127.0.0.1", port=9, type="host")
    await conn.add_remote_candidate(udp)
    with pytest.raises(ConnectionError, match="no passive TCP candidate"):
        await asyncio.wait_for(conn.connect(), 2)
    conn = client()
    await conn.add_remote_candidate(None)  # end of candidates: no waiting at all
    with pytest.raises(ConnectionError, match="no passive TCP candidate"):
        await asyncio.wait_for(conn.connect(), 0.2)


async def test_a_hostile_answer_cannot_make_it_keep_many_candidates() -> None:
    conn = client()
    for k in range(1000):
        await conn.add_remote_candidate(passive(1 + k))
    assert len(conn.remote_candidates) == ice_tcp_active.MAX_REMOTE_CANDIDATES


async def test_malformed_remote_credentials_are_refused_before_any_connection() -> None:
    for ufrag, pwd in (("a", REMOTE_PWD), (REMOTE_UFRAG, "short"), ("bad ufrag", REMOTE_PWD)):
        conn = client(ufrag, pwd)
        await conn.add_remote_candidate(passive(free_tcp_port()))
        with pytest.raises(ConnectionError, match="malformed"):
            await conn.connect()
    with pytest.raises(ValueError):
        ActiveTcpConnection(consent_interval=5, consent_timeout=5)


async def test_it_has_every_member_aiortc_uses_of_an_ice_connection() -> None:
    # lite_transport.check_lite_hooks() keeps CONNECTION_MEMBERS true to aiortc's source.
    conn = ActiveTcpConnection()
    assert [m for m in sorted(CONNECTION_MEMBERS) if not hasattr(conn, m)] == []
