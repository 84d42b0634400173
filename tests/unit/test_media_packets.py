"""RTP/RTCP byte handling, DTMF events, ringback, codec choice, transcoding."""

import itertools

import pytest
from aiortc.rtp import RtcpPacket, RtcpSrPacket, RtpPacket

from appliance.media import dtmf, g711, ringback, rtp
from appliance.media.codec_choice import NoCommonCodec, choose_audio
from appliance.media.transcode import OpusToPcmu, PcmuToOpus


def test_build_and_parse_agree_with_aiortc() -> None:
    packet = rtp.build(0, True, 65535, 123456, 0xDEADBEEF, b"\xff" * 160)
    theirs = RtpPacket.parse(packet)
    assert (theirs.payload_type, theirs.marker, theirs.sequence_number) == (0, 1, 65535)
    assert (theirs.timestamp, theirs.ssrc, theirs.payload) == (123456, 0xDEADBEEF, b"\xff" * 160)
    header = rtp.parse_header(packet)
    assert header is not None and rtp.payload_of(packet, header) == b"\xff" * 160


def test_parse_skips_header_extension_and_csrcs_and_padding() -> None:
    # Two CSRCs, a one-byte-header extension (mid="0"), 4 bytes of padding, by hand.
    body = b"\xbe\xde\x00\x01" + b"\x10\x30\x00\x00"  # one-byte header ext: mid="0"
    data = bytes([0x80 | 0x20 | 0x10 | 2, 111, 0, 7, 0, 0, 0, 9, 0, 0, 0, 5]) + (
        b"\x00\x00\x00\x01\x00\x00\x00\x02" + body + b"abc" + b"\x00\x00\x00\x04"
    )
    header = rtp.parse_header(data)
    assert header is not None and header.payload_type == 111
    assert rtp.payload_of(data, header) == b"abc"
    assert rtp.parse_header(b"\x00" * 12) is None  # wrong version
    assert rtp.parse_header(b"\x90" + b"\x00" * 11) is None  # extension cut short


def test_rewriter_keeps_sequence_and_timestamps_continuous_across_sources() -> None:
    rw = rtp.RtpRewriter(ssrc=42, clock_rate=8000)
    ringback_src, phone_src = object(), 1234567
    out = [rw.rewrite(ringback_src, 0, False, 1000 + 160 * i, b"r", now=10 + 0.02 * i)
           for i in range(3)]
    out += [rw.rewrite(phone_src, 0, False, 9_000_000 + 160 * i, b"p", now=10.06 + 0.02 * i)
            for i in range(3)]
    parsed = [RtpPacket.parse(p) for p in out]
    seqs = [p.sequence_number for p in parsed]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    stamps = [p.timestamp for p in parsed]
    assert all((b - a) & 0xFFFFFFFF == 160 for a, b in itertools.pairwise(stamps))
    assert [p.marker for p in parsed] == [1, 0, 0, 1, 0, 0]
    assert {p.ssrc for p in parsed} == {42}


def test_receive_stats_count_loss_and_jitter() -> None:
    stats = rtp.ReceiveStats(8000)
    for i, seq in enumerate([65534, 65535, 0, 2, 3]):  # wraps, and 1 is lost
        header = rtp.RtpHeader(0, False, seq, 160 * i, 7, 12)
        stats.update(header, 172, 100.0 + 0.02 * i)
    assert stats.expected == 6 and stats.received == 5 and stats.lost == 1
    assert stats.jitter_ms < 1
    block = stats.report_block()
    assert len(block) == 24


def test_sender_report_parses_with_aiortc() -> None:
    stats = rtp.ReceiveStats(8000)
    stats.update(rtp.RtpHeader(0, False, 10, 0, 99, 12), 172, 1.0)
    data = rtp.sender_report(42, 5000, 10, 1600, [stats.report_block()], cname="ms-1")
    packets = RtcpPacket.parse(data)
    sr = packets[0]
    assert isinstance(sr, RtcpSrPacket) and sr.ssrc == 42
    assert (sr.sender_info.packet_count, sr.sender_info.octet_count) == (10, 1600)
    assert sr.reports[0].ssrc == 99
    assert [t for t, _, _ in rtp.rtcp_packets(data)] == [rtp.RTCP_SR, rtp.RTCP_SDES]


def test_demux_helpers() -> None:
    assert rtp.is_rtcp(rtp.sender_report(1, 0, 0, 0, []))
    assert not rtp.is_rtcp(rtp.build(0, True, 1, 1, 1, b"x"))
    assert rtp.is_rtp_or_rtcp(rtp.build(0, False, 1, 1, 1, b"x"))


