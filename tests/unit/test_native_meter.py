"""The native stream meter (appliance/native/_packetloop.c `Meter`) against the Python
relay's (StreamMeter + ReceiveStats): the same packets and arrival times give the same
counters, jitter to the last bit, and the same VP8 keyframe sizes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import native
from appliance.media import rtp
from appliance.media.quality import StreamMeter

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)


def vp8_keyframe(width: int, height: int, descriptor: bytes = b"\x10") -> bytes:
    tag = b"\x00\x00\x00"  # bit 0 clear: a key frame
    return descriptor + tag + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"data"


def same(python: StreamMeter, ours: object) -> None:
    figures = ours.figures()
    stats = python.rtp
    assert figures["received"] == stats.received and figures["octets"] == stats.octets
    assert figures["expected"] == stats.expected
    assert figures["extended_max"] == (stats.extended_max if stats.received else 0)
    assert figures["jitter"] == stats.jitter  # the same float operations, in order
    assert (figures["keyframes"], figures["width"], figures["height"]) == (
        python.keyframes, python.width, python.height)
    assert figures["window_frames"] == python._window_frames
    if stats.received:
        assert figures["ssrc"] == stats.ssrc


payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(vp8_keyframe, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.sampled_from([b"\x10", b"\x90\x80\x05", b"\x90\x80\x85\x01", b"\x90\xf0\x01"
                               b"\x02\x03\x04", b"\x11", b"\x90"])))


@settings(max_examples=400, deadline=None)
@given(
    sequence=st.lists(st.tuples(
        st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.booleans(), payloads,
        st.floats(0, 20.0), st.integers(0, 2)), max_size=60),
    clock=st.sampled_from([8000, 48000, 90000]), is_vp8=st.booleans())
def test_identical_figures_for_any_sequence(
        sequence: list[tuple[int, int, bool, bytes, float, int]], clock: int,
        is_vp8: bool) -> None:
    python = StreamMeter(clock, is_vp8=is_vp8)
    ours = native.module().Meter(clock, is_vp8)
    arrival = 100.0
    for seq, ts, marker, payload, gap, csrcs in sequence:
        arrival += gap
        data = struct.pack("!BBHII", 0x80 | csrcs, (0x80 if marker else 0) | 96, seq, ts,
                           0xCAFE) + bytes(4 * csrcs) + payload
        header = rtp.parse_header(data)
        assert header is not None
        assert ours.packet(data, arrival) == python.packet(header, data, arrival)
    same(python, ours)


def test_sequence_wraps_and_a_keyframe_gives_its_size() -> None:
    python, ours = StreamMeter(90000, is_vp8=True), native.module().Meter(90000, True)
    for k, seq in enumerate([65534, 65535, 0, 2, 1, 3]):  # wrap, a gap, a late packet
        payload = vp8_keyframe(640, 480) if k == 2 else b"\x00\x01\x02"
        data = rtp.build(96, k % 2 == 1, seq, 3000 * k, 7, payload)
        header = rtp.parse_header(data)
        assert header is not None
        assert ours.packet(data, 1.0 + k / 30) == python.packet(header, data, 1.0 + k / 30)
    same(python, ours)
    figures = ours.figures()
    assert (figures["expected"], figures["received"]) == (6, 6)
    assert (figures["keyframes"], figures["width"], figures["height"]) == (1, 640, 480)
    assert ours.take_window() == (python._window_bytes, python._window_frames)
    assert ours.take_window() == (0, 0)


def test_what_is_not_rtp_counts_nothing() -> None:
    ours = native.module().Meter(90000, True)
    for bad in (b"", b"\x80" * 11, b"\x40" + bytes(20), b"\x90" + bytes(13)):
        assert ours.packet(bad, 1.0) is None
    assert ours.figures()["received"] == 0
    with pytest.raises(ValueError):
        native.module().Meter(0)
