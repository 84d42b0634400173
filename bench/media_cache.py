"""Pre-encoded media for the load-test callers: made once, kept on disk, replayed forever.

A simulated caller must cost a fraction of what the appliance spends on the same call, or
the bench measures its own load generator. So nothing is encoded or decoded while a bench
runs: a 10 s loop of a moving 640x480 test pattern is encoded to VP8 once with PyAV
(libvpx), packetized per RFC 7741, and written under the cache directory; the PCMU voice is
one second of tone. Later runs (and the test) read the files back in milliseconds.
"""

from __future__ import annotations

import fractions
import hashlib
import json
import logging
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from appliance.media import g711

log = logging.getLogger("bench.media")

CACHE_FORMAT = 1
_MAGIC = b"BVP8"
_FRAME = struct.Struct("!BH")  # keyframe flag, packet count
_LEN = struct.Struct("!H")

# RFC 7741 4.2: the first byte of the VP8 payload descriptor. S marks the first packet of
# a frame (partition 0 starts there); PID stays 0 as we fragment the whole frame as one.
VP8_S_BIT = 0x10

AUDIO_PTIME_SAMPLES = 160  # 20 ms of PCMU at 8 kHz
AUDIO_PACKETS_PER_SECOND = 50


@dataclass(frozen=True)
class VideoParams:
    width: int = 640
    height: int = 480
    fps: int = 30
    seconds: int = 10
    bitrate: int = 800_000
    keyframe_interval: int = 90  # frames: a keyframe every 3 s
    fragment: int = 1100  # payload bytes per packet at most (RTP payload, descriptor excluded)

    def key(self) -> str:
        text = json.dumps({"format": CACHE_FORMAT, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class VideoFrame:
    """One encoded frame as the RTP payloads to send (descriptor included), in order."""

    payloads: tuple[bytes, ...]
    keyframe: bool


@dataclass(frozen=True)
class Vp8Clip:
    params: VideoParams
    frames: tuple[VideoFrame, ...]

    @property
    def keyframes(self) -> tuple[int, ...]:
        return tuple(i for i, f in enumerate(self.frames) if f.keyframe)

    @property
    def packets_per_second(self) -> float:
        return sum(len(f.payloads) for f in self.frames) / self.params.seconds

    @property
    def bitrate(self) -> float:
        return sum(len(p) for f in self.frames for p in f.payloads) * 8 / self.params.seconds


def packetize(frame: bytes, fragment: int) -> tuple[bytes, ...]:
    """RFC 7741: split one encoded frame into payloads of similar size, each with a 1-byte
    payload descriptor; S=1 on the first. Equal sizes rather than full-then-remainder keep
    every packet well under the MTU and the burst per frame even."""
    count = max(1, -(-len(frame) // fragment))
    size = -(-len(frame) // count)
    return tuple(
        bytes([VP8_S_BIT if i == 0 else 0]) + frame[i * size : (i + 1) * size]
        for i in range(count)
    )


def _pattern_frame(n: int, params: VideoParams, rng: random.Random) -> object:
    """Scrolling bars plus a moving block of noise: the noise keeps the encoder near its
    target bitrate (plain bars compress to almost nothing and would flatter the relay)."""
    import av

    frame = av.VideoFrame(width=params.width, height=params.height, format="yuv420p")
    for plane in frame.planes:
        w, h, stride = plane.width, plane.height, plane.line_size
        shift = n * 4 * w // params.width
        row = bytes(((x + shift) // max(1, w // 8)) * 30 % 256 for x in range(w))
        data = bytearray(row.ljust(stride, b"\0") * h)
        bw, bh = w // 6, h // 6
        x0 = (n * 3 * w // params.width) % (w - bw)
        y0 = (n * 2 * h // params.height) % (h - bh)
        for y in range(y0, y0 + bh):
            data[y * stride + x0 : y * stride + x0 + bw] = rng.randbytes(bw)
        plane.update(bytes(data))
    return frame


def encode_clip(params: VideoParams) -> Vp8Clip:
    """Encode the test pattern with libvpx (once; a few seconds of CPU)."""
    import av

    codec = av.CodecContext.create("libvpx", "w")
    codec.width = params.width
    codec.height = params.height
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = params.bitrate
    codec.framerate = fractions.Fraction(params.fps, 1)
    codec.time_base = fractions.Fraction(1, params.fps)
    codec.gop_size = params.keyframe_interval
    # realtime + no lag: what a browser's encoder does; keyint_min = gop keeps libvpx from
    # adding scene-cut keyframes, so keyframes come exactly every keyframe_interval frames.
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "8",
        "lag-in-frames": "0",
        "keyint_min": str(params.keyframe_interval),
    }
    rng = random.Random(7)
    encoded: list[tuple[bytes, bool]] = []
    for n in range(params.fps * params.seconds):
        frame = _pattern_frame(n, params, rng)
        frame.pts = n  # type: ignore[attr-defined]
        frame.time_base = codec.time_base  # type: ignore[attr-defined]
        encoded += [(bytes(p), bool(p.is_keyframe)) for p in codec.encode(frame)]  # type: ignore[arg-type]
    encoded += [(bytes(p), bool(p.is_keyframe)) for p in codec.encode(None)]
    if not encoded or not encoded[0][1]:
        raise RuntimeError("libvpx did not start the clip with a keyframe")
    frames = tuple(VideoFrame(packetize(data, params.fragment), key) for data, key in encoded)
    return Vp8Clip(params, frames)


def _write_clip(path: Path, clip: Vp8Clip) -> None:
    header = json.dumps({"format": CACHE_FORMAT, **clip.params.__dict__}).encode()
    out = bytearray(_MAGIC + _LEN.pack(len(header)) + header)
    for frame in clip.frames:
        out += _FRAME.pack(1 if frame.keyframe else 0, len(frame.payloads))
        for payload in frame.payloads:
            out += _LEN.pack(len(payload)) + payload
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(out))
    tmp.replace(path)  # atomic: two runs sharing a cache never read half a file


def _read_clip(path: Path, params: VideoParams) -> Vp8Clip:
    data = path.read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path}: not a bench VP8 cache file")
    (hlen,) = _LEN.unpack_from(data, 4)
    offset = 6 + hlen
    frames = []
    while offset < len(data):
        key, count = _FRAME.unpack_from(data, offset)
        offset += _FRAME.size
        payloads = []
        for _ in range(count):
            (size,) = _LEN.unpack_from(data, offset)
            offset += _LEN.size
            payloads.append(data[offset : offset + size])
            offset += size
        frames.append(VideoFrame(tuple(payloads), bool(key)))
    return Vp8Clip(params, tuple(frames))


def load_or_make_clip(cache_dir: Path, params: VideoParams | None = None) -> Vp8Clip:
    params = params or VideoParams()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"vp8-{params.width}x{params.height}-{params.key()}.bin"
    if path.exists():
        try:
            return _read_clip(path, params)
        except (ValueError, struct.error) as exc:  # a damaged cache is rebuilt, not fatal
            log.warning("rebuilding %s: %s", path, exc)
    log.info("encoding the VP8 test clip once (%s)", path)
    clip = encode_clip(params)
    _write_clip(path, clip)
    return clip


def load_or_make_pcmu(cache_dir: Path) -> tuple[bytes, ...]:
    """One second of a 1 kHz tone as 50 PCMU payloads of 20 ms."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"pcmu-1khz-1s-v{CACHE_FORMAT}.bin"
    size = AUDIO_PTIME_SAMPLES * AUDIO_PACKETS_PER_SECOND
    if not path.exists() or path.stat().st_size != size:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(g711.tone([1000.0], 1000))
        tmp.replace(path)
    data = path.read_bytes()
    return tuple(
        data[i : i + AUDIO_PTIME_SAMPLES] for i in range(0, len(data), AUDIO_PTIME_SAMPLES)
    )


OPUS_RATE = 48000
OPUS_FRAME = 960  # 20 ms at 48 kHz: what browsers send


def encode_opus_tone(seconds: int = 1, bitrate: int = 32000) -> tuple[bytes, ...]:
    """A 1 kHz tone as 20 ms Opus packets, encoded once with libopus."""
    import math

    import av

    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = OPUS_RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = bitrate
    codec.time_base = fractions.Fraction(1, OPUS_RATE)
    out: list[bytes] = []
    total = OPUS_RATE * seconds
    for start in range(0, total, OPUS_FRAME):
        pcm = struct.pack(f"<{OPUS_FRAME}h", *(
            int(8000 * math.sin(2 * math.pi * 1000 * n / OPUS_RATE))
            for n in range(start, start + OPUS_FRAME)))
        frame = av.AudioFrame(format="s16", layout="mono", samples=OPUS_FRAME)
        frame.planes[0].update(pcm)
        frame.sample_rate = OPUS_RATE
        frame.pts = start
        frame.time_base = codec.time_base
        out += [bytes(p) for p in codec.encode(frame)]
    out += [bytes(p) for p in codec.encode(None)]
    return tuple(out[: seconds * AUDIO_PACKETS_PER_SECOND])


def load_or_make_opus(cache_dir: Path) -> tuple[bytes, ...]:
    """One second of a 1 kHz tone as 50 Opus payloads of 20 ms (for `--audio OPUS`)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"opus-1khz-1s-v{CACHE_FORMAT}.bin"
    if path.exists():
        data = path.read_bytes()
        payloads, offset = [], 0
        while offset + _LEN.size <= len(data):
            (size,) = _LEN.unpack_from(data, offset)
            payloads.append(data[offset + _LEN.size : offset + _LEN.size + size])
            offset += _LEN.size + size
        if len(payloads) == AUDIO_PACKETS_PER_SECOND:
            return tuple(payloads)
    payloads = list(encode_opus_tone())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(_LEN.pack(len(p)) + p for p in payloads))
    tmp.replace(path)
    return tuple(payloads)