def test_dtmf_key_is_updates_then_three_end_packets() -> None:
    packets = dtmf.key_packets("#", duration_ms=100)
    assert packets[0].first and not any(p.first for p in packets[1:])
    ends = [p for p in packets if p.payload[1] & 0x80]
    assert len(ends) == 3 and all(p.payload[0] == 11 for p in packets)
    assert int.from_bytes(ends[0].payload[2:], "big") == 800
    with pytest.raises(ValueError):
        dtmf.key_packets("x")


def test_dtmf_detector_reports_each_event_once() -> None:
    detector = dtmf.EventDetector()
    seen = [detector.feed(1000, p.payload) for p in dtmf.key_packets("7")]
    seen += [detector.feed(5000, p.payload) for p in dtmf.key_packets("*")]
    assert [k for k in seen if k] == ["7", "*"]


def test_ringback_cadence_and_tone() -> None:
    frames = ringback.render(ringback.Cadence((440.0, 480.0), 1000, 2000))
    assert len(frames) == 150 and all(len(f) == 160 for f in frames)
    assert frames[0] != frames[60] and frames[60] == bytes([g711.SILENCE]) * 160
    tone = ringback.Ringback()
    assert [tone.next_frame()[0] for _ in range(3)] == [0, 160, 320]


def test_g711_round_trip_is_close() -> None:
    for sample in (-30000, -1000, 0, 5, 1000, 30000):
        back = g711.decode_sample(g711.encode([sample])[0])
        assert abs(back - sample) <= max(16, abs(sample) // 16)


OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0 126\r\na=rtpmap:111 opus/48000/2\r\n"
    "a=rtpmap:0 PCMU/8000\r\na=rtpmap:126 telephone-event/8000\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n"
)


def test_pcmu_is_preferred_and_opus_only_when_asked_or_needed() -> None:
    sdp, choice = choose_audio(OFFER, None)
    assert choice is not None and (choice.codec, choice.payload_type) == ("PCMU", 0)
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n" in sdp and "m=video 9 UDP/TLS/RTP/SAVPF 96" in sdp
    # The other codecs' attributes go too: aiortc would otherwise answer with them.
    assert "opus" not in sdp and "telephone-event" not in sdp and "VP8/90000" in sdp
    assert choose_audio(OFFER, "OPUS")[1].codec == "OPUS"  # type: ignore[union-attr]
    opus_only = OFFER.replace(" 111 0 126", " 111 126").replace("a=rtpmap:0 PCMU/8000\r\n", "")
    assert choose_audio(opus_only, "PCMU")[1].codec == "OPUS"  # type: ignore[union-attr]
    with pytest.raises(NoCommonCodec):
        choose_audio(OFFER.replace("opus/48000/2", "G722/8000").replace("PCMU", "PCMA"), None)


def test_transcoders_keep_20ms_framing() -> None:
    tone = ringback.Ringback()
    to_opus, to_pcmu = PcmuToOpus(), OpusToPcmu()
    opus = [p for _ in range(50) for p in to_opus.feed(tone.next_frame()[1])]
    assert len(opus) >= 48
    pcmu = [p for o in opus for p in to_pcmu.feed(o)]
    assert len(pcmu) >= 47 and {len(p) for p in pcmu} == {160}


def test_talkspurts_start_after_silence_not_after_loss_or_reordering() -> None:
    spurts = rtp.TalkSpurts(8000)
    feed = [(1, 0), (2, 160), (4, 480),  # one packet lost: both moved by two
            (3, 320),  # late: starts nothing
            (5, 640), (6, 640 + 160 + 8000),  # a second of DTX
            (7, 640 + 320 + 8000), (7, 640 + 320 + 8000)]  # a duplicate
    assert [spurts.starts(seq, ts) for seq, ts in feed] == [0, 0, 0, 0, 0, 8000, 0, 0]
    wrap = rtp.TalkSpurts(8000)
    assert [wrap.starts(s, t) for s, t in ((65535, 2**32 - 160), (0, 0), (1, 160))] == [0, 0, 0]


def test_stamp_moves_the_timeline_without_using_a_sequence_number() -> None:
    rw = rtp.RtpRewriter(ssrc=1, clock_rate=8000)
    first = RtpPacket.parse(rw.rewrite(7, 0, False, 0, b"x", now=0.0))
    for i in range(1, 50):  # held: stamped, not sent
        rw.stamp(7, 160 * i, now=0.02 * i)
    rw.mark_next()
    resumed = RtpPacket.parse(rw.rewrite(7, 0, False, 160 * 50, b"x", now=1.0))
    assert (resumed.sequence_number - first.sequence_number) & 0xFFFF == 1
    assert (resumed.timestamp - first.timestamp) & 0xFFFFFFFF == 8000
    assert (first.marker, resumed.marker) == (1, 1)
    video = rtp.RtpRewriter(ssrc=2, clock_rate=90000, mark_switches=False)
    assert RtpPacket.parse(video.rewrite(9, 96, False, 0, b"v")).marker == 0
