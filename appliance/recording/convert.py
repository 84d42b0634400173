"""The Convertor: one finished call's captures -> one encrypted Matroska recording.

Order matters, because the captures are the only copy of the call until the encrypted file is
proven good: repair the captures -> mux (video packets copied, never re-encoded; µ-law audio to
FLAC) -> check the mkv -> encrypt -> decrypt it again and compare SHA-256 -> rename into place
-> mark the job converted -> only then delete the captures. Any failure before the job says
"converted" deletes nothing but our own temp files, records attempts/last_error in the job and
re-raises: the caller retries later. Running it again on a converted job returns the file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import heapq
import itertools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.audio.stream import AudioStream
from av.stream import Stream

from appliance.core.private_files import create_private, fsync_dir, makedirs_private
from appliance.media.vp8 import frame_keyframe_size
from appliance.recording import keys
from appliance.recording.capture_files import try_lock_capture
from appliance.recording.capture_paths import day_of, resolve_in
from appliance.recording.crypto import (
    RecordingDecryptError,
    decrypted_sha256,
    encrypt_file_digest,
    read_header,
)
from appliance.recording.ivf import IvfHeader, iter_ivf_frames, repair_ivf
from appliance.recording.job import Job, JobError, load_job, save_job
from appliance.recording.wav import WAVE_FORMAT_MULAW, WavInfo, iter_wav_data, repair_wav

log = logging.getLogger("appliance.recording")

EXIT_BUSY = 75  # EX_TEMPFAIL: another convertor has the job, or a worker still writes it
VIDEO_TITLES = {"user": "customer camera", "agent": "agent camera"}
AUDIO_TITLE = "voice (left: customer, right: agent desk phone)"


class ConvertError(Exception):
    """The job cannot be converted (now); nothing was deleted."""


class ConvertBusy(ConvertError):
    """Another convertor holds the job, or a media worker is still writing a capture."""


class CleanupError(ConvertError):
    """The recording is converted and safe, but some captures could not be deleted."""


def final_relpath(job: Job) -> str:
    return f"final/{day_of(job.started_at)}/{job.base}.mkv.enc"


def convert(recording_dir: Path, job_path: Path, master: bytes) -> Path:
    """Convert one job; returns the encrypted recording's path. See the module docstring."""
    root = recording_dir.resolve()
    if not job_path.is_file():
        raise JobError(f"no job file at {job_path}")
    with _job_lock(job_path):
        job = load_job(job_path)
        if job.status == "converted":
            return _already_converted(root, job_path, job)
        try:
            final = _convert(root, job, master)
        except Exception as exc:
            job.attempts += 1
            job.last_error = f"{type(exc).__name__}: {exc}"[:1000]
            try:
                save_job(job_path, job)
            except (OSError, JobError) as save_exc:
                log.error("cannot record the failure in %s: %s", job_path, save_exc)
            raise
        job.attempts += 1
        job.status, job.record_file, job.last_error = "converted", final_relpath(job), None
        save_job(job_path, job)  # the recording is safe from here: now the captures may go
        log.info("recording %s converted to %s", job.base, final)
        _remove_captures(root, job_path, job)
        return final


def _already_converted(root: Path, job_path: Path, job: Job) -> Path:
    if not job.record_file:
        raise JobError(f"job {job_path} says converted but names no record_file")
    final = resolve_in(root, job.record_file)
    if not final.is_file():
        raise ConvertError(f"job {job_path} says converted but {final} is missing")
    _remove_captures(root, job_path, job)  # left over if a previous run died while deleting
    return final


def _capture_paths(root: Path, job: Job) -> list[tuple[str, Path]]:
    named = [("audio", job.audio), ("user", job.video.user), ("agent", job.video.agent)]
    return [(label, resolve_in(root, rel)) for label, rel in named if rel]


