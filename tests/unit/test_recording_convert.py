"""Capture formats, the VP8 depacketizer and the Convertor (repair, mux, encrypt, verify, clean).

Video is real VP8, encoded once per module with PyAV's libvpx; the muxed and decrypted file
is checked with ffprobe (installed for the tests only; the product uses PyAV).
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import pytest

from appliance.media import g711
from appliance.media.rtp_timestamps import RtpTimestampUnwrapper
from appliance.media.vp8 import frame_is_keyframe
from appliance.media.vp8_depacketizer import Vp8Depacketizer
from appliance.recording import convert as convert_module
from appliance.recording import keys
from appliance.recording.capture_files import CaptureFormatError
from appliance.recording.capture_paths import capture_paths
from appliance.recording.convert import (
    EXIT_BUSY,
    ConvertBusy,
    ConvertError,
    convert,
    main_convert,
)
from appliance.recording.crypto import decrypt_file, encrypt_file, read_header
from appliance.recording.ivf import IvfWriter, iter_ivf_frames, read_ivf_header, repair_ivf
from appliance.recording.job import Job, JobError, load_job, new_job, save_job
from appliance.recording.wav import WavWriter, interleave, read_wav_info, repair_wav

MASTER = bytes(range(100, 132))
ROOMKEY = 987654321012
WIDTH, HEIGHT, FPS, SECONDS = 160, 120, 15, 3
FRAME_PTS = 90000 // FPS
STARTED_AT = time.mktime((2020, 4, 5, 10, 30, 0, 0, 0, -1))
AGENT_OFFSET = 90000  # the agent's camera joins 1 s into the call


@pytest.fixture(scope="module")
def vp8_frames() -> list[bytes]:
    """3 s of 160x120 VP8 at 15 fps, a key frame every 15 frames."""
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, FPS), FPS
    encoder.gop_size, encoder.bit_rate = FPS, 150_000
    frames: list[bytes] = []
    for i in range(FPS * SECONDS):
        picture = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
        picture.planes[0].update(bytes((x + 4 * i) % 256 for x in range(WIDTH)) * HEIGHT)
        picture.planes[1].update(bytes([128]) * (WIDTH * HEIGHT // 4))
        picture.planes[2].update(bytes([128 + i % 64]) * (WIDTH * HEIGHT // 4))
        picture.pts = i
        frames += [bytes(p) for p in encoder.encode(picture)]
    frames += [bytes(p) for p in encoder.encode(None)]
    assert len(frames) == FPS * SECONDS and frame_is_keyframe(frames[0])
    return frames


def _tone() -> bytes:
    """3 s of stereo µ-law: 440 Hz on the left (customer), 660 Hz on the right (agent)."""
    return interleave(g711.tone([440.0], SECONDS * 1000),
                      g711.tone([660.0], SECONDS * 1000))


def _make_job(root: Path, frames: list[bytes], audio: bool = True, user: bool = True,
              agent: bool = True, dialogid: int = 13290721) -> tuple[Path, Job]:
    job, paths = new_job(roomkey=ROOMKEY, appliance_id="ms-1", dialogid=dialogid, ref=2392510,
                         channel=4, started_at=STARTED_AT, audio=audio, video_user=user,
                         video_agent=agent)
    job_path = root / paths.job
    save_job(job_path, job)
    if audio:
        with WavWriter(root / paths.audio) as wav:
            tone = _tone()
            for i in range(0, len(tone), 320):  # 20 ms packets, as the media worker writes
                wav.write_frames(tone[i : i + 320])
                if i == 16000:
                    wav.flush()
    for wanted, rel, offset in ((user, paths.video_user, 0),
                                (agent, paths.video_agent, AGENT_OFFSET)):
        if wanted:
            with IvfWriter(root / rel) as ivf:
                for i, frame in enumerate(frames):
                    ivf.write_frame(frame, offset + i * FRAME_PTS)
    job.status, job.ended_at = "ended", STARTED_AT + SECONDS
    save_job(job_path, job)
    return job_path, job


def _probe(path: Path) -> list[dict[str, object]]:
    """[{codec, duration, start, title}] of each stream, via ffprobe."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries",
         "stream=codec_name,duration,start_time:stream_tags=DURATION,title", "-of", "json",
         str(path)], check=True, capture_output=True, text=True).stdout
    streams = []
    for s in json.loads(out)["streams"]:
        tags = s.get("tags", {})
        if s.get("duration", "N/A") != "N/A":
            end = float(s["duration"]) + float(s.get("start_time", 0))
        else:  # Matroska keeps per-track durations (end times) in a DURATION tag
            h, m, sec = tags["DURATION"].split(":")
            end = int(h) * 3600 + int(m) * 60 + float(sec)
        start = float(s.get("start_time", 0))
        streams.append({"codec": s["codec_name"], "start": start, "duration": end - start,
                        "title": tags.get("title", "")})
    return streams


