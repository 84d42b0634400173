"""Capture formats written during the call and read by the Convertor, and the job file.

- audio: a stereo G.711 µ-law WAV (left = customer, right = the agent's desk phone);
- video: one IVF (VP8, timebase 1/90000) per direction, pts on the call's common clock;
- the job file: what the Convertor needs to find, mux, encrypt and clean up one recording.

The writers are used by the media worker while the call runs, so they are built for a process
that may be killed at any moment: every write goes straight to the kernel (no user-space buffer
to lose), `flush()` also rewrites the header sizes and fsyncs, and the readers repair what a
crash leaves (wrong sizes, a partial last frame). A writer holds an exclusive flock on its file;
the Convertor refuses a capture whose lock is still held (its worker is alive and writing).
Every file is created O_EXCL with mode 0600: captures are plaintext recordings of a call, and
an existing file (another call's) is never overwritten or appended to.

Layouts: docs/recording-format.md.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Self

import msgspec

from appliance.core.private_files import create_private, fsync_dir, makedirs_private
from appliance.media import vp8

# The frame-level VP8 readers the recorder and the Convertor use, under their old names.
from appliance.media.vp8 import frame_is_keyframe as vp8_is_keyframe
from appliance.media.vp8 import frame_keyframe_size as vp8_keyframe_size


class CaptureFormatError(Exception):
    """A capture file that is not in the expected format and cannot be repaired."""


# ---- files: exclusive, durable ------------------------------------------------------------

def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_capture(path: Path) -> int:
    makedirs_private(path.parent)
    fd = create_private(path)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written": see the module doc
    return fd


def try_lock_capture(path: Path) -> int | None:
    """Lock a capture for repair/conversion: an open descriptor, or None if a writer holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


# ---- names -----------------------------------------------------------------------------------

def base_name(dialogid: int, ref: int, channel: int) -> str:
    """`<dialogid><ref>_<channel:03d>`, the original's naming (e.g. 132907212392510_004)."""
    return f"{dialogid}{ref}_{channel:03d}"


def day_of(timestamp: float) -> str:
    """YYYYMMDD of a Unix time, local time (the call centre's calendar day)."""
    return time.strftime("%Y%m%d", time.localtime(timestamp))


@dataclass(frozen=True)
class CapturePaths:
    """Paths relative to the recording directory, as stored in the job file."""

    audio: str
    video_user: str
    video_agent: str
    job: str
    final: str


def capture_paths(dialogid: int, ref: int, channel: int, started_at: float) -> CapturePaths:
    base, day = base_name(dialogid, ref, channel), day_of(started_at)
    return CapturePaths(
        audio=f"audio/{day}/{base}.wav",
        video_user=f"video/{day}/{base}.user.ivf",
        video_agent=f"video/{day}/{base}.agent.ivf",
        job=f"jobs/{base}.json",
        final=f"final/{day}/{base}.mkv.enc",
    )


def resolve_in(recording_dir: Path, relative: str) -> Path:
    """`relative` under `recording_dir`, refusing anything that would point outside it (the
    Convertor deletes the captures a job names, so a job must not be able to name /etc/...).
    The check is on the name, not on symlinks: an operator may link final/ to other storage."""
    rel = Path(os.path.normpath(relative))
    if rel.is_absolute() or not rel.parts or rel.parts[0] == "..":
        raise CaptureFormatError(f"path {relative!r} is not inside {recording_dir}")
    return recording_dir.resolve() / rel


# ---- WAV: stereo G.711 -----------------------------------------------------------------------

WAVE_FORMAT_ALAW = 6
WAVE_FORMAT_MULAW = 7
# RIFF header, an 18-byte fmt chunk (cbSize = 0, as non-PCM formats require), a fact chunk
# (sample frames, also required for non-PCM), then the data chunk, which runs to end of file.
_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHHH4sII4sI")
WAV_DATA_OFFSET = _WAV_HEADER.size  # 58
_RIFF_SIZE_AT, _FACT_AT = 4, 46  # where the RIFF size and the fact..data sizes live
_U32_MAX = 0xFFFFFFFF