def _convert(root: Path, job: Job, master: bytes) -> Path:
    final = resolve_in(root, final_relpath(job))
    makedirs_private(final.parent)
    with contextlib.ExitStack() as locks:
        audio: tuple[Path, WavInfo] | None = None
        videos: list[tuple[str, Path, IvfHeader]] = []
        for label, path in _capture_paths(root, job):
            if not path.exists():
                # The job names what the call was meant to record; a stream that never
                # started (e.g. the agent's video page never connected) has no file.
                log.warning("recording %s: no %s capture at %s", job.base, label, path)
                continue
            fd = try_lock_capture(path)
            if fd is None:
                raise ConvertBusy(f"{path} is still being written (its media worker is alive)")
            locks.callback(os.close, fd)
            if label == "audio":
                info = repair_wav(path)
                if info.data_size:
                    audio = (path, info)
                else:  # a track without a single packet would make an unreadable file
                    log.warning("recording %s: the audio capture is empty; left out", job.base)
                continue
            header = repair_ivf(path)
            if not any(frame.keyframe for frame in iter_ivf_frames(path)):
                log.warning("recording %s: the %s video has no key frame; left out",
                            job.base, label)
                continue
            videos.append((label, path, header))
        if audio is None and not videos:
            raise ConvertError(f"recording {job.base}: nothing was captured (no audio samples, "
                               "no video key frame)")

        pattern = f".{glob.escape(job.base)}.mkv*"  # every temp file of this job
        _remove_matching(final.parent, pattern)  # left by a convertor killed mid-way
        plain = final.parent / f".{job.base}.mkv.tmp"
        sealed = final.parent / f".{job.base}.mkv.enc.tmp"
        try:
            # Created 0600 before PyAV opens it: the plaintext call is never world-readable.
            os.close(create_private(plain))
            written = _mux(plain, job, audio, videos)
            _check_mkv(plain, written)
            digest = encrypt_file_digest(plain, sealed, master, job.roomkey)
            if decrypted_sha256(sealed, master, job.roomkey) != digest:
                raise ConvertError(f"{sealed} does not decrypt to the recording it was made from")
            _refuse_foreign(final, job)
            os.replace(sealed, final)
            fsync_dir(final.parent)
        finally:
            _remove_matching(final.parent, pattern)
    return final


def _refuse_foreign(final: Path, job: Job) -> None:
    """dialogid+ref concatenated can collide (1|23 vs 12|3): never replace another call's
    recording. One with our roomkey is ours, from a run that died before updating the job."""
    if not final.exists():
        return
    try:
        owner = read_header(final).roomkey
    except RecordingDecryptError:
        owner = None
    if owner != job.roomkey:
        raise ConvertError(f"{final} already exists and belongs to another recording: "
                           "not overwriting it")


def _remove_matching(directory: Path, pattern: str) -> None:
    for leftover in directory.glob(pattern):
        leftover.unlink(missing_ok=True)


def _remove_captures(root: Path, job_path: Path, job: Job) -> None:
    failed = []
    for _, path in _capture_paths(root, job):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror}")
    if failed:
        job.last_error = "cleanup: " + "; ".join(failed)
        save_job(job_path, job)
        raise CleanupError(f"converted, but could not delete {', '.join(failed)}")


