"""The native relay rewrite (appliance/native/_packetloop.c `Rewriter.relay`) against the
Python relay's (VideoPath.from_source: rtp.parse_header, rtp.payload_of,
RtpRewriter.rewrite, rtp.abs_send_time_extension): the same packets in, the same bytes
out - with loss, reordering, SSRC changes, padding, CSRCs and header extensions."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import native
from appliance.media import rtp

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)


@dataclass(frozen=True)
class Sent:
    packet: bytes
    now: float  # monotonic, for the timeline
    wall: float  # time.time(), for abs-send-time


def python_relay(rewriter: rtp.RtpRewriter, packet: bytes, payload_type: int, now: float,
                 ext_id: int | None, wall: float) -> bytes | None:
    header = rtp.parse_header(packet)
    if header is None:
        return None
    extension = rtp.abs_send_time_extension(ext_id, wall) if ext_id is not None else b""
    return rewriter.rewrite(header.ssrc, payload_type, header.marker, header.timestamp,
                            rtp.payload_of(packet, header), now=now, extension=extension)


def pair(monkeypatch: pytest.MonkeyPatch, clock: int, mark_switches: bool, seq: int,
         first_ts: int, ssrc: int = 0x5EED) -> tuple[rtp.RtpRewriter, object]:
    python = rtp.RtpRewriter(ssrc, clock, mark_switches=mark_switches)
    python._seq = seq
    # The first source's timeline start is random in Python: the same value for both.
    monkeypatch.setattr(rtp.random, "getrandbits", lambda bits: first_ts)
    return python, native.module().Rewriter(ssrc, clock, mark_switches, seq, first_ts)


def packet(*, ssrc: int, seq: int, ts: int, marker: bool = False, pt: int = 96,
           payload: bytes = b"\x90\xe0payload", csrcs: int = 0, extension: bytes | None = None,
           padding: int = 0, version: int = 2) -> bytes:
    b0 = (version << 6) | (0x20 if padding else 0) | (0x10 if extension is not None else 0)
    out = struct.pack("!BBHII", b0 | csrcs, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                      ts & 0xFFFFFFFF, ssrc) + bytes(4 * csrcs)
    if extension is not None:
        words = (len(extension) + 3) // 4
        out += b"\xbe\xde" + struct.pack("!H", words) + extension.ljust(4 * words, b"\0")
    out += payload
    if padding:
        out += bytes(padding - 1) + bytes([padding])
    return out


packets = st.builds(
    lambda ssrc, seq, ts, marker, pt, payload, csrcs, ext, padding, version: packet(
        ssrc=ssrc, seq=seq, ts=ts, marker=marker, pt=pt, payload=payload, csrcs=csrcs,
        extension=ext, padding=padding, version=version),
    ssrc=st.sampled_from([0x11111111, 0x22222222, 0xFFFFFFFF]),
    seq=st.integers(0, 0xFFFF), ts=st.integers(0, 0xFFFFFFFF), marker=st.booleans(),
    pt=st.integers(0, 127), payload=st.binary(max_size=64), csrcs=st.integers(0, 15),
    ext=st.none() | st.binary(max_size=12), padding=st.integers(0, 8),
    version=st.sampled_from([2, 2, 2, 1]))


@settings(max_examples=400, deadline=None)
@given(
    sequence=st.lists(st.tuples(packets, st.floats(0, 3.0), st.booleans()), max_size=40),
    clock=st.sampled_from([8000, 48000, 90000]), mark_switches=st.booleans(),
    seq=st.integers(0, 0xFFFF), first_ts=st.integers(0, 0xFFFFFFFF),
    ext_id=st.none() | st.integers(1, 14), payload_type=st.integers(0, 127))
def test_identical_bytes_for_any_sequence(
    monkeypatch_session: pytest.MonkeyPatch, sequence: list[tuple[bytes, float, bool]],
    clock: int, mark_switches: bool, seq: int, first_ts: int, ext_id: int | None,
    payload_type: int,
) -> None:
    python, ours = pair(monkeypatch_session, clock, mark_switches, seq, first_ts)
    now, wall = 1000.0, 1.7e9
    for data, gap, truncate in sequence:
        now += gap
        wall += gap
        if truncate:  # a packet cut anywhere: both must agree it is (or is not) RTP
            data = data[: len(data) // 2]
        expected = python_relay(python, data, payload_type, now, ext_id, wall)
        got = ours.relay(data, payload_type, now, abs_send_time_id=ext_id or -1, wall=wall)
        assert got == expected, (data.hex(), now)
    assert (ours.seq, ours.packets, ours.octets) == (python._seq, python.packets,
                                                     python.octets)
    assert ours.last_timestamp == python.last_timestamp


@pytest.fixture(scope="module")
def monkeypatch_session() -> object:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_a_source_switch_continues_the_timeline_and_marks_audio(
        monkeypatch: pytest.MonkeyPatch) -> None:
    python, ours = pair(monkeypatch, 8000, True, 65534, 4294967000)
    script = [  # (source, seq, ts, now): ringback, then the answered call, then back
        (1, 10, 160, 0.0), (1, 11, 320, 0.02), (2, 500, 9_999_999, 0.5), (2, 501, 10_000_159,
                                                                            0.52),
        (1, 12, 480, 0.5 + 2.5 / 8000), (3, 7, 0, 0.5 + 2.5 / 8000 + 1.5 / 8000)]
    for source, seq, ts, now in script:
        data = packet(ssrc=source, seq=seq, ts=ts, pt=0)
        assert ours.relay(data, 0, now) == python_relay(python, data, 0, now, None, 0.0)
    assert ours.seq == python._seq == (65534 + len(script)) & 0xFFFF  # wrapped


def test_what_is_not_rtp_is_not_relayed_and_changes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, ours = pair(monkeypatch, 90000, False, 5, 6)
    for bad in (b"", b"\x80" * 11, packet(ssrc=1, seq=1, ts=1, version=1),
                packet(ssrc=1, seq=1, ts=1, csrcs=15, payload=b"")[:40],
                packet(ssrc=1, seq=1, ts=1, extension=b"x" * 8)[:14]):
        assert ours.relay(bad, 96, 1.0) is None
    assert (ours.seq, ours.packets) == (5, 0)
    with pytest.raises(ValueError):
        ours.relay(packet(ssrc=1, seq=1, ts=1), 128, 1.0)
    with pytest.raises(ValueError):
        ours.relay(packet(ssrc=1, seq=1, ts=1), 96, 1.0, abs_send_time_id=15)
    with pytest.raises(ValueError):
        native.module().Rewriter(1, 0, False, 0, 0)
    with pytest.raises((ValueError, OverflowError)):
        native.module().Rewriter(2**32, 90000, False, 0, 0)


# The voice bridge's calls (rewrite with a source of its own, stamp on hold, inject for
# DTMF, mark_next after a hold): the native Rewriter answers each as RtpRewriter does.
_voice_op = st.one_of(
    st.tuples(st.just("rewrite"), st.sampled_from([0xCAFE, 0xBEEF, 1 << 32]),
              st.integers(0, 127), st.booleans(), st.integers(0, 0xFFFFFFFF),
              st.binary(max_size=200), st.floats(0, 0.5)),
    st.tuples(st.just("stamp"), st.sampled_from([0xCAFE, 0xBEEF, 1 << 32]),
              st.integers(0, 0xFFFFFFFF), st.floats(0, 0.5)),
    st.tuples(st.just("inject"), st.integers(0, 127), st.booleans(),
              st.integers(0, 0xFFFFFFFF), st.binary(max_size=8)),
    st.tuples(st.just("mark_next")),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_voice_op, max_size=40), seq=st.integers(0, 0xFFFF),
       first_ts=st.integers(0, 0xFFFFFFFF))
def test_the_voice_bridges_calls_match_rtp_rewriter(
        ops: list[tuple], seq: int, first_ts: int) -> None:
    python = rtp.RtpRewriter(0x5EED, 8000)
    python._seq = seq
    c = native.module().Rewriter(0x5EED, 8000, True, seq, first_ts)
    now = 100.0
    original = rtp.random.getrandbits
    rtp.random.getrandbits = lambda bits: first_ts  # type: ignore[assignment]
    try:
        for op in ops:
            if op[0] == "rewrite":
                _, source, pt, marker, ts, payload, step = op
                now += step
                assert c.rewrite(source, pt, marker, ts, payload, now) == \
                    python.rewrite(source, pt, marker, ts, payload, now)
            elif op[0] == "stamp":
                _, source, ts, step = op
                now += step
                assert c.stamp(source, ts, now) == python.stamp(source, ts, now)
            elif op[0] == "inject":
                _, pt, marker, ts, payload = op
                assert c.inject(pt, marker, ts, payload) == python.inject(pt, marker, ts, payload)
            else:
                c.mark_next()
                python.mark_next()
            assert (c.packets, c.octets, c.last_timestamp) == \
                (python.packets, python.octets, python.last_timestamp)
    finally:
        rtp.random.getrandbits = original  # type: ignore[assignment]
