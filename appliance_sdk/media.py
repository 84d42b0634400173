"""Cheap local media sources and a sink for the SDK's calls.

The sources produce a known pattern (a 1 kHz tone, moving colour bars) so a test can tell
real media from silence, while costing almost no CPU: every frame's bytes are computed once
at start-up and only sliced afterwards. numpy is not a dependency, so samples and pixels are
built with `array` and plain bytes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fractions
import logging
import math
import time
from collections.abc import Callable

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame
from av.frame import Frame

log = logging.getLogger("appliance.client.media")

AUDIO_RATE = 8000  # PCMU's own rate: no resampling for the default codec
AUDIO_PTIME = 0.020
TONE_HZ = 1000
TONE_AMPLITUDE = 8000  # about -12 dBFS: clearly audible, far from clipping

VIDEO_WIDTH = 320
VIDEO_HEIGHT = 240
VIDEO_FPS = 15
VIDEO_CLOCK_RATE = 90000

# Y, U, V of the classic 75% colour bars (white, yellow, cyan, green, magenta, red, blue, black).
_BARS_YUV = (
    (180, 128, 128),
    (162, 44, 142),
    (131, 156, 44),
    (112, 72, 58),
    (84, 184, 198),
    (65, 100, 212),
    (35, 212, 114),
    (16, 128, 128),
)


class _Clock:
    """Paces frames on the monotonic clock, like aiortc's dummy tracks do on wall time."""

    def __init__(self, step: int, rate: int) -> None:
        self._step = step
        self._rate = rate
        self._start: float | None = None
        self.pts = 0

    async def tick(self) -> int:
        if self._start is None:
            self._start = time.monotonic()
            return 0
        self.pts += self._step
        wait = self._start + self.pts / self._rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        return self.pts


class ToneAudioTrack(MediaStreamTrack):
    """Mono s16 tone (1 kHz) at 8 kHz in 20 ms frames; aiortc encodes it to PCMU or Opus."""

    kind = "audio"

    def __init__(self, frequency: int = TONE_HZ, sample_rate: int = AUDIO_RATE) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.samples = int(AUDIO_PTIME * sample_rate)
        self._clock = _Clock(self.samples, sample_rate)
        self._time_base = fractions.Fraction(1, sample_rate)
        # One period is sample_rate / frequency samples; precompute one whole second so any
        # frequency, not only divisors of the frame length, loops without a click.
        pcm = array.array(
            "h",
            (
                int(TONE_AMPLITUDE * math.sin(2 * math.pi * frequency * n / sample_rate))
                for n in range(sample_rate)
            ),
        )
        self._pcm = pcm.tobytes()
        self._offset = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self._clock.tick()
        frame = AudioFrame(format="s16", layout="mono", samples=self.samples)
        size = self.samples * 2
        chunk = self._pcm[self._offset : self._offset + size]
        if len(chunk) < size:  # wrap around the one-second table
            chunk += self._pcm[: size - len(chunk)]
        self._offset = (self._offset + size) % len(self._pcm)
        plane = frame.planes[0]
        plane.update(chunk.ljust(plane.buffer_size, b"\0"))
        frame.pts = pts
        frame.sample_rate = self.sample_rate
        frame.time_base = self._time_base
        return frame


class ColorBarsVideoTrack(MediaStreamTrack):
    """320x240 yuv420p colour bars scrolling 4 pixels per frame, 15 fps.

    The scrolling keeps the encoder producing real (non-empty) inter frames, so a receiver
    sees a steady packet flow, yet each frame is just a rotation of precomputed rows.
    """

    kind = "video"

    def __init__(
        self, width: int = VIDEO_WIDTH, height: int = VIDEO_HEIGHT, fps: int = VIDEO_FPS
    ) -> None:
        super().__init__()
        self.width = width
        self.height = height
        self._clock = _Clock(VIDEO_CLOCK_RATE // fps, VIDEO_CLOCK_RATE)
        self._time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        probe = VideoFrame(width=width, height=height, format="yuv420p")
        # Per plane: one row of bars stored twice, so any scrolled row is a single slice.
        self._planes: list[tuple[bytes, int, int, int]] = []
        for index, plane in enumerate(probe.planes):
            row = bytes(
                _BARS_YUV[x * len(_BARS_YUV) // plane.width][index] for x in range(plane.width)
            )
            self._planes.append((row * 2, plane.width, plane.line_size, plane.height))
        self._frame_no = 0

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self._clock.tick()
        frame = VideoFrame(width=self.width, height=self.height, format="yuv420p")
        for (doubled, width, line_size, rows), plane in zip(
            self._planes, frame.planes, strict=True
        ):
            # 4 luma pixels per frame; chroma planes are half as wide, so half the step.
            shift = (self._frame_no * 4 * width // self.width) % width
            row = doubled[shift : shift + width].ljust(line_size, b"\0")
            plane.update((row * rows).ljust(plane.buffer_size, b"\0"))
        self._frame_no += 1
        frame.pts = pts
        frame.time_base = self._time_base
        return frame


class FrameCounter:
    """Drains a remote track (aiortc queues decoded frames without bound otherwise).

    Counts frames so a caller or a test can see media arriving.
    """

    def __init__(
        self, track: MediaStreamTrack, observers: list[Callable[[Frame], None]] | None = None
    ) -> None:
        self.track = track
        self.kind = track.kind
        self.frames = 0
        self.last_at: float | None = None
        # Called with every decoded frame (tests measure what they hear through these).
        self.observers = observers if observers is not None else []
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                self.frames += 1
                self.last_at = time.monotonic()
                for observe in self.observers:
                    observe(frame)
        except MediaStreamError:
            pass  # the track ended: the call closed
        except asyncio.CancelledError:
            raise
        except Exception:  # a decoder hiccup must not go unnoticed, nor crash the loop
            log.exception("remote %s track failed", self.kind)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