@contextlib.contextmanager
def _job_lock(job_path: Path) -> Iterator[None]:
    """One convertor per job (the MS's retry loop and an operator may race)."""
    lock_path = job_path.with_name(job_path.name + ".lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConvertBusy(f"{job_path} is being converted by another process") from None
        # The previous holder unlinks the lock file when done; if it did so after we opened
        # it, we hold a lock on a dead inode: start again with the current file.
        try:
            current = os.stat(lock_path)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


# ---- muxing ----------------------------------------------------------------------------------

@dataclass
class _Written:
    packets: dict[int, int]  # stream index -> packets muxed


def _mux(out_path: Path, job: Job, audio: tuple[Path, WavInfo] | None,
         videos: list[tuple[str, Path, IvfHeader]]) -> _Written:
    written = _Written({})
    with av.open(str(out_path), "w", format="matroska") as out:
        out.metadata.update({
            "title": f"call {job.dialogid}/{job.ref} channel {job.channel}",
            "appliance_id": job.appliance_id, "dialogid": str(job.dialogid),
            "ref": str(job.ref), "channel": str(job.channel), "roomkey": str(job.roomkey),
        })
        sources: list[Iterator[tuple[Fraction, av.Packet]]] = []
        if audio is not None:
            stream = out.add_stream("flac", rate=audio[1].rate,
                                    layout="stereo" if audio[1].channels == 2 else "mono")
            stream.metadata["title"] = AUDIO_TITLE
            sources.append(_audio_packets(audio[0], audio[1], stream))
        for label, path, header in videos:
            video = out.add_mux_stream("vp8", width=header.width, height=header.height)
            video.metadata["title"] = VIDEO_TITLES[label]
            sources.append(_video_packets(path, header, video))
        # Interleave by time ourselves: every source is in time order, so a merge keeps the
        # muxer's buffer small however long the call was.
        for _, packet in heapq.merge(*sources, key=lambda item: item[0]):
            out.mux(packet)
            if packet.size:  # FLAC's last packet only carries the final STREAMINFO
                index = packet.stream.index
                written.packets[index] = written.packets.get(index, 0) + 1
    return written


def _audio_packets(path: Path, info: WavInfo,
                   stream: AudioStream) -> Iterator[tuple[Fraction, av.Packet]]:
    """G.711 -> 16-bit PCM -> FLAC (lossless from here; Matroska has no µ-law codec)."""
    codec = "pcm_mulaw" if info.format_tag == WAVE_FORMAT_MULAW else "pcm_alaw"
    decoder = av.CodecContext.create(codec, "r")
    decoder.sample_rate = info.rate
    decoder.layout = "stereo" if info.channels == 2 else "mono"
    encoder = stream.codec_context
    encoder.format = "s16"
    encoder.open()  # now frame_size is known (FLAC wants whole blocks but the last)
    time_base = Fraction(1, info.rate)
    fifo = av.AudioFifo()
    samples = 0

    def encode(frame: av.AudioFrame | None) -> Iterator[tuple[Fraction, av.Packet]]:
        for packet in stream.encode(frame):
            yield packet.pts * packet.time_base, packet

    for data in iter_wav_data(path, info):
        for frame in decoder.decode(av.Packet(data)):
            frame.pts = None  # the fifo checks continuity only when there are pts
            fifo.write(frame)
        while (block := fifo.read(encoder.frame_size)) is not None:
            block.pts, block.time_base = samples, time_base
            samples += block.samples
            yield from encode(block)
    if (rest := fifo.read(0, partial=True)) is not None:
        rest.pts, rest.time_base = samples, time_base
        yield from encode(rest)
    yield from encode(None)


def _video_packets(path: Path, header: IvfHeader,
                   stream: Stream) -> Iterator[tuple[Fraction, av.Packet]]:
    """The IVF's VP8 frames as packets, timestamps kept (the common call clock)."""
    time_base = Fraction(header.scale, header.rate)
    frames = iter_ivf_frames(path)
    skipped = 0
    for frame in frames:  # a recording starts at a key frame: before it nothing decodes
        if frame_keyframe_size(frame.data):
            break
        skipped += 1
    else:
        return
    if skipped:
        log.info("%s: %d frames before the first key frame left out", path.name, skipped)
    current, last_pts = frame, frame.pts
    for following in itertools.chain(frames, [None]):
        pts = max(current.pts, last_pts)  # a muxer needs non-decreasing timestamps
        packet = av.Packet(current.data)
        packet.stream = stream
        packet.time_base = time_base
        packet.pts = packet.dts = pts
        if following is not None and following.pts > pts:
            packet.duration = following.pts - pts
        packet.is_keyframe = current.keyframe
        last_pts = pts
        yield pts * time_base, packet
        if following is None:
            break
        current = following


def _check_mkv(path: Path, written: _Written) -> None:
    """Read the mkv back: every packet we muxed must be there before anything is deleted."""
    found: dict[int, int] = {}
    with av.open(str(path)) as mkv:
        for packet in mkv.demux():
            if packet.size:
                found[packet.stream.index] = found.get(packet.stream.index, 0) + 1
    if found != written.packets:
        raise ConvertError(f"{path}: muxed packets {written.packets}, read back {found}")


# ---- `appliance convert` ---------------------------------------------------------------------

def main_convert(argv: list[str] | None = None) -> int:
    """appliance convert [--recordings DIR] [--key-file PATH] JOB.json"""
    parser = argparse.ArgumentParser(
        prog="appliance convert",
        description="Mux and encrypt one finished call's captures into final/…/*.mkv.enc.")
    parser.add_argument("job", type=Path, metavar="JOB.json", help="the job file")
    parser.add_argument("--recordings", type=Path, default=None,
                        help="the recording directory (default: the job's jobs/ parent)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="the master secret file (default: the one the config names, "
                             "<data_dir>/recording-master.key); it must exist")
    parser.add_argument("--config", default=None, help="appliance config, for the key file")
    args = parser.parse_args(argv)
    try:
        master = keys.load_master(args.key_file or keys.default_key_path(args.config))
        recordings = args.recordings or args.job.resolve().parent.parent
        final = convert(recordings, args.job, master)
    except ConvertBusy as exc:
        print(f"appliance convert: busy, try again later: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except Exception as exc:  # a readable line for the operator; the job keeps last_error
        print(f"appliance convert: error: {exc}", file=sys.stderr)
        return 1
    print(final)
    return 0
