"""RFC 4571 framing (appliance/ice/framing.py) and the bounded TCP send side
(appliance/ice/tcp_writer.py): the cases of issue 12 by name, cross-checks against aioice's
STUN and aiortc's RTP/RTCP and pyOpenSSL's DTLS, hypothesis fuzz of the decoder and the
send buffer, and a real loopback TCP connection whose reader stops reading.

The loopback test opens sockets: run it inside tests/in-loopback-netns.sh.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time

import pytest
from aioice import stun
from aiortc.rtp import RtcpPacket, RtcpRrPacket, RtpPacket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from appliance.ice import framing
from appliance.ice.demux import FrameKind, classify
from appliance.ice.framing import (
    MAX_BUFFERED,
    MAX_FRAME,
    MAX_OPENING_FRAME,
    Decoder,
    FramingError,
    encode,
    is_binding_request,
)
from appliance.ice.tcp_writer import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MIN_LIMIT,
    WRITE_CHUNK,
    FramedWriter,
    SendBuffer,
)
from tests.fuzz_scale import scaled

# -- real packets of each kind, from the reference implementations --------------------------


def binding_request(username: str = "abcd:efgh", password: bytes = b"p" * 22) -> bytes:
    """A browser-like connectivity check, built and signed by aioice."""
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, attributes={
        "USERNAME": username, "PRIORITY": 1845501695, "ICE-CONTROLLING": 0x1234567890ABCDEF,
        "USE-CANDIDATE": None})
    msg.add_message_integrity(password)
    return bytes(msg)


def binding_response() -> bytes:
    msg = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                       attributes={"XOR-MAPPED-ADDRESS": ("127.0.0.1", 40000)})
    msg.add_message_integrity(b"p" * 22)
    return bytes(msg)


def dtls_client_hello() -> bytes:
    """The first DTLS record a client sends (pyOpenSSL, as aiortc uses it)."""
    conn = SSL.Connection(SSL.Context(SSL.DTLS_METHOD), None)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def rtp_packet(seq: int = 1, payload: bytes = b"\x90" * 100) -> bytes:
    return RtpPacket(payload_type=96, sequence_number=seq, timestamp=3000 * seq, ssrc=0x1234,
                     payload=payload).serialize()


def rtcp_packet() -> bytes:
    return bytes(RtcpRrPacket(ssrc=0x1234))


# -- encode ---------------------------------------------------------------------------------


def test_encode_puts_a_big_endian_length_in_front() -> None:
    assert encode(b"abc") == b"\x00\x03abc"
    assert encode(b"") == b"\x00\x00"
    assert encode(b"x" * 258)[:2] == b"\x01\x02"
    assert encode(bytes(MAX_FRAME))[:2] == b"\xff\xff"


def test_encode_refuses_a_frame_over_65535_bytes() -> None:
    with pytest.raises(FramingError, match="65535"):
        encode(bytes(MAX_FRAME + 1))


# -- decoding: the cases of the issue -------------------------------------------------------


def media_stream() -> tuple[list[bytes], bytes]:
    frames = [binding_request(), dtls_client_hello(), rtp_packet(1), b"", rtcp_packet(),
              rtp_packet(2, b"\x00" * 1100)]
    return frames, b"".join(encode(f) for f in frames)


def test_several_frames_in_one_read() -> None:
    frames, stream = media_stream()
    dec = Decoder()
    assert dec.feed(stream) == frames
    assert dec.buffered == 0
    assert dec.frames == len(frames)


def test_a_frame_split_at_every_byte_boundary() -> None:
    frames, stream = media_stream()
    for cut in range(len(stream) + 1):
        dec = Decoder()
        assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) == frames, cut
    dec = Decoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
        assert dec.buffered < MAX_BUFFERED
    assert got == frames


def test_partial_frames_are_kept_across_reads() -> None:
    dec = Decoder(stun_first=False)
    assert dec.feed(b"\x00\x05ab") == []
    assert dec.buffered == 4
    assert dec.feed(b"cde\x00") == [b"abcde"]
    assert dec.buffered == 1  # half a LENGTH
    assert dec.feed(b"\x01z") == [b"z"]
    assert dec.buffered == 0


def test_a_zero_length_frame_is_an_empty_frame_and_garbage() -> None:
    # RFC 4571 sets no minimum LENGTH; nothing on an ICE-TCP line is empty, hence GARBAGE.
    dec = Decoder(stun_first=False)
    assert dec.feed(b"\x00\x00\x00\x00\x00\x01x\x00\x00") == [b"", b"", b"x", b""]
    assert dec.empty_frames == 3
    assert classify(b"") is FrameKind.GARBAGE


def test_the_largest_frame_65535_bytes_in_chunks() -> None:
    big = os.urandom(MAX_FRAME)
    stream = encode(big) + encode(b"after")
    dec = Decoder(stun_first=False)
    got: list[bytes] = []
    for i in range(0, len(stream), 1000):
        got += dec.feed(stream[i:i + 1000])
        assert dec.buffered <= MAX_BUFFERED - 1
    assert got == [big, b"after"]


def test_max_buffered_refuses_a_frame_that_could_not_fit_as_soon_as_its_length_is_read() -> None:
    dec = Decoder(max_buffered=1502, stun_first=False)
    assert dec.feed(encode(b"y" * 1500)) == [b"y" * 1500]
    with pytest.raises(FramingError, match="1501 bytes"):
        dec.feed(b"\x05\xdd")  # LENGTH 1501, nothing of the frame yet
    assert dec.buffered == 0
    with pytest.raises(FramingError):  # the stream is out of step for good
        dec.feed(encode(b"ok"))


def test_max_buffered_must_leave_room_for_a_frame() -> None:
    for bad in (0, 2, MAX_BUFFERED + 1):
        with pytest.raises(ValueError):
            Decoder(max_buffered=bad)
    Decoder(max_buffered=3)


# -- the opening frame: a passive candidate's connection starts with a Binding request -------


def test_a_connection_opening_with_a_binding_request_is_accepted() -> None:
    check, hello = binding_request(), dtls_client_hello()
    dec = Decoder()
    assert not dec.opened
    assert dec.feed(encode(check) + encode(hello)[:7]) == [check]
    assert dec.opened
    assert dec.feed(encode(hello)[7:]) == [hello]


def test_after_the_opening_other_kinds_are_passed_to_the_caller() -> None:
    check, hello, rtp = binding_request(), dtls_client_hello(), rtp_packet()
    dec = Decoder()
    got = dec.feed(encode(check) + encode(hello) + encode(rtp) + encode(b"\xffjunk"))
    assert got == [check, hello, rtp, b"\xffjunk"]
    assert [classify(f) for f in got] == [FrameKind.STUN, FrameKind.DTLS, FrameKind.SRTP,
                                          FrameKind.GARBAGE]


@pytest.mark.parametrize("opening", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # LENGTH 0x4745: refused without waiting for it
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x00\x00",  # an empty frame first
    b"\x00\x13" + bytes(19),  # too short for a STUN header
    b"\x08\x02" + bytes(MAX_OPENING_FRAME - 2),  # LENGTH 2050: no check is that big
])
def test_a_stranger_is_refused_from_its_first_two_bytes(opening: bytes) -> None:
    dec = Decoder()
    with pytest.raises(FramingError, match="not a STUN Binding request"):
        dec.feed(opening[:2])
    assert dec.buffered == 0


def test_a_non_request_opening_is_refused_at_its_tenth_byte() -> None:
    for first in (binding_response(), dtls_client_hello(), rtp_packet(),
                  _with_cookie(binding_request(), b"\x21\x12\xa4\x43"),
                  _with_stun_length(binding_request(), -4)):
        # LENGTHs a check could have: only the first 10 bytes of the message can tell.
        assert framing.STUN_HEADER_BYTES <= len(first) <= MAX_OPENING_FRAME
        stream = encode(first)
        dec = Decoder()
        assert dec.feed(stream[:11]) == []  # LENGTH and 9 bytes of the message: undecided
        with pytest.raises(FramingError, match="not a STUN Binding request"):
            dec.feed(stream[11:12])


def _with_cookie(msg: bytes, cookie: bytes) -> bytes:
    return msg[:4] + cookie + msg[8:]


def _with_stun_length(msg: bytes, delta: int) -> bytes:
    (length,) = struct.unpack("!H", msg[2:4])
    return msg[:2] + struct.pack("!H", length + delta) + msg[4:]


def test_without_stun_first_any_opening_is_framed() -> None:
    assert Decoder(stun_first=False).feed(encode(rtp_packet())) == [rtp_packet()]


# -- classify and is_binding_request against the reference implementations -----------------


def test_classify_names_real_packets_of_each_kind() -> None:
    assert classify(binding_request()) is FrameKind.STUN
    assert classify(binding_response()) is FrameKind.STUN
    assert classify(dtls_client_hello()) is FrameKind.DTLS
    assert classify(rtp_packet()) is FrameKind.SRTP
    assert classify(rtcp_packet()) is FrameKind.SRTP
    assert RtcpPacket.parse(rtcp_packet())  # what we built is RTCP to aiortc too


def test_classify_follows_rfc_7983_for_every_first_byte() -> None:
    expect = {**dict.fromkeys(range(0, 4), FrameKind.STUN),
              **dict.fromkeys(range(20, 64), FrameKind.DTLS),
              **dict.fromkeys(range(128, 192), FrameKind.SRTP)}
    for b in range(256):
        assert classify(bytes([b]) + b"rest") is expect.get(b, FrameKind.GARBAGE), b
        assert classify(memoryview(bytes([b]))) is expect.get(b, FrameKind.GARBAGE)


def test_is_binding_request_on_aioice_messages() -> None:
    assert is_binding_request(binding_request())
    assert is_binding_request(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)))
    assert not is_binding_request(binding_response())
    assert not is_binding_request(
        bytes(stun.Message(stun.Method.BINDING, stun.Class.INDICATION)))
    assert not is_binding_request(bytes(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)))
    assert not is_binding_request(binding_request()[:-1])
    assert not is_binding_request(binding_request() + b"\x00\x00\x00\x00")
    assert not is_binding_request(_with_cookie(binding_request(), b"\x00\x00\x00\x00"))
    assert not is_binding_request(b"")


# -- hypothesis: round trips and hostile bytes -----------------------------------------------

FRAMES = st.lists(
    st.one_of(st.binary(max_size=300), st.binary(min_size=1400, max_size=1500),
              st.integers(60000, MAX_FRAME).map(lambda n: b"\xab" * n)),
    max_size=12)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.fuzz
@settings(max_examples=scaled(200, 5000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frames=FRAMES, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_fuzz_decode_of_encoded_frames_is_the_frames_for_any_split(
        frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode(f) for f in frames)
    dec = Decoder(stun_first=False)
    got: list[bytes] = []
    for chunk in _split(stream, cuts):
        got += dec.feed(chunk)
        assert dec.buffered < MAX_BUFFERED
    assert got == frames
    assert dec.buffered == 0


@pytest.mark.fuzz
@settings(max_examples=scaled(300, 10000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4000), cuts=st.lists(st.integers(min_value=0), max_size=20),
       stun_first=st.booleans(), max_buffered=st.integers(3, MAX_BUFFERED))
def test_fuzz_random_bytes_raise_only_framing_error(
        data: bytes, cuts: list[int], stun_first: bool, max_buffered: int) -> None:
    dec = Decoder(max_buffered=max_buffered, stun_first=stun_first)
    failed = False
    for chunk in _split(data, cuts):
        try:
            frames = dec.feed(chunk)
        except FramingError:
            failed = True
            continue
        assert not failed, "a failed decoder must keep refusing"
        assert dec.buffered < max_buffered
        assert all(len(f) <= max_buffered - 2 for f in frames)
    if failed:
        assert dec.buffered == 0


@pytest.mark.fuzz
@settings(max_examples=scaled(200, 5000), deadline=None)
@given(username=st.text(min_size=1, max_size=120), txid=st.binary(min_size=12, max_size=12),
       priority=st.integers(0, 2**32 - 1), tiebreaker=st.integers(0, 2**64 - 1),
       controlling=st.booleans(), nominate=st.booleans(), password=st.binary(max_size=64))
def test_fuzz_every_aioice_binding_request_opens_a_connection(
        username: str, txid: bytes, priority: int, tiebreaker: int, controlling: bool,
        nominate: bool, password: bytes) -> None:
    attrs: dict[str, object] = {"USERNAME": username, "PRIORITY": priority,
                                "ICE-CONTROLLING" if controlling else "ICE-CONTROLLED":
                                tiebreaker}
    if nominate:
        attrs["USE-CANDIDATE"] = None
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, txid, attrs)
    msg.add_message_integrity(password)
    wire = bytes(msg)
    if len(wire) > MAX_OPENING_FRAME:
        return
    assert is_binding_request(wire)
    assert Decoder().feed(encode(wire)) == [wire]


@pytest.mark.fuzz
@settings(max_examples=scaled(300, 10000), deadline=None)
@given(head=st.binary(min_size=20, max_size=20), body=st.binary(max_size=200))
def test_fuzz_what_aioice_parses_as_a_binding_request_we_accept_too(
        head: bytes, body: bytes) -> None:
    # Steer the random header towards STUN, or aioice would parse almost nothing.
    head = b"\x00\x01" + struct.pack("!H", len(body)) + stun.COOKIE.to_bytes(4, "big") + head[8:]
    data = head + body
    try:
        msg = stun.parse_message(data)
    except (ValueError, struct.error):  # aioice's short attribute values raise struct.error
        return
    if (msg.message_method == stun.Method.BINDING and msg.message_class == stun.Class.REQUEST
            and len(body) % 4 == 0):
        assert is_binding_request(data)
    else:  # aioice ignores the length's last two bits; RFC 8489 requires them zero
        assert not is_binding_request(data)


# -- the send buffer (sans-IO) ---------------------------------------------------------------


def test_offer_queues_framed_bytes_and_take_hands_them_out_in_order() -> None:
    buf = SendBuffer()
    assert buf.offer(b"abc") and buf.offer(b"")
    assert buf.pending == 7
    assert buf.take(4) == b"\x00\x03ab"
    assert buf.counters.frames_sent == 0  # its last byte is still queued
    assert buf.take(100) == b"c\x00\x00"
    assert buf.take(100) == b""
    c = buf.counters
    assert (c.frames_accepted, c.frames_sent, c.bytes_accepted, c.bytes_sent) == (2, 2, 7, 7)


def test_a_frame_that_does_not_fit_is_dropped_whole_and_counted() -> None:
    buf = SendBuffer(limit=MIN_LIMIT)
    assert buf.offer(bytes(60000))
    assert not buf.offer(bytes(5534))  # 60002 + 5536 > 65537: none of it goes in
    assert buf.pending == 60002
    assert buf.offer(bytes(5533))  # exactly fills the limit
    assert buf.pending == MIN_LIMIT
    assert not buf.offer(b"")  # not even an empty frame's LENGTH
    c = buf.counters
    assert (c.frames_dropped, c.bytes_dropped, c.frames_accepted) == (2, 5534, 2)
    taken = buf.take(MAX_LIMIT)
    assert Decoder(stun_first=False).feed(taken) == [bytes(60000), bytes(5533)]


def test_a_frame_over_65535_bytes_is_dropped_not_raised() -> None:
    buf = SendBuffer()
    assert not buf.offer(bytes(MAX_FRAME + 1))
    assert buf.counters.frames_dropped == 1 and buf.pending == 0


def test_send_buffer_limit_is_bounded() -> None:
    assert SendBuffer().limit == DEFAULT_LIMIT == 256 * 1024
    for bad in (MIN_LIMIT - 1, MAX_LIMIT + 1, 0):
        with pytest.raises(ValueError):
            SendBuffer(bad)


def test_clear_forgets_the_queue() -> None:
    buf = SendBuffer()
    buf.offer(b"abcdef")
    buf.take(3)
    assert buf.clear() == 5
    assert buf.pending == 0 and buf.take(10) == b""
    assert buf.offer(b"x") and buf.take(10) == b"\x00\x01x"


@pytest.mark.fuzz
@settings(max_examples=scaled(200, 5000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("offer"), st.integers(0, 70000)),
    st.tuples(st.just("take"), st.integers(-5, 200000))), max_size=60),
    limit=st.integers(MIN_LIMIT, 4 * MIN_LIMIT))
def test_fuzz_send_buffer_never_exceeds_its_limit_nor_cuts_a_frame(
        ops: list[tuple[str, int]], limit: int) -> None:
    buf = SendBuffer(limit)
    accepted: list[bytes] = []
    wire = bytearray()
    for n, (op, arg) in enumerate(ops):
        if op == "offer":
            frame = bytes([n % 256]) * arg
            if buf.offer(frame):
                accepted.append(frame)
        else:
            out = buf.take(arg)
            assert len(out) <= max(arg, 0)
            wire += out
        assert 0 <= buf.pending <= limit
    wire += buf.take(MAX_LIMIT * 2)
    assert Decoder(stun_first=False).feed(bytes(wire)) == accepted
    c = buf.counters
    assert c.frames_accepted + c.frames_dropped == sum(op == "offer" for op, _ in ops)
    assert c.frames_sent == c.frames_accepted == len(accepted)
    assert c.bytes_sent == c.bytes_accepted == len(wire)


# -- the asyncio edge over a real loopback TCP connection, with a reader that stops ----------


class _Server(asyncio.Protocol):
    """The connection's protocol as the worker will have it: forwards flow control."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.writer: FramedWriter | None = None
        self.transport: asyncio.Transport | None = None
        self.made = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        # A fixed kernel send buffer, as under memory pressure; loopback autotuning would
        # otherwise swallow megabytes before anything backs up.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        self.writer = FramedWriter(transport, self.limit)
        self.made.set_result(None)

    def pause_writing(self) -> None:
        assert self.writer is not None
        self.writer.pause_writing()

    def resume_writing(self) -> None:
        assert self.writer is not None
        self.writer.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.writer is not None:
            self.writer.connection_lost()