def _decrypted(final: Path, tmp_path: Path) -> Path:
    mkv = tmp_path / "check.mkv"
    mkv.unlink(missing_ok=True)
    decrypt_file(final, mkv, MASTER, ROOMKEY)
    return mkv


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- the capture formats -------------------------------------------------------------------

def test_wav_writer_output_is_a_standard_mulaw_wav(tmp_path: Path) -> None:
    path = tmp_path / "audio" / "20200405" / "a.wav"
    with WavWriter(path) as wav:
        wav.write_frames(_tone())
        with pytest.raises(ValueError):
            wav.write_frames(b"\xff")  # half a stereo sample frame
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    info = read_wav_info(path)
    assert (info.format_tag, info.channels, info.rate, info.data_offset) == (7, 2, 8000, 58)
    assert info.data_size == 2 * 8000 * SECONDS and info.duration == SECONDS
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries",
         "stream=codec_name,channels,sample_rate,duration", "-of", "json", str(path)],
        check=True, capture_output=True, text=True).stdout
    stream = json.loads(probe)["streams"][0]
    assert stream["codec_name"] == "pcm_mulaw" and stream["channels"] == 2
    assert stream["sample_rate"] == "8000" and float(stream["duration"]) == SECONDS
    with pytest.raises(FileExistsError):  # never overwrites another call's capture
        WavWriter(path)


def test_interleave_pads_the_shorter_side_with_silence() -> None:
    assert interleave(b"ab", b"xyz") == b"axby\xffz"
    assert interleave(b"abc", b"") == b"a\xffb\xffc\xff"


def test_ivf_writer_output_is_readable(tmp_path: Path, vp8_frames: list[bytes]) -> None:
    path = tmp_path / "v.ivf"
    with IvfWriter(path) as ivf:
        for i, frame in enumerate(vp8_frames):
            ivf.write_frame(frame, i * FRAME_PTS)
        with pytest.raises(ValueError):
            ivf.write_frame(b"", 0)
    header = read_ivf_header(path)
    assert (header.width, header.height) == (WIDTH, HEIGHT)  # taken from the first key frame
    assert (header.rate, header.scale, header.frame_count) == (90000, 1, len(vp8_frames))
    frames = list(iter_ivf_frames(path))
    assert [f.data for f in frames] == vp8_frames
    assert [f.pts for f in frames] == [i * FRAME_PTS for i in range(len(vp8_frames))]
    with av.open(str(path)) as container:  # FFmpeg agrees it is VP8 in IVF
        assert container.streams.video[0].codec_context.name == "vp8"
        assert sum(1 for p in container.demux() if p.size) == len(vp8_frames)


def test_repair_wav_fixes_sizes_and_drops_an_odd_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    with WavWriter(path) as wav:
        wav.write_frames(_tone())
    healthy = path.read_bytes()
    assert repair_wav(path).data_size == len(healthy) - 58
    assert path.read_bytes() == healthy  # a healthy file is untouched
    raw = bytearray(healthy[:-1001])  # cut mid sample frame
    raw[4:8] = raw[54:58] = raw[46:50] = b"\0\0\0\0"  # what a kill before close leaves
    path.write_bytes(raw)
    info = repair_wav(path)
    assert info.data_size == len(healthy) - 58 - 1002
    repaired = path.read_bytes()
    assert len(repaired) == len(healthy) - 1002
    assert struct.unpack_from("<I", repaired, 4)[0] == len(repaired) - 8
    assert struct.unpack_from("<I", repaired, 54)[0] == info.data_size
    assert struct.unpack_from("<I", repaired, 46)[0] == info.data_size // 2
    assert repair_wav(path) == info and path.read_bytes() == repaired


