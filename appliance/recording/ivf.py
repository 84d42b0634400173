"""The video captures: one IVF file of VP8 frames per camera, timebase 1/90000 (the RTP video
clock), pts on the call's common clock; written as the call runs, read and repaired by the
Convertor.

Layout: docs/recording-format.md, "Video: IVF, VP8".
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.media.vp8 import frame_is_keyframe, frame_keyframe_size
from appliance.recording.capture_files import U32_MAX, CaptureFile, CaptureFormatError, write_all

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
        return frame_is_keyframe(self.data)


class IvfWriter(CaptureFile):
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
        if not self.width and (size := frame_keyframe_size(frame)):
            self.width, self.height = size
        # One write per frame, header included, so a kill rarely splits a frame header.
        write_all(self._require_open(), _IVF_FRAME.pack(len(frame), pts) + frame)
        self.frame_count += 1

    def _rewrite_header(self, fd: int) -> None:
        os.pwrite(fd, self._header(), 0)

    def _header(self) -> bytes:
        return _IVF_HEADER.pack(b"DKIF", 0, IVF_HEADER_LEN, b"VP80", self.width, self.height,
                                IVF_TIMEBASE, 1, min(U32_MAX, self.frame_count))


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
                if found := frame_keyframe_size(f.read(min(frame_size, 16))):
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