def _frame(seq: int) -> bytes:
    return struct.pack("!I", seq) + bytes([seq % 251]) * 1196  # a 1200-byte video packet


async def test_a_reader_that_stops_reading_costs_drops_never_a_blocked_worker() -> None:
    loop = asyncio.get_running_loop()
    limit = 128 * 1024
    proto = _Server(limit)
    server = await loop.create_server(lambda: proto, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    reader.setblocking(False)
    try:
        await loop.sock_connect(reader, ("127.0.0.1", port))
        await asyncio.wait_for(proto.made, 5)
        writer = proto.writer
        assert writer is not None
        transport = proto.transport
        assert transport is not None

        # The reader reads nothing. 4000 frames (4.8 MB) go out as fast as the worker can.
        accepted: list[int] = []
        slowest = 0.0
        ticks = 0

        async def ticker() -> None:  # the other calls of the worker: the loop must turn
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        for seq in range(4000):
            t0 = time.perf_counter()
            if writer.send(_frame(seq)):
                accepted.append(seq)
            slowest = max(slowest, time.perf_counter() - t0)
            if seq % 100 == 0:
                await asyncio.sleep(0.002)  # the worker's other work between packets
        assert ticks > 0
        c = writer.buffer.counters
        assert writer.paused
        assert c.frames_dropped == 4000 - len(accepted) > 3000
        assert c.frames_accepted == len(accepted)
        assert writer.buffer.pending <= limit
        assert transport.get_write_buffer_size() <= 2 * WRITE_CHUNK
        assert slowest < 0.25, slowest  # a few copies of a frame; never a wait on the peer

        # The reader wakes up: it gets every accepted frame, whole and in order, and no other.
        decoder = Decoder(stun_first=False)
        got: list[bytes] = []
        deadline = loop.time() + 20
        while len(got) < len(accepted):
            assert loop.time() < deadline, (len(got), len(accepted))
            data = await asyncio.wait_for(loop.sock_recv(reader, 65536), 5)
            assert data, "the writer closed early"
            got += decoder.feed(data)
        assert [struct.unpack("!I", f[:4])[0] for f in got] == accepted
        assert all(f == _frame(s) for f, s in zip(got, accepted, strict=True))
        assert not writer.paused and writer.buffer.pending == 0
        assert c.frames_sent == len(accepted)

        # Drained, it accepts again; a dropped frame never left a partial one behind.
        assert writer.send(_frame(99999))
        assert decoder.feed(await asyncio.wait_for(loop.sock_recv(reader, 65536), 5)) == [
            _frame(99999)]
        tick_task.cancel()

        transport.close()
        await asyncio.sleep(0)
        assert not writer.send(b"late")  # a closing transport: counted as a drop
        assert c.frames_dropped == 4000 - len(accepted) + 1
    finally:
        reader.close()
        server.close()
        await server.wait_closed()
