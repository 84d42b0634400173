"""ICE-TCP on the worker's media port (RFC 6544 passive side, RFC 4571 framing;
appliance/edges/lite_transport.py): aioice has no TCP, so the browser's side here is
tests/e2e/ice_clients.py - a raw RFC 4571 client whose checks aioice builds and whose
answers aioice parses, and, for a whole call, an aiortc peer connection whose ICE is the
SDK's active ICE-TCP side (appliance/edges/ice_tcp_active.py) so that aiortc's DTLS-SRTP
runs over TCP against ours. The browsers (tests/e2e/test_pages_ice_tcp.py) are the
independent ICE-TCP clients.

Run in the loopback-only namespace: tests/in-loopback-netns.sh .venv/bin/python -m pytest
tests/e2e/test_ice_tcp.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aioice import stun as ref
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.edges.ice_tcp import TcpPair
from appliance.edges.ice_tcp_active import use_active_tcp
from appliance.edges.lite_transport import (
    LiteConnection,
    LiteSettings,
    WorkerMediaPort,
    offer_without_candidates,
    use_lite_transport,
)
from appliance.edges.rtc_adapter import (
    HostAddress,
    SilentTrack,
    SrtpFastPath,
    make_configuration,
    sender_ssrc,
)
from appliance.ice.tcp_writer import MIN_LIMIT, WRITE_CHUNK
from appliance.media import rtp
from bench.system import loopback_only
from tests.e2e.ice_clients import TcpIceClient, check, free_tcp_port
from tests.fuzz_scale import scaled

HERE = [HostAddress("127.0.0.1", "127.0.0.1")]
DTLS = bytes([23, 0xFE, 0xFD]) + bytes(30)
RTP = bytes([0x80, 0x00]) + bytes(40)

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _loopback_netns() -> None:
    if not loopback_only():
        pytest.fail("this test opens sockets: run it in the loopback-only namespace, "
                    "tests/in-loopback-netns.sh .venv/bin/python -m pytest "
                    "tests/e2e/test_ice_tcp.py")


async def _open(**kw: Any) -> WorkerMediaPort:
    return await WorkerMediaPort.open(HERE, 0, free_tcp_port(), LiteSettings(**kw))


@pytest.fixture
async def port() -> AsyncIterator[WorkerMediaPort]:
    p = await _open()
    yield p
    p.close()


def _creds(conn: LiteConnection) -> tuple[str, str]:
    return conn.local_username, conn.local_password


async def _eventually(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _nominated_client(port: WorkerMediaPort, conn: LiteConnection, **kw: Any
                            ) -> TcpIceClient:
    client = await TcpIceClient.connect(port.tcp_port, **kw)
    answer = await client.ask(check(*_creds(conn), nominate=True))
    assert answer.message_class == ref.Class.RESPONSE
    return client


async def test_a_check_over_tcp_is_answered_and_its_connection_becomes_the_route(
        port: WorkerMediaPort) -> None:
    conn = port.connection()
    client = await TcpIceClient.connect(port.tcp_port)
    try:
        txid = os.urandom(12)
        answer = await client.ask(check(*_creds(conn), nominate=True, transaction_id=txid))
        # Read back by aioice: FINGERPRINT (parse), our password's MESSAGE-INTEGRITY, the
        # client's own address as XOR-MAPPED-ADDRESS.
        assert answer.message_class == ref.Class.RESPONSE
        assert answer.transaction_id == txid
        assert answer.check_message_integrity(conn.local_password.encode())
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == client.local
        pair = conn._nominated[1]
        assert isinstance(pair, TcpPair)
        assert pair.path[:3] == ("tcp", *client.local) and pair.remote_addr == client.local
        assert port._agent.route(conn.local_username) == pair.path
        conn.remote_username, conn.remote_password = "brws", "b" * 22
        await asyncio.wait_for(conn.connect(), 1)  # aiortc's connect() returns: nominated

        await conn.send(DTLS)  # what the call sends goes framed on that connection
        assert await client.read_frame() == DTLS
        client.send_frame(RTP)  # and what comes on it is the call's
        assert await asyncio.wait_for(conn.recv(), 2) == RTP
        stats = port.stats()
        assert stats["tcp_accepted"] == stats["tcp_open"] == 1
        assert stats["valid_checks"] == 1 and stats["unknown_path_drops"] == 0
    finally:
        client.close()


@pytest.mark.parametrize("opening", [
    b"GET / HTTP/1.1\r\nHost: worker\r\n\r\n",
    bytes.fromhex("160301020001"),  # a TLS ClientHello
    len(DTLS).to_bytes(2, "big") + DTLS,  # well framed, but DTLS before any check
    b"\x00\x20" + bytes.fromhex("0101001c2112a442") + bytes(24),  # a Binding *response*
])
async def test_a_stranger_s_first_frame_closes_the_connection(
        port: WorkerMediaPort, opening: bytes) -> None:
    port.connection()
    client = await TcpIceClient.connect(port.tcp_port)
    try:
        client.send_raw(opening)
        started = time.monotonic()
        assert await client.closed_by_peer(timeout=2) == b""  # closed, and nothing said
        assert time.monotonic() - started < 0.5  # at once, not at the deadline
        await _eventually(lambda: port.stats()["tcp_open"] == 0, 1, "the close")
        assert port.stats()["tcp_not_ice"] == 1
    finally:
        client.close()


async def test_a_connection_with_no_valid_check_is_closed_at_the_deadline() -> None:
    port = await _open(tcp_first_check_timeout=0.5)
    conn = port.connection()
    silent = await TcpIceClient.connect(port.tcp_port)
    stranger = await TcpIceClient.connect(port.tcp_port)
    try:
        started = time.monotonic()
        # A plausible check with the wrong password: a 401, then the same deadline.
        answer = await stranger.ask(check(conn.local_username, "wrong0password000000000"))
        assert answer.message_class == ref.Class.ERROR
        assert answer.attributes["ERROR-CODE"][0] == 401
        for client in (silent, stranger):
            await client.closed_by_peer(timeout=2)
        took = time.monotonic() - started
        assert 0.4 <= took <= 1.5, took
        stats = port.stats()
        assert stats["tcp_first_check_timeouts"] == 2 and stats["tcp_open"] == 0
    finally:
        silent.close()
        stranger.close()
        port.close()


async def test_a_checked_connection_outlives_the_first_deadline_then_idles_out() -> None:
    port = await _open(tcp_first_check_timeout=0.3, consent_timeout=1.0)
    conn = port.connection()
    client = await _nominated_client(port, conn)
    try:
        for _ in range(3):  # consent checks every 0.4 s keep it, past the first deadline
            await asyncio.sleep(0.4)
            answer = await client.ask(check(*_creds(conn)))
            assert answer.message_class == ref.Class.RESPONSE
        assert port.stats()["tcp_open"] == 1
        started = time.monotonic()
        await client.closed_by_peer(timeout=3)  # then silence: closed after consent_timeout
        assert 0.8 <= time.monotonic() - started <= 1.6
        stats = port.stats()
        assert stats["tcp_idle_timeouts"] == 1 and stats["tcp_first_check_timeouts"] == 0
        assert conn.failure == "consent expired"  # and the call, on its own deadline
    finally:
        client.close()
        port.close()


async def test_a_reader_that_stops_reading_costs_drops_never_a_blocked_worker() -> None:
    port = await _open(tcp_send_buffer=MIN_LIMIT)
    stuck_call, other_call = port.connection(), port.connection()
    stuck = await _nominated_client(port, stuck_call, rcvbuf=4096)
    other = None
    try:
        pair = stuck_call._nominated[1]
        assert isinstance(pair, TcpPair)
        frames = 20_000
        started = time.monotonic()
        for seq in range(frames):  # ~20 MB at a reader that reads nothing
            pair.send(DTLS[:3] + seq.to_bytes(4, "big") + bytes(993))
        took = time.monotonic() - started
        assert took < 2.0, took  # each send returned at once
        dropped = port.stats()["tcp_frames_dropped"]
        assert dropped > frames // 2, dropped
        writer = pair._conn._writer
        assert writer is not None and writer.buffer.pending <= MIN_LIMIT
        assert pair._conn._transport is not None
        assert pair._conn._transport.get_write_buffer_size() <= 2 * WRITE_CHUNK
        # Meanwhile the worker serves everyone else at once.
        other = await TcpIceClient.connect(port.tcp_port)
        began = time.monotonic()
        answer = await other.ask(check(*_creds(other_call), nominate=True))
        assert answer.message_class == ref.Class.RESPONSE
        assert time.monotonic() - began < 0.5
        # The stuck reader reads again: whole frames, in order, with gaps where drops were.
        seqs = []
        with contextlib.suppress(TimeoutError):
            while True:
                frame = await stuck.read_frame(timeout=0.5)
                assert len(frame) == 1000 and frame[:3] == DTLS[:3], frame[:8]
                seqs.append(int.from_bytes(frame[3:7], "big"))
        assert seqs and seqs == sorted(set(seqs)) and len(seqs) == frames - dropped
    finally:
        stuck.close()
        if other is not None:
            other.close()
        port.close()


async def test_the_caps_refuse_the_next_connection_per_address_and_per_port() -> None:
    port = await _open(max_tcp_per_address=3, max_tcp_connections=5)
    clients: list[TcpIceClient] = []

    async def connect(source: str) -> TcpIceClient:
        client = await TcpIceClient.connect(port.tcp_port, source=source)
        clients.append(client)
        return client

    async def refused(client: TcpIceClient) -> None:
        await client.closed_by_peer(timeout=1)

    try:
        for _ in range(3):
            await connect("127.0.0.1")
        await _eventually(lambda: port.stats()["tcp_open"] == 3, 1, "three accepted")
        await refused(await connect("127.0.0.1"))  # the 4th from one address
        assert port.stats()["tcp_refused"] == 1
        for _ in range(2):
            await connect("127.0.0.2")
        await _eventually(lambda: port.stats()["tcp_open"] == 5, 1, "five accepted")
        await refused(await connect("127.0.0.3"))  # the 6th on the port
        assert port.stats()["tcp_refused"] == 2
        clients[0].close()  # one of the first address's closes: room for one more
        await _eventually(lambda: port.stats()["tcp_open"] == 4, 1, "the close")
        newcomer = await connect("127.0.0.1")
        await _eventually(lambda: port.stats()["tcp_open"] == 5, 1, "accepted again")
        with pytest.raises(TimeoutError):
            await newcomer.closed_by_peer(timeout=0.3)
        assert port.stats()["tcp_accepted"] == 6
    finally:
        for client in clients:
            client.close()
        port.close()


async def test_a_closed_route_is_forgotten_and_the_next_connection_takes_over(
        port: WorkerMediaPort) -> None:
    conn = port.connection()
    first = await _nominated_client(port, conn)
    second = None
    try:
        first_path = conn._nominated[1].path
        first.close()
        await _eventually(lambda: port._agent.route(conn.local_username) is None, 1,
                          "the path forgotten")
        await conn.send(DTLS)  # a pair whose connection is gone drops, counted; no raise
        assert port.stats()["tcp_frames_dropped"] == 1 and conn.failure is None
        second = await TcpIceClient.connect(port.tcp_port)
        # A check without USE-CANDIDATE: the browser re-checking from its new connection.
        answer = await second.ask(check(*_creds(conn)))
        assert answer.message_class == ref.Class.RESPONSE
        path = conn._nominated[1].path
        assert path != first_path and path[:3] == ("tcp", *second.local)
        await conn.send(DTLS)
        assert await second.read_frame() == DTLS
    finally:
        first.close()
        if second is not None:
            second.close()


# -- a whole call: aiortc's DTLS-SRTP over ICE-TCP, the fast path on our side -------------


async def test_a_full_dtls_srtp_call_over_tcp() -> None:
    port = await _open()
    browser = RTCPeerConnection(make_configuration([]))
    transceiver = browser.addTransceiver(AudioStreamTrack(), direction="sendrecv")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                     if c.mimeType == "audio/PCMU"])
    (ice,) = await use_active_tcp(browser, "127.0.0.1", consent_interval=0.5)
    appliance = RTCPeerConnection(make_configuration([]))
    frames = 0
    fast = None

    async def count_frames() -> None:
        nonlocal frames
        with contextlib.suppress(MediaStreamError):
            while True:
                await transceiver.receiver.track.recv()
                frames += 1

    counter: asyncio.Task[None] | None = None
    try:
        await browser.setLocalDescription(await browser.createOffer())
        offer = offer_without_candidates(browser.localDescription.sdp)
        await appliance.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        appliance.addTrack(SilentTrack("audio"))
        (conn,) = await use_lite_transport(appliance, port, tcp_only=True)
        await appliance.setLocalDescription(await appliance.createAnswer())
        await browser.setRemoteDescription(RTCSessionDescription(
            appliance.localDescription.sdp, "answer"))
        await _eventually(lambda: appliance.connectionState == browser.connectionState
                          == "connected", 10, "DTLS over TCP on both sides")
        assert isinstance(conn._nominated[1], TcpPair)
        counter = asyncio.create_task(count_frames())  # the track exists once connected

        fast = SrtpFastPath(appliance, on_rtp=lambda packet: None)
        ssrc = sender_ssrc(appliance, "audio")
        for seq in range(60):  # our fast path's SRTP, framed, to aiortc's decoder
            fast.send_rtp(rtp.build(0, seq == 0, seq, seq * 160, ssrc, b"\xff" * 160))
            await asyncio.sleep(0.02)
        await _eventually(lambda: frames >= 40, 5, "frames decoded by the browser")
        assert fast.sent == 60 and fast.received >= 40  # the browser's audio, over TCP
        assert fast.unprotect_errors == 0
        assert ice.checks_answered >= 2  # its consent checks were answered on the same stream
        stats = port.stats()
        assert stats["tcp_accepted"] == 1 and stats["tcp_frames_dropped"] == 0
        assert stats["unknown_path_drops"] == 0 and stats["udp_oversized"] == 0
    finally:
        if counter is not None:
            counter.cancel()
        if fast is not None:
            fast.detach()
        await browser.close()
        await appliance.close()
        port.close()


# -- hostile streams ------------------------------------------------------------------


async def _hostile_stream(opens: bool, nominate: bool, chunks: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    port = await _open()
    try:
        conn = port.connection()
        client = await TcpIceClient.connect(port.tcp_port)
        if opens:  # a valid check first: what follows reaches the agent as the call's
            client.send_frame(check(*_creds(conn), nominate=nominate))
        for chunk in chunks:
            client.send_raw(chunk)
            await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await client.closed_by_peer(timeout=0.05)
        client.close()
        await _eventually(lambda: port.stats()["tcp_open"] == 0, 2, "the close")
        # The port still answers a real check, on a new connection.
        fresh = await _nominated_client(port, conn)
        fresh.close()
        assert not errors, errors
    finally:
        port.close()


@pytest.mark.fuzz
@settings(max_examples=scaled(25, 1000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(opens=st.booleans(), nominate=st.booleans(),
       framed=st.lists(st.binary(max_size=200), max_size=6),
       raw=st.lists(st.binary(max_size=300), max_size=4))
def test_hostile_tcp_streams_never_break_the_port(opens: bool, nominate: bool,
                                                  framed: list[bytes], raw: list[bytes]) -> None:
    # After a valid check or none: well-framed garbage (any first byte: STUN, DTLS, SRTP
    # or none of those), then raw bytes that may break the framing.
    stream = [len(f).to_bytes(2, "big") + f for f in framed] + raw
    asyncio.run(_hostile_stream(opens, nominate, stream))