def test_repair_ivf_drops_a_partial_trailing_frame(tmp_path: Path,
                                                  vp8_frames: list[bytes]) -> None:
    path = tmp_path / "v.ivf"
    with IvfWriter(path) as ivf:
        for i, frame in enumerate(vp8_frames):
            ivf.write_frame(frame, i * FRAME_PTS)
    healthy = path.read_bytes()
    raw = bytearray(healthy[: -len(vp8_frames[-1]) // 2])  # killed while writing the last
    raw[6 * 4 : 6 * 4 + 4] = b"\0\0\0\0"  # frame count never written
    raw[12:16] = b"\0\0\0\0"  # nor the size
    path.write_bytes(raw)
    assert len(list(iter_ivf_frames(path))) == len(vp8_frames) - 1
    header = repair_ivf(path)
    assert (header.frame_count, header.width, header.height) == (len(vp8_frames) - 1, 160, 120)
    expected = bytearray(healthy[: len(healthy) - 12 - len(vp8_frames[-1])])
    expected[24:28] = struct.pack("<I", len(vp8_frames) - 1)
    assert path.read_bytes() == expected
    # a frame header cut short, and a zero-filled tail (power cut) are dropped too
    path.write_bytes(healthy + b"\x05\x00\x00")
    assert repair_ivf(path).frame_count == len(vp8_frames)
    path.write_bytes(healthy + bytes(5000))
    assert repair_ivf(path).frame_count == len(vp8_frames)
    assert path.read_bytes() == healthy
    # but garbage is refused, not silently cut away
    path.write_bytes(healthy + b"\xff" * 5000)
    with pytest.raises(CaptureFormatError, match="corrupt frame header"):
        repair_ivf(path)
    path.write_bytes(b"RIFF" + bytes(60))
    with pytest.raises(CaptureFormatError, match="not an IVF"):
        repair_ivf(path)


def test_job_file_round_trip_and_atomic_save(tmp_path: Path) -> None:
    job, paths = new_job(roomkey=ROOMKEY, appliance_id="ms-1", dialogid=13290721, ref=2392510,
                         channel=4, started_at=STARTED_AT, video_user=True)
    assert paths.audio == "audio/20200405/132907212392510_004.wav"
    assert paths.video_user == "video/20200405/132907212392510_004.user.ivf"
    assert paths.final == "final/20200405/132907212392510_004.mkv.enc"
    path = tmp_path / paths.job
    save_job(path, job)
    raw = json.loads(path.read_text())
    assert list(raw) == ["version", "roomkey", "appliance_id", "dialogid", "ref", "channel",
                         "started_at", "ended_at", "audio", "video", "status", "record_file",
                         "attempts", "last_error"]
    assert raw["video"] == {"user": paths.video_user, "agent": None}
    assert raw["status"] == "recording" and raw["attempts"] == 0
    assert load_job(path) == job
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind
    path.write_text('{"version": 1, "roomkey": "x"}')
    with pytest.raises(JobError):
        load_job(path)


# ---- the VP8 depacketizer -------------------------------------------------------------------

def _packetize(frame: bytes, timestamp: int, seq: int, picture_id: int,
               mtu: int = 60) -> list[tuple[bytes, bool, int, int]]:
    """RFC 7741 packets: X=1 with a 15-bit picture ID, S=1 on the first, marker on the last."""
    pieces = [frame[i : i + mtu] for i in range(0, len(frame), mtu)]
    packets = []
    for n, piece in enumerate(pieces):
        descriptor = bytes([0x90 if n == 0 else 0x80, 0x80, 0x80 | picture_id >> 8 & 0x7F,
                            picture_id & 0xFF])
        packets.append((descriptor + piece, n == len(pieces) - 1, timestamp,
                        (seq + n) & 0xFFFF))
    return packets


def _rtp_stream(frames: list[bytes], seq: int = 65500) -> list[list[tuple[bytes, bool, int, int]]]:
    out = []
    for i, frame in enumerate(frames):
        packets = _packetize(frame, (4_294_900_000 + i * FRAME_PTS) & 0xFFFFFFFF, seq, i)
        seq += len(packets)
        out.append(packets)
    return out


def test_depacketizer_reassembles_frames_split_across_packets(vp8_frames: list[bytes]) -> None:
    stream = _rtp_stream(vp8_frames)  # sequence numbers and timestamps both wrap
    assert max(len(p) for p in stream) > 2
    depacketizer = Vp8Depacketizer()
    out = []
    for packets in stream:
        for packet in packets:
            out += depacketizer.push(*packet)
    assert [f.data for f in out] == vp8_frames
    assert [f.keyframe for f in out] == [frame_is_keyframe(f) for f in vp8_frames]
    assert out[0].timestamp == 4_294_900_000 and out[-1].timestamp < 1_000_000
    assert depacketizer.frames_dropped == 0 and not depacketizer.keyframe_needed


def test_depacketizer_drops_a_frame_with_a_gap(vp8_frames: list[bytes]) -> None:
    stream = _rtp_stream(vp8_frames)
    lost = next(i for i in range(2, 15) if len(stream[i]) >= 2)  # an inter frame, 2+ packets
    depacketizer = Vp8Depacketizer(wait_for_keyframe=False)
    out = []
    for i, packets in enumerate(stream):
        for n, packet in enumerate(packets):
            if i == lost and n == 0:
                continue  # the frame's first packet is lost
            out += depacketizer.push(*packet)
    assert [f.data for f in out] == vp8_frames[:lost] + vp8_frames[lost + 1 :]
    assert depacketizer.frames_dropped == 1

    # By default the inter frames after the loss wait for the next key frame (a PLI helps).
    depacketizer = Vp8Depacketizer()
    out, needed = [], []
    for i, packets in enumerate(stream):
        for n, packet in enumerate(packets):
            if i == lost and n == len(packets) - 1:
                continue  # this time the frame's last packet (with the marker) is lost
            out += depacketizer.push(*packet)
        needed.append(depacketizer.keyframe_needed)
    next_key = 15  # gop_size
    assert [f.data for f in out] == vp8_frames[:lost] + vp8_frames[next_key:]
    # (the loss shows when the next frame's first packet arrives: its marker never came)
    assert needed[lost + 1 : next_key] == [True] * (next_key - lost - 1)
    assert not needed[lost - 1] and not needed[next_key]


def test_depacketizer_without_markers_duplicates_and_a_late_start(
        vp8_frames: list[bytes]) -> None:
    stream = _rtp_stream(vp8_frames[:15])
    depacketizer = Vp8Depacketizer()
    out = []
    # joined mid-frame: the first frame's start is missing, so it is not emitted
    for packet in stream[0][1:]:
        out += depacketizer.push(*packet)
    assert out == [] and depacketizer.frames_dropped == 1
    # frames without markers are emitted when the timestamp moves on; duplicates are ignored
    depacketizer = Vp8Depacketizer()
    for packets in stream:
        for payload, _, ts, seq in packets:
            out += depacketizer.push(payload, False, ts, seq)
            out += depacketizer.push(payload, False, ts, seq)
    assert [f.data for f in out] == vp8_frames[:14]  # the last one waits for its successor


def test_rtp_timestamp_unwrapper() -> None:
    unwrap = RtpTimestampUnwrapper()
    assert [unwrap.unwrap(t) for t in (0xFFFFFF00, 0xFFFFFFF0, 0x10, 0x8, 0x100)] == [
        0xFFFFFF00, 0xFFFFFFF0, 0x100000010, 0x100000008, 0x100000100]


# ---- the Convertor -------------------------------------------------------------------------

def test_convert_mux_encrypt_verify_and_clean(tmp_path: Path, vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, _ = _make_job(root, vp8_frames)
    final = convert(root, job_path, MASTER)

    assert final == root / "final" / "20200405" / "132907212392510_004.mkv.enc"
    assert _files(root) == {"jobs/132907212392510_004.json",
                            "final/20200405/132907212392510_004.mkv.enc"}  # captures gone
    assert read_header(final).roomkey == ROOMKEY
    done = load_job(job_path)
    assert (done.status, done.record_file, done.attempts, done.last_error) == (
        "converted", "final/20200405/132907212392510_004.mkv.enc", 1, None)

    mkv = _decrypted(final, tmp_path)
    streams = _probe(mkv)
    assert sorted(s["codec"] for s in streams) == ["flac", "vp8", "vp8"]
    by_title = {s["title"]: s for s in streams}
    audio = next(s for s in streams if s["codec"] == "flac")
    user, agent = by_title["customer camera"], by_title["agent camera"]
    for stream in (audio, user, agent):
        assert abs(stream["duration"] - SECONDS) <= 0.1 * SECONDS, streams
    # the two cameras stay aligned on the call's clock: the agent's starts 1 s later
    assert user["start"] == pytest.approx(0, abs=0.01)
    assert agent["start"] == pytest.approx(AGENT_OFFSET / 90000, abs=0.01)

    with av.open(str(mkv)) as container:
        videos = container.streams.video
        packets: dict[int, list[bytes]] = {v.index: [] for v in videos}
        for packet in container.demux(*videos):
            if packet.size:
                packets[packet.stream.index].append(bytes(packet))
        assert all(p == vp8_frames for p in packets.values())  # copied, not re-encoded
        assert (videos[0].codec_context.width, videos[0].codec_context.height) == (160, 120)
    with av.open(str(mkv)) as container:  # lossless audio: the same µ-law samples come back
        pcm = b"".join(bytes(f.planes[0]) for f in container.decode(audio=0))
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)
    assert g711.encode(list(samples)) == _tone()


def test_the_plaintext_mkv_is_never_readable_by_others(tmp_path: Path, vp8_frames: list[bytes],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "rec"
    job_path, _ = _make_job(root, vp8_frames, agent=False)
    seen = []
    original = convert_module._check_mkv

    def check(path: Path, written: object) -> None:
        seen.append(stat.S_IMODE(path.stat().st_mode))
        original(path, written)

    monkeypatch.setattr(convert_module, "_check_mkv", check)
    old = os.umask(0)
    try:
        final = convert(root, job_path, MASTER)
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert stat.S_IMODE(final.parent.stat().st_mode) == 0o700


def test_audio_only_and_video_only_jobs_convert(tmp_path: Path,
                                                vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, _ = _make_job(root, vp8_frames, user=False, agent=False)
    streams = _probe(_decrypted(convert(root, job_path, MASTER), tmp_path))
    assert [s["codec"] for s in streams] == ["flac"]
    assert abs(streams[0]["duration"] - SECONDS) <= 0.1 * SECONDS

    job_path, _ = _make_job(root, vp8_frames, audio=False, agent=False, dialogid=777)
    streams = _probe(_decrypted(convert(root, job_path, MASTER), tmp_path))
    assert [s["codec"] for s in streams] == ["vp8"]
    assert abs(streams[0]["duration"] - SECONDS) <= 0.1 * SECONDS


def test_empty_captures(tmp_path: Path, vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames, agent=False)
    (root / job.audio).unlink()
    WavWriter(root / job.audio).close()  # the audio never flowed: a header, no samples
    streams = _probe(_decrypted(convert(root, job_path, MASTER), tmp_path))
    assert [s["codec"] for s in streams] == ["vp8"]

    job_path, job = _make_job(root, vp8_frames, user=False, agent=False, dialogid=5)
    (root / job.audio).unlink()
    WavWriter(root / job.audio).close()
    before = _snapshot(root)
    with pytest.raises(ConvertError, match="nothing was captured"):
        convert(root, job_path, MASTER)
    assert set(_snapshot(root)) == set(before)
    assert "nothing was captured" in load_job(job_path).last_error


def test_one_convertor_per_job(tmp_path: Path, vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, _ = _make_job(root, vp8_frames, user=False, agent=False)
    lock = job_path.with_name(job_path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another convertor is at work on this job
        with pytest.raises(ConvertBusy, match="another process"):
            convert(root, job_path, MASTER)
        assert load_job(job_path).attempts == 0
    finally:
        os.close(fd)
    convert(root, job_path, MASTER)
    assert not lock.exists()


def test_a_stream_that_never_started_is_left_out(tmp_path: Path,
                                                 vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames, agent=False)
    job.video.agent = "video/20200405/132907212392510_004.agent.ivf"  # named, never created
    save_job(job_path, job)
    streams = _probe(_decrypted(convert(root, job_path, MASTER), tmp_path))
    assert sorted(s["codec"] for s in streams) == ["flac", "vp8"]


def test_convert_after_a_crash(tmp_path: Path, vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames)
    wav = root / job.audio
    raw = bytearray(wav.read_bytes()[:-8001])  # cut mid sample frame: 0.5 s and a byte lost
    raw[4:8] = raw[54:58] = b"\0\0\0\0"
    wav.write_bytes(raw)
    for rel in (job.video.user, job.video.agent):
        ivf = root / rel
        data = bytearray(ivf.read_bytes()[:-100])  # cut inside the last frame
        data[24:28] = b"\0\0\0\0"
        ivf.write_bytes(data)
    job.status = "recording"  # the worker died before it could say "ended"
    save_job(job_path, job)
    day = root / "final" / "20200405"  # and a convertor killed mid-way left its temp files
    day.mkdir(parents=True)
    for leftover in (".132907212392510_004.mkv.tmp", ".132907212392510_004.mkv.enc.tmp.ab.tmp"):
        (day / leftover).write_bytes(b"stale")

    final = convert(root, job_path, MASTER)
    assert _files(root) == {"jobs/132907212392510_004.json",
                            "final/20200405/132907212392510_004.mkv.enc"}
    streams = _probe(_decrypted(final, tmp_path))
    assert sorted(s["codec"] for s in streams) == ["flac", "vp8", "vp8"]
    audio = next(s for s in streams if s["codec"] == "flac")
    assert audio["duration"] == pytest.approx(SECONDS - 0.5, abs=0.05)  # 8001 B = 0.5 s stereo
    assert load_job(job_path).status == "converted"


def test_convert_after_a_worker_is_killed(tmp_path: Path, vp8_frames: list[bytes]) -> None:
    """A real SIGKILL: unflushed writes are still on disk, and the locks die with the process."""
    root = tmp_path / "rec"
    job, paths = new_job(roomkey=ROOMKEY, appliance_id="ms-1", dialogid=1, ref=2, channel=3,
                         started_at=STARTED_AT, video_user=True)
    save_job(root / paths.job, job)
    media = tmp_path / "media.pickle"
    media.write_bytes(pickle.dumps((vp8_frames, _tone())))
    script = f"""
import os, pickle, signal
from pathlib import Path
from appliance.recording.ivf import IvfWriter
from appliance.recording.wav import WavWriter
frames, tone = pickle.loads(Path({str(media)!r}).read_bytes())
wav = WavWriter(Path({str(root / paths.audio)!r}))
ivf = IvfWriter(Path({str(root / paths.video_user)!r}))
wav.write_frames(tone[:16000]); ivf.write_frame(frames[0], 0); wav.flush(); ivf.flush()
wav.write_frames(tone[16000:])
for i, frame in enumerate(frames[1:], 1):
    ivf.write_frame(frame, i * {FRAME_PTS})
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == -signal.SIGKILL and "written" in result.stdout, result.stderr
    assert read_ivf_header(root / paths.video_user).frame_count == 1  # stale header
    final = convert(root, root / paths.job, MASTER)
    streams = _probe(_decrypted(final, tmp_path))
    assert {s["codec"]: round(s["duration"]) for s in streams} == {"flac": 3, "vp8": 3}


def test_a_capture_still_being_written_is_not_touched(tmp_path: Path,
                                                      vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames, user=False, agent=False)
    (root / job.audio).unlink()
    live = WavWriter(root / job.audio)  # the media worker is alive and recording
    live.write_frames(_tone())
    before = _snapshot(root)
    with pytest.raises(ConvertBusy, match="still being written"):
        convert(root, job_path, MASTER)
    after = _snapshot(root)
    assert set(after) == set(before)  # nothing deleted, nothing created
    assert load_job(job_path).attempts == 1
    live.close()
    assert convert(root, job_path, MASTER).is_file()


def test_failure_deletes_nothing_and_records_the_error(tmp_path: Path,
                                                       vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames)
    agent_ivf = root / job.video.agent
    good = agent_ivf.read_bytes()
    agent_ivf.write_bytes(b"this is not an IVF file at all, sorry" * 10)
    before = set(_files(root))
    captures = {rel: (root / rel).read_bytes() for rel in (job.audio, job.video.user)}

    for attempt in (1, 2):
        with pytest.raises(CaptureFormatError, match="not an IVF"):
            convert(root, job_path, MASTER)
        assert _files(root) == before  # no capture deleted, no final or temp file left
        assert all((root / rel).read_bytes() == data for rel, data in captures.items())
        failed = load_job(job_path)
        assert (failed.status, failed.attempts, failed.record_file) == ("ended", attempt, None)
        assert "not an IVF" in failed.last_error

    agent_ivf.write_bytes(good)  # the operator restores the file; the next retry succeeds
    convert(root, job_path, MASTER)
    done = load_job(job_path)
    assert (done.status, done.attempts, done.last_error) == ("converted", 3, None)


def test_convert_is_idempotent(tmp_path: Path, vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames)
    final = convert(root, job_path, MASTER)
    content, job_after = final.read_bytes(), load_job(job_path)
    assert convert(root, job_path, MASTER) == final
    assert final.read_bytes() == content and load_job(job_path) == job_after
    # a run that died while deleting captures: the next run finishes the cleanup
    (root / job.audio).parent.mkdir(parents=True, exist_ok=True)
    (root / job.audio).write_bytes(b"left over")
    assert convert(root, job_path, MASTER) == final
    assert not (root / job.audio).exists()
    # but a converted job whose recording vanished is an error, not a silent success
    final.unlink()
    with pytest.raises(ConvertError, match="missing"):
        convert(root, job_path, MASTER)


def test_never_overwrites_another_calls_recording(tmp_path: Path,
                                                  vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames, user=False, agent=False)
    final = root / capture_paths(job.dialogid, job.ref, job.channel, STARTED_AT).final
    final.parent.mkdir(parents=True)
    other = tmp_path / "other.mkv"
    other.write_bytes(b"another call")
    encrypt_file(other, final, MASTER, ROOMKEY + 1)  # dialogid|ref collision, other roomkey
    foreign = final.read_bytes()
    with pytest.raises(ConvertError, match="belongs to another recording"):
        convert(root, job_path, MASTER)
    assert final.read_bytes() == foreign and (root / job.audio).exists()
    # one with our own roomkey is ours, from a run killed before it updated the job
    encrypt_file(other, final, MASTER, ROOMKEY)
    convert(root, job_path, MASTER)
    assert _probe(_decrypted(final, tmp_path))[0]["codec"] == "flac"


def test_a_job_cannot_point_outside_the_recording_directory(tmp_path: Path,
                                                            vp8_frames: list[bytes]) -> None:
    root = tmp_path / "rec"
    job_path, job = _make_job(root, vp8_frames, user=False, agent=False)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    job.video.user = "../precious.txt"
    save_job(job_path, job)
    with pytest.raises(CaptureFormatError, match="not inside"):
        convert(root, job_path, MASTER)
    assert victim.read_text() == "keep me"


def test_cli_convert(tmp_path: Path, vp8_frames: list[bytes],
                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "rec"
    job_path, _ = _make_job(root, vp8_frames, agent=False)
    key_file = tmp_path / "recording-master.key"
    args = ["--recordings", str(root), "--key-file", str(key_file), str(job_path)]
    assert main_convert(args) == 1  # the key file must exist: convert never invents a key
    assert "no recording key file" in capsys.readouterr().err
    master = keys.load_or_create_master(key_file)

    live = IvfWriter(root / "video" / "20200405" / "132907212392510_004.agent.ivf")
    job = load_job(job_path)
    job.video.agent = "video/20200405/132907212392510_004.agent.ivf"
    save_job(job_path, job)
    assert main_convert(args) == EXIT_BUSY
    assert "still being written" in capsys.readouterr().err
    live.close()  # no frames: that stream is simply left out

    assert main_convert(["--key-file", str(key_file), str(job_path)]) == 0  # default root
    final = Path(capsys.readouterr().out.strip())
    assert final.is_file()
    mkv = tmp_path / "cli.mkv"
    decrypt_file(final, mkv, master, ROOMKEY)
    assert sorted(s["codec"] for s in _probe(mkv)) == ["flac", "vp8"]
    assert main_convert(["--key-file", str(key_file), str(tmp_path / "nope.json")]) == 1
    assert capsys.readouterr().err.startswith("appliance convert: error:")
