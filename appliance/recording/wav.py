"""The audio capture: a G.711 WAV (stereo µ-law: left = customer, right = the agent's desk
phone), written as the call runs, and read and repaired by the Convertor.

Layout: docs/recording-format.md, "Audio: WAV, G.711 µ-law, stereo".
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.recording.capture_files import U32_MAX, CaptureFile, CaptureFormatError, write_all

WAVE_FORMAT_ALAW = 6
WAVE_FORMAT_MULAW = 7
# RIFF header, an 18-byte fmt chunk (cbSize = 0, as non-PCM formats require), a fact chunk
# (sample frames, also required for non-PCM), then the data chunk, which runs to end of file.
_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHHH4sII4sI")
WAV_DATA_OFFSET = _WAV_HEADER.size  # 58
_RIFF_SIZE_AT, _FACT_AT = 4, 46  # where the RIFF size and the fact..data sizes live


def interleave(left: bytes, right: bytes, silence: int = 0xFF) -> bytes:
    """Two mono G.711 streams -> stereo sample frames; the shorter is padded with silence
    (0xFF is µ-law silence; pass 0xD5 for A-law)."""
    n = max(len(left), len(right))
    out = bytearray([silence]) * (2 * n)
    out[0 : 2 * len(left) : 2] = left
    out[1 : 2 * len(right) : 2] = right
    return bytes(out)


def _wav_header(data_size: int, channels: int, rate: int, tag: int) -> bytes:
    riff = min(U32_MAX, WAV_DATA_OFFSET - 8 + data_size)
    return _WAV_HEADER.pack(b"RIFF", riff, b"WAVE", b"fmt ", 18, tag, channels, rate,
                            rate * channels, channels, 8, 0, b"fact", 4,
                            min(U32_MAX, data_size // channels), b"data",
                            min(U32_MAX, data_size))


class WavWriter(CaptureFile):
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
        write_all(self._require_open(), interleaved)
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
    riff = min(U32_MAX, info.data_offset + info.data_size - 8)
    return riff, min(U32_MAX, info.data_size // info.channels), min(U32_MAX, info.data_size)


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