def interleave(left: bytes, right: bytes, silence: int = 0xFF) -> bytes:
    """Two mono G.711 streams -> stereo sample frames; the shorter is padded with silence
    (0xFF is µ-law silence; pass 0xD5 for A-law)."""
    n = max(len(left), len(right))
    out = bytearray([silence]) * (2 * n)
    out[0 : 2 * len(left) : 2] = left
    out[1 : 2 * len(right) : 2] = right
    return bytes(out)


def _wav_header(data_size: int, channels: int, rate: int, tag: int) -> bytes:
    riff = min(_U32_MAX, WAV_DATA_OFFSET - 8 + data_size)
    return _WAV_HEADER.pack(b"RIFF", riff, b"WAVE", b"fmt ", 18, tag, channels, rate,
                            rate * channels, channels, 8, 0, b"fact", 4,
                            min(_U32_MAX, data_size // channels), b"data",
                            min(_U32_MAX, data_size))


class _CaptureFile(ABC):
    """An incrementally written capture: its header is rewritten (sizes, counts) on every
    flush and at close. flush() may run in another thread than the writes (pwrite does not
    move the write position); the lock keeps it apart from close()."""

    def __init__(self, path: Path, header: bytes) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = _open_capture(path)
        _write_all(self._fd, header)

    @abstractmethod
    def _rewrite_header(self, fd: int) -> None:
        """Bring the header's sizes and counts up to what has been written."""

    def flush(self) -> None:
        """Make everything written so far durable and readable with a correct header."""
        with self._lock:
            fd = self._require_open()
            self._rewrite_header(fd)
            os.fsync(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                self._rewrite_header(fd)
                os.fsync(fd)
            finally:
                os.close(fd)  # also releases the flock: the Convertor may take the file now

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WavWriter(_CaptureFile):
    """An incrementally written G.711 WAV (default: µ-law, 8000 Hz, stereo)."""

    def __init__(self, path: Path, channels: int = 2, rate: int = 8000,
                 format_tag: int = WAVE_FORMAT_MULAW) -> None:
        self.channels, self.rate, self.format_tag = channels, rate, format_tag
        self.data_size = 0
        super().__init__(path, _wav_header(0, channels, rate, format_tag))

    def write_frames(self, interleaved: bytes) -> None:
        """Append sample frames (one byte per channel per sample, channels interleaved)."""
        if len(interleaved) % self.channels:
            raise ValueError("write_frames needs whole sample frames (one byte per channel)")
        _write_all(self._require_open(), interleaved)
        self.data_size += len(interleaved)

    def _rewrite_header(self, fd: int) -> None:
        header = _wav_header(self.data_size, self.channels, self.rate, self.format_tag)
        os.pwrite(fd, header[_RIFF_SIZE_AT : _RIFF_SIZE_AT + 4], _RIFF_SIZE_AT)
        os.pwrite(fd, header[_FACT_AT:], _FACT_AT)  # fact count, "data", data size


@dataclass(frozen=True)
class WavInfo:
    format_tag: int
    channels: int
    rate: int
    data_offset: int
    data_size: int  # whole sample frames only

    @property
    def duration(self) -> float:
        return self.data_size / (self.channels * self.rate)


def repair_wav(path: Path) -> WavInfo:
    """Fix the RIFF/fact/data sizes from the file size and drop a trailing partial sample
    frame, as a worker killed mid-call leaves them. Idempotent; a healthy file is untouched."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:  # killed between create and the header write: an empty capture
            f.write(_wav_header(0, 2, 8000, WAVE_FORMAT_MULAW))
            f.flush()
            os.fsync(f.fileno())
            return WavInfo(WAVE_FORMAT_MULAW, 2, 8000, WAV_DATA_OFFSET, 0)
        layout = _scan_wav(f.read(4096), size, path)
        info = layout.info
        changed = False
        if info.data_offset + info.data_size != size:
            f.truncate(info.data_offset + info.data_size)
            changed = True
        riff, fact, data = _wav_sizes(info)
        for offset, value in ((4, riff), (layout.fact_at, fact), (layout.data_size_at, data)):
            if offset is not None and layout.fields.get(offset) != value:
                f.seek(offset)
                f.write(struct.pack("<I", value))
                changed = True
        if changed:
            f.flush()
            os.fsync(f.fileno())
    return info


def read_wav_info(path: Path) -> WavInfo:
    """The format and the sample data a (possibly unrepaired) capture holds; changes nothing."""
    with open(path, "rb") as f:
        return _scan_wav(f.read(4096), os.fstat(f.fileno()).st_size, path).info


def iter_wav_data(path: Path, info: WavInfo, block: int = 1 << 16) -> Iterator[bytes]:
    """The sample bytes, `block` at a time (a multiple of the frame size)."""
    block -= block % info.channels
    with open(path, "rb") as f:
        f.seek(info.data_offset)
        left = info.data_size
        while left:
            data = f.read(min(block, left))
            if not data:
                break
            left -= len(data)
            yield data


@dataclass(frozen=True)
class _WavLayout:
    info: WavInfo
    fact_at: int | None  # offset of the fact chunk's sample count, if there is one
    data_size_at: int
    fields: dict[int, int]  # offset -> the u32 size value found there


def _wav_sizes(info: WavInfo) -> tuple[int, int, int]:
    """What the RIFF size, fact sample count and data size should say."""
    riff = min(_U32_MAX, info.data_offset + info.data_size - 8)
    return riff, min(_U32_MAX, info.data_size // info.channels), min(_U32_MAX, info.data_size)


def _scan_wav(head: bytes, size: int, path: Path) -> _WavLayout:
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise CaptureFormatError(f"{path} is not a WAV file")
    fields = {4: struct.unpack_from("<I", head, 4)[0]}
    fmt: tuple[int, int, int, int] | None = None
    fact_at: int | None = None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, chunk_size = struct.unpack_from("<4sI", head, pos)
        if chunk_id == b"data":
            break
        if chunk_id == b"fmt " and chunk_size >= 16 and pos + 24 <= len(head):
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, pos + 8)
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"fact" and chunk_size >= 4 and pos + 12 <= len(head):
            fact_at = pos + 8
            fields[fact_at] = struct.unpack_from("<I", head, fact_at)[0]
        pos += 8 + chunk_size + (chunk_size & 1)
    else:
        raise CaptureFormatError(f"{path}: no WAV data chunk")
    if fmt is None:
        raise CaptureFormatError(f"{path}: WAV data before its fmt chunk")
    tag, channels, rate, bits = fmt
    if tag not in (WAVE_FORMAT_MULAW, WAVE_FORMAT_ALAW) or bits != 8:
        raise CaptureFormatError(f"{path}: not G.711 (format tag {tag}, {bits} bits)")
    if not 1 <= channels <= 2 or rate <= 0:
        raise CaptureFormatError(f"{path}: unsupported {channels} channels at {rate} Hz")
    fields[pos + 4] = chunk_size
    offset = pos + 8
    # Our captures end with the data chunk, so it runs to end of file whatever its size field
    # says (zero, stale or garbage after a crash); a partial last sample frame is dropped.
    data_size = max(0, size - offset)
    data_size -= data_size % channels
    return _WavLayout(WavInfo(tag, channels, rate, offset, data_size), fact_at, pos + 4, fields)


# ---- IVF: VP8 frames -------------------------------------------------------------------------

IVF_TIMEBASE = 90000  # the RTP video clock, so pts need no conversion
_IVF_HEADER = struct.Struct("<4sHH4sHHIII4x")  # DKIF, version, header size, fourcc, w, h,
_IVF_FRAME = struct.Struct("<IQ")  # rate (timebase denominator), scale (numerator), frames
IVF_HEADER_LEN = _IVF_HEADER.size  # 32
MAX_FRAME = 16 << 20  # a larger frame size field is corruption, not video
_ZERO_TAIL_MAX = 4 << 20  # how much zero-filled tail repair may cut


@dataclass(frozen=True)
class IvfHeader:
    fourcc: bytes
    width: int
    height: int
    rate: int  # timebase = scale / rate seconds
    scale: int
    frame_count: int


@dataclass(frozen=True)
class IvfFrame:
    pts: int
    data: bytes

    @property
    def keyframe(self) -> bool:
        return vp8_is_keyframe(self.data)


class IvfWriter(_CaptureFile):
    """An incrementally written IVF file of VP8 frames, timebase 1/90000."""

    def __init__(self, path: Path, width: int = 0, height: int = 0) -> None:
        self.width, self.height = width, height
        self.frame_count = 0
        super().__init__(path, self._header())

    def set_size(self, width: int, height: int) -> None:
        """Frame size for the header (written at flush/close); the first key frame sets it
        anyway if it was not given."""
        self.width, self.height = width, height

    def write_frame(self, frame: bytes, pts: int) -> None:
        """Append one whole VP8 frame; pts in 1/90000 s on the call's common clock."""
        if not frame:
            raise ValueError("empty VP8 frame")
        if pts < 0:
            raise ValueError("pts must be >= 0 (0 is the recording's start)")
        if not self.width and (size := vp8_keyframe_size(frame)):
            self.width, self.height = size
        # One write per frame, header included, so a kill rarely splits a frame header.
        _write_all(self._require_open(), _IVF_FRAME.pack(len(frame), pts) + frame)
        self.frame_count += 1

    def _rewrite_header(self, fd: int) -> None:
        os.pwrite(fd, self._header(), 0)

    def _header(self) -> bytes:
        return _IVF_HEADER.pack(b"DKIF", 0, IVF_HEADER_LEN, b"VP80", self.width, self.height,
                                IVF_TIMEBASE, 1, min(_U32_MAX, self.frame_count))


def read_ivf_header(path: Path) -> IvfHeader:
    with open(path, "rb") as f:
        return _parse_ivf_header(f.read(IVF_HEADER_LEN), path)


def iter_ivf_frames(path: Path) -> Iterator[IvfFrame]:
    """Every whole frame; a partial trailing frame (a crash mid-write) is skipped."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _parse_ivf_header(f.read(IVF_HEADER_LEN), path)
        pos = IVF_HEADER_LEN
        while True:
            frame_size, pts, end = _next_ivf_frame(f, pos, size, path)
            if end is None:
                return
            data = f.read(frame_size)
            yield IvfFrame(pts, data)
            pos = end


def repair_ivf(path: Path) -> IvfHeader:
    """Drop a partial trailing frame and fix the frame count (and the size from the first key
    frame if the header has none). Idempotent; a healthy file is untouched."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(IVF_HEADER_LEN)
        if size < IVF_HEADER_LEN:
            if head[:4] != b"DKIF"[: len(head)]:
                raise CaptureFormatError(f"{path} is not an IVF file")
            header = IvfHeader(b"VP80", 0, 0, IVF_TIMEBASE, 1, 0)  # killed while creating it
        else:
            header = _parse_ivf_header(head, path)
        count, pos, width, height = 0, IVF_HEADER_LEN, header.width, header.height
        while True:
            frame_size, _, end = _next_ivf_frame(f, pos, size, path)
            if end is None:
                break
            if not width:
                f.seek(pos + _IVF_FRAME.size)
                if found := vp8_keyframe_size(f.read(min(frame_size, 16))):
                    width, height = found
            count, pos = count + 1, end
        fixed = IvfHeader(header.fourcc, width, height, header.rate, header.scale, count)
        if pos != size:
            f.truncate(pos)
        if fixed != header or size < IVF_HEADER_LEN:
            f.seek(0)
            f.write(_IVF_HEADER.pack(b"DKIF", 0, IVF_HEADER_LEN, fixed.fourcc, width, height,
                                     fixed.rate, fixed.scale, count))
        f.flush()
        os.fsync(f.fileno())
    return fixed


def _parse_ivf_header(raw: bytes, path: Path) -> IvfHeader:
    if len(raw) < IVF_HEADER_LEN or raw[:4] != b"DKIF":
        raise CaptureFormatError(f"{path} is not an IVF file")
    _, _, header_len, fourcc, width, height, rate, scale, count = _IVF_HEADER.unpack(raw)
    if header_len != IVF_HEADER_LEN or fourcc != b"VP80" or rate == 0 or scale == 0:
        raise CaptureFormatError(f"{path}: unsupported IVF ({fourcc!r}, timebase {scale}/{rate})")
    return IvfHeader(fourcc, width, height, rate, scale, count)


def _next_ivf_frame(f: BinaryIO, pos: int, size: int,
                    path: Path) -> tuple[int, int, int | None]:
    """(frame size, pts, end offset) of the frame at `pos`; end None at the (cut) end."""
    f.seek(pos)
    raw = f.read(_IVF_FRAME.size)
    if len(raw) < _IVF_FRAME.size:
        return 0, 0, None  # end of file, or a frame header cut short
    frame_size, pts = _IVF_FRAME.unpack(raw)
    if not 0 < frame_size <= MAX_FRAME:
        # A zero-filled tail is what a power cut can leave after delayed allocation: treat it
        # as the end. Anything else is real damage an operator must look at: refuse it.
        if size - pos <= _ZERO_TAIL_MAX and not (raw + f.read()).strip(b"\x00"):
            return 0, 0, None
        raise CaptureFormatError(f"{path}: corrupt frame header at offset {pos}")
    end = pos + _IVF_FRAME.size + frame_size
    return (frame_size, pts, end) if end <= size else (0, 0, None)


# ---- VP8 RTP depacketizer (RFC 7741) -------------------------------------------------------

@dataclass(frozen=True)
class Vp8Frame:
    data: bytes
    timestamp: int  # the RTP timestamp (90 kHz) of the frame's packets
    keyframe: bool


class Vp8Depacketizer:
    """VP8 RTP payloads in, whole VP8 frames out; pure (no decoding, no I/O).

    Feed packets in sequence-number order (after any jitter buffer); duplicates and late
    packets are ignored. A frame is emitted on its marker bit, or when the timestamp changes
    with no packet lost. A frame with a sequence gap or without its first partition start is
    dropped, and with `wait_for_keyframe` (the default) so are the inter frames after it, up to
    the next key frame: they would only decode into garbage. `keyframe_needed` says when a PLI
    to the sender would help.
    """

    def __init__(self, wait_for_keyframe: bool = True) -> None:
        self.wait_for_keyframe = wait_for_keyframe
        self.frames_dropped = 0
        self._waiting = wait_for_keyframe
        self._last_seq: int | None = None
        self._active = False
        self._ok = False
        self._ts = 0
        self._parts: list[bytes] = []

    @property
    def keyframe_needed(self) -> bool:
        return self._waiting

    def push(self, payload: bytes, marker: bool, timestamp: int, seq: int) -> list[Vp8Frame]:
        out: list[Vp8Frame] = []
        gap = False
        if self._last_seq is not None:
            delta = (seq - self._last_seq) & 0xFFFF
            if delta == 0 or delta >= 0x8000:
                return out  # duplicate, or older than what we already have
            gap = delta != 1
        self._last_seq = seq
        if self._active and timestamp != self._ts:
            # The previous frame ended without a marker: whole only if nothing was lost since.
            self._finish(out, complete=not gap)
        elif self._active and gap:
            self._ok = False  # a hole inside this frame
        parsed = _vp8_descriptor(payload)
        if not self._active:
            self._active, self._ts, self._parts = True, timestamp, []
            self._ok = parsed is not None and parsed[0] and parsed[1] == 0
        elif parsed is None:
            self._ok = False
        if parsed is not None and self._ok:
            self._parts.append(parsed[2])
        if marker:
            self._finish(out, complete=True)
        return out

    def _finish(self, out: list[Vp8Frame], complete: bool) -> None:
        data, ok = b"".join(self._parts), self._ok and complete
        self._active, self._parts = False, []
        if not ok or not data:
            self.frames_dropped += 1
            self._waiting = self.wait_for_keyframe
            return
        keyframe = vp8_is_keyframe(data)
        if self._waiting and not keyframe:
            self.frames_dropped += 1
            return
        self._waiting = False
        out.append(Vp8Frame(data, self._ts, keyframe))


def _vp8_descriptor(payload: bytes) -> tuple[bool, int, bytes] | None:
    """(start of partition, partition index, VP8 payload) or None if malformed."""
    parsed = vp8.descriptor(payload)
    if parsed is None:
        return None
    start, partition, offset = parsed
    return start, partition, payload[offset:]


class RtpTimestampUnwrapper:
    """32-bit RTP timestamps -> a monotonic-ish 64-bit count (handles wrap-around)."""

    def __init__(self) -> None:
        self._last: int | None = None
        self._value = 0

    def unwrap(self, timestamp: int) -> int:
        if self._last is None:
            self._value = timestamp
        else:
            delta = (timestamp - self._last) & 0xFFFFFFFF
            self._value += delta - (1 << 32) if delta >= 1 << 31 else delta
        self._last = timestamp
        return self._value


# ---- the job file ----------------------------------------------------------------------------

JobStatus = Literal["recording", "ended", "converted"]


class JobError(Exception):
    """A job file that cannot be read or written."""


class VideoFiles(msgspec.Struct):
    user: str | None = None  # the customer's camera
    agent: str | None = None  # the agent's PC camera


class Job(msgspec.Struct, kw_only=True):
    version: int = 1
    roomkey: int
    appliance_id: str
    dialogid: int
    ref: int
    channel: int
    started_at: float
    ended_at: float | None = None
    audio: str | None = None  # relative to the recording directory
    video: VideoFiles = msgspec.field(default_factory=VideoFiles)
    status: JobStatus = "recording"
    record_file: str | None = None
    attempts: int = 0
    last_error: str | None = None

    @property
    def base(self) -> str:
        return base_name(self.dialogid, self.ref, self.channel)


def new_job(*, roomkey: int, appliance_id: str, dialogid: int, ref: int, channel: int,
            started_at: float, audio: bool = True, video_user: bool = False,
            video_agent: bool = False) -> tuple[Job, CapturePaths]:
    """A "recording" job naming the standard capture paths the call will write."""
    paths = capture_paths(dialogid, ref, channel, started_at)
    job = Job(roomkey=roomkey, appliance_id=appliance_id, dialogid=dialogid, ref=ref,
              channel=channel, started_at=started_at, audio=paths.audio if audio else None,
              video=VideoFiles(paths.video_user if video_user else None,
                               paths.video_agent if video_agent else None))
    return job, paths


def load_job(path: Path) -> Job:
    try:
        job = msgspec.json.decode(path.read_bytes(), type=Job)
    except OSError as exc:
        raise JobError(f"cannot read job {path}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise JobError(f"invalid job {path}: {exc}") from None
    if job.version != 1:
        raise JobError(f"job {path}: unsupported version {job.version}")
    return job


def save_job(path: Path, job: Job) -> None:
    """Write atomically: readers see the old job or the new one, never half of one."""
    makedirs_private(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = create_private(tmp)
    try:
        _write_all(fd, msgspec.json.format(msgspec.json.encode(job)) + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

