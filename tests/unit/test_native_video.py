"""The native video relay's glue (workers/native_video.py): the meter the room reads while
the native loop meters a camera, and the Python path taking a stream over from the native
rewriter exactly where it stopped."""

from __future__ import annotations

import struct

import pytest

from appliance import native
from appliance.media import rtp
from appliance.media.quality import StreamMeter
from appliance.media.video import VIDEO_CLOCK, VideoPath, VideoSink
from workers.native_video import NativeMeter, _hand_rewriter_back

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)


def vp8(seq: int, ts: int, keyframe: bool = False, size: tuple[int, int] = (640, 480),
        ssrc: int = 0xCAFE) -> bytes:
    payload = (b"\x10\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", *size) if keyframe
               else b"\x10\x01") + bytes(50)
    return rtp.build(96, True, seq, ts, ssrc, payload)


def test_the_room_reads_both_meters_as_one() -> None:
    python = StreamMeter(VIDEO_CLOCK, is_vp8=True)
    for seq in range(1, 11):  # before the offload: Python metered these
        packet = vp8(seq, seq * 3000, keyframe=seq == 1, size=(320, 240))
        header = rtp.parse_header(packet)
        assert header is not None
        python.packet(header, packet, seq / 30)
    c_meter = native.module().Meter(VIDEO_CLOCK, True)
    meter = NativeMeter(python, c_meter)
    assert (meter.width, meter.height) == (320, 240)  # no native keyframe yet
    for seq in range(11, 31):
        if seq != 20:  # one lost
            c_meter.packet(vp8(seq, seq * 3000, keyframe=seq == 25), seq / 30)
    assert meter.rtp.expected == 10 + 20 and meter.rtp.received == 10 + 19
    assert meter.rtp.lost == 1 and meter.rtp.jitter_ms >= 0
    assert (meter.width, meter.height, meter.keyframes) == (640, 480, 2)
    kbps, fps = meter.window()
    assert kbps > 0 and fps > 0
    assert meter.window()[1] == 0  # a new window


def test_the_python_path_continues_the_stream_the_native_rewriter_sent() -> None:
    sink = VideoSink(lambda packet: None, 0xB0B, 100, None)
    path = VideoPath(StreamMeter(VIDEO_CLOCK, is_vp8=True), lambda packet: None, 1)
    path.connect(sink)
    assert sink.rewriter is not None
    ours = native.module().Rewriter(0xB0B, VIDEO_CLOCK, False, 60000, 777)
    for seq in range(10):
        ours.relay(vp8(seq, 1000 + seq * 3000), 100, 5.0 + seq / 30)
    twin = native.module().Rewriter(0xB0B, VIDEO_CLOCK, False, 60000, 777)
    for seq in range(10):
        twin.relay(vp8(seq, 1000 + seq * 3000), 100, 5.0 + seq / 30)
    _hand_rewriter_back(ours, path)
    # The next packet, from the same source and from a new one, as the native rewriter
    # would have made it: the same sequence number, timestamp and marker.
    for source, ts, now in ((0xCAFE, 1000 + 10 * 3000, 5.4), (0xD00D, 5, 6.0)):
        packet = vp8(10, ts, ssrc=source)
        header = rtp.parse_header(packet)
        assert header is not None
        by_python = sink.rewriter.rewrite(source, 100, header.marker, ts,
                                          rtp.payload_of(packet, header), now=now)
        assert by_python == twin.relay(packet, 100, now)


def test_a_path_waiting_for_a_keyframe_keeps_asking_the_sender() -> None:
    """At connect the sender's SSRC may be unknown (nothing came yet), or its first
    keyframe went by before the path was connected: deltas then ask for one, once a
    second, and so does the room's watch tick while the path waits."""
    sent: list[bytes] = []
    path = VideoPath(StreamMeter(VIDEO_CLOCK, is_vp8=True), sent.append, 1)
    path.connect(VideoSink(lambda packet: None, 0xB0B, 100, None))
    assert sent == []  # no SSRC to name yet
    path.from_source(vp8(1, 0))
    assert len(sent) == 1 and sent[0][1] == 206  # a PLI (RTCP PSFB) naming the sender
    path.from_source(vp8(2, 3000))
    path.keyframe_check()
    assert len(sent) == 1  # at most once a second
    path._last_keyframe_request -= 2
    path.keyframe_check()
    assert len(sent) == 2
    path.from_source(vp8(3, 6000, keyframe=True))
    path._last_keyframe_request -= 2
    path.keyframe_check()
    assert len(sent) == 2  # it has its keyframe: nothing more to ask
