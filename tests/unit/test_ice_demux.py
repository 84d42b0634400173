"""RFC 7983's first-byte rule (appliance/ice/demux.py): every packet the reference
implementations build - aioice's STUN and TURN, a whole pyOpenSSL DTLS handshake, aiortc's
RTP and RTCP, pylibsrtp's SRTP - lands in the kind its protocol is; the rule has one owner
(no first-byte comparison elsewhere in appliance/ice or appliance/edges); and classify
never raises on any input."""

from __future__ import annotations

import contextlib
import re
import struct
from pathlib import Path

import pylibsrtp
import pytest
from aioice import stun as ref
from aiortc.rtcdtlstransport import RTCCertificate
from aiortc.rtp import (
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSenderInfo,
    RtcpSrPacket,
    RtpPacket,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from appliance.ice import demux, stun
from appliance.ice.demux import KIND_BY_FIRST_BYTE, FrameKind, classify
from tests.fuzz_scale import scaled

FUZZ = settings(max_examples=scaled(300, 30000), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parents[2]


def test_the_table_is_rfc_7983_section_7() -> None:
    # Written from the RFC's figure, not from the module: 0-3 STUN, 16-19 ZRTP, 20-63 DTLS,
    # 64-79 TURN channel, 128-191 RTP/RTCP; ZRTP and TURN channels are not spoken here.
    for b in range(256):
        want = (FrameKind.STUN if 0 <= b <= 3 else FrameKind.DTLS if 20 <= b <= 63
                else FrameKind.SRTP if 128 <= b <= 191 else FrameKind.GARBAGE)
        assert KIND_BY_FIRST_BYTE[b] is want, b
        assert classify(bytes([b])) is classify(bytearray([b, 0])) is want
    assert len(KIND_BY_FIRST_BYTE) == 256
    assert classify(b"") is classify(memoryview(b"")) is FrameKind.GARBAGE
    assert tuple(FrameKind) == (demux.STUN, demux.DTLS, demux.SRTP, demux.GARBAGE)


def test_aioice_stun_of_every_class_is_stun_and_its_channel_data_is_not() -> None:
    for cls in ref.Class:
        for method in (ref.Method.BINDING, ref.Method.ALLOCATE, ref.Method.REFRESH):
            msg = ref.Message(method, cls, attributes={"SOFTWARE": "x"})
            msg.add_fingerprint()
            data = bytes(msg)
            assert classify(data) is FrameKind.STUN and stun.looks_like_stun(data)
    # TURN ChannelData as aioice's TURN client frames it (channels 0x4000..0x4FFF; the
    # top two bits 01, aioice.turn.is_channel_data): the worker's port speaks no TURN.
    for channel in (0x4000, 0x4ABC, 0x4FFF):
        data = struct.pack("!HH", channel, 4) + b"data"
        assert _aioice_is_channel_data(data)
        assert classify(data) is FrameKind.GARBAGE and not stun.looks_like_stun(data)


def _aioice_is_channel_data(data: bytes) -> bool:
    from aioice.turn import is_channel_data
    return bool(is_channel_data(data))


def _dtls_handshake_datagrams() -> list[bytes]:
    """Every datagram of a real DTLS 1.2 exchange between two pyOpenSSL endpoints with
    aiortc's certificates: the handshake both ways, application data, close_notify."""
    contexts = []
    for _ in range(2):
        ctx = SSL.Context(SSL.DTLS_METHOD)
        cert = RTCCertificate.generateCertificate()
        ctx.use_certificate(cert._cert)
        ctx.use_privatekey(cert._key)
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        contexts.append(ctx)
    client, server = SSL.Connection(contexts[0]), SSL.Connection(contexts[1])
    client.set_connect_state()
    server.set_accept_state()
    sent: list[bytes] = []

    def pump(src: SSL.Connection, dst: SSL.Connection) -> None:
        while True:
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                return
            sent.append(data)
            dst.bio_write(data)

    for _ in range(10):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        pump(client, server)
        pump(server, client)
    client.send(b"application data")
    pump(client, server)
    assert server.recv(100) == b"application data"
    client.shutdown()
    pump(client, server)
    return sent


def test_a_whole_dtls_exchange_is_dtls_record_by_record() -> None:
    datagrams = _dtls_handshake_datagrams()
    types = set()
    for data in datagrams:
        assert classify(data) is FrameKind.DTLS
        pos = 0
        while pos < len(data):  # each record: type, version, epoch, seq (6), length
            types.add(data[pos])
            assert KIND_BY_FIRST_BYTE[data[pos]] is FrameKind.DTLS
            (length,) = struct.unpack_from("!H", data, pos + 11)
            pos += 13 + length
    # change_cipher_spec, alert (close_notify), handshake, application_data
    assert types == {20, 21, 22, 23}, types


def test_aiortc_rtp_and_rtcp_and_their_srtp_are_srtp() -> None:
    key = bytes(range(30))
    tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    for pt in range(128):
        for marker in (0, 1):
            packet = RtpPacket(payload_type=pt, marker=marker, sequence_number=pt * 2 + marker,
                               ssrc=0x1234, payload=b"\x90" * 20).serialize()
            assert classify(packet) is FrameKind.SRTP
            assert classify(tx.protect(packet)) is FrameKind.SRTP
    info = RtcpSenderInfo(ntp_timestamp=1, rtp_timestamp=2, packet_count=3, octet_count=4)
    for rtcp in (RtcpSrPacket(ssrc=1, sender_info=info), RtcpRrPacket(ssrc=1),
                 RtcpByePacket(sources=[1]), RtcpPsfbPacket(fmt=1, ssrc=1, media_ssrc=2)):
        packet = bytes(rtcp)
        assert 192 <= packet[1] <= 223  # RFC 5761: what the fast path tells RTCP by
        assert classify(packet) is FrameKind.SRTP
        assert classify(tx.protect_rtcp(packet)) is FrameKind.SRTP


# Inline first-byte rules: `data[0] <= 3`, `127 < data[0] < 192`, `frame[0] in range(..)`.
_INLINE_RULE = re.compile(r"\w+\[0\]\s*(<|<=|>|>=|in\b)|(<|<=)\s*\w+\[0\]\s*(<|<=)")


@pytest.mark.parametrize("package", ["appliance/ice", "appliance/edges"])
def test_no_other_module_writes_the_first_byte_rule(package: str) -> None:
    found = []
    for path in sorted((ROOT / package).glob("*.py")):
        if path.name == "demux.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _INLINE_RULE.search(line.split("#", 1)[0]):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "use appliance.ice.demux:\n" + "\n".join(found)


def test_the_rule_check_would_see_the_old_copies() -> None:
    # The three copies demux replaced, as they were written: the check above finds each.
    for old in ("return len(data) >= HEADER_BYTES and data[0] <= 3 and data[4:8] == C",
                "if not 127 < data[0] < 192:", "if frame and frame[0] < 4:"):
        assert _INLINE_RULE.search(old), old


@pytest.mark.fuzz
@FUZZ
@given(st.binary(max_size=64), st.sampled_from([bytes, bytearray, memoryview]))
def test_classify_is_total_and_reads_only_the_first_byte(data: bytes, kind: type) -> None:
    got = classify(kind(data))
    assert isinstance(got, FrameKind)
    assert got is (KIND_BY_FIRST_BYTE[data[0]] if data else FrameKind.GARBAGE)
    if data:
        assert classify(data[:1] + bytes(reversed(data[1:]))) is got
    assert isinstance(stun.looks_like_stun(data), bool)
