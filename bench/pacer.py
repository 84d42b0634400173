"""Sending pre-encoded media for every simulated call of a process from one shared timer.

One task per packet (or per stream) would make the load generator's event loop the thing
being measured; a single loop tick every 10 ms that emits whatever is due for every stream
keeps the generator's cost per packet close to protect + sendto. Lateness is measured, so
a generator that cannot keep up says so instead of quietly sending less.
"""

from __future__ import annotations

import asyncio
import random
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from appliance import native
from bench.media_cache import VideoFrame

TICK = 0.010
# Further behind than this, a stream skips what it missed instead of sending a burst: a
# burst would be an artefact of the generator, not something a browser would send.
MAX_BEHIND = 0.2
KEYFRAME_JUMP_INTERVAL = 0.5  # the relay limits PLI to 1/s; this only guards a PLI storm
_HEADER = struct.Struct("!BBHII")

Send = Callable[[bytes], None]


class TxStream(ABC):
    """One outgoing RTP stream: its own SSRC, sequence and timestamp, paced by `due`."""

    __slots__ = ("due", "payload_type", "period", "send", "sent", "seq", "skipped", "ssrc",
                 "ts", "ts_step")

    def __init__(self, send: Send, ssrc: int, payload_type: int, period: float, ts_step: int,
                 start: float, rng: random.Random) -> None:
        self.send = send
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.period = period
        self.ts_step = ts_step
        self.due = start
        self.seq = rng.getrandbits(16)
        self.ts = rng.getrandbits(32)
        self.sent = 0
        self.skipped = 0  # periods dropped because the generator fell behind

    def emit(self, now: float) -> None:
        if now - self.due > MAX_BEHIND:
            missed = int((now - self.due) / self.period)
            self.skipped += missed
            self.due += missed * self.period
            self.ts = (self.ts + missed * self.ts_step) & 0xFFFFFFFF
            self._advance(missed)
        while self.due <= now:
            self._one()
            self.due += self.period
            self.ts = (self.ts + self.ts_step) & 0xFFFFFFFF

    def _advance(self, periods: int) -> None:  # noqa: B027 - a hook; most streams need none
        """Move the media position on by `periods` without sending (after a skip)."""

    @abstractmethod
    def _one(self) -> None:
        """Send the next packet(s) of this stream."""

    def _packet(self, marker: bool, payload: bytes) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        self.send(_HEADER.pack(0x80, (0x80 if marker else 0) | self.payload_type, self.seq,
                               self.ts, self.ssrc) + payload)
        self.sent += 1


class TxAudio(TxStream):
    """Voice, 20 ms per packet (PCMU or Opus), from a loop of cached payloads."""

    __slots__ = ("_index", "_payloads", "_started")

    def __init__(self, send: Send, ssrc: int, payload_type: int, payloads: Sequence[bytes],
                 ts_step: int, start: float, rng: random.Random) -> None:
        super().__init__(send, ssrc, payload_type, 0.020, ts_step, start, rng)
        self._payloads = payloads
        self._index = 0
        self._started = False

    def _advance(self, periods: int) -> None:
        self._index = (self._index + periods) % len(self._payloads)

    def _one(self) -> None:
        # RFC 3551: the marker bit flags the first packet of a talkspurt.
        self._packet(not self._started, self._payloads[self._index])
        self._started = True
        self._index = (self._index + 1) % len(self._payloads)


class TxVideo(TxStream):
    """VP8 at the clip's frame rate: every packet of a frame at its due time, the marker on
    the last. A PLI makes the next frame sent the next keyframe of the loop."""

    __slots__ = ("_frames", "_index", "_keyframes", "_last_jump", "keyframe_jumps")

    def __init__(self, send: Send, ssrc: int, payload_type: int, frames: Sequence[VideoFrame],
                 fps: int, start: float, rng: random.Random) -> None:
        super().__init__(send, ssrc, payload_type, 1 / fps, 90000 // fps, start, rng)
        self._frames = frames
        self._keyframes = [i for i, f in enumerate(frames) if f.keyframe]
        # Start on a random keyframe: the receiver can decode from the first frame, and
        # calls do not all send their (large) keyframes in the same tick.
        self._index = rng.choice(self._keyframes)
        self._last_jump = -KEYFRAME_JUMP_INTERVAL
        self.keyframe_jumps = 0

    def _advance(self, periods: int) -> None:
        self._index = (self._index + periods) % len(self._frames)

    def _one(self) -> None:
        payloads = self._frames[self._index].payloads
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            self._packet(i == last, payload)
        self._index = (self._index + 1) % len(self._frames)

    def keyframe_request(self, now: float) -> None:
        if self._frames[self._index].keyframe or now - self._last_jump < KEYFRAME_JUMP_INTERVAL:
            return
        self._last_jump = now
        self.keyframe_jumps += 1
        self._index = next((k for k in self._keyframes if k > self._index), self._keyframes[0])


class Pacer:
    """The one timer of a generator process: Python streams one by one, the native loop's
    (bench.native_leg: `Playout`) all in one C call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.streams: list[TxStream] = []
        self.playouts: list[Any] = []
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.lags_ms: list[float] = []  # how late each tick ran; reset by the reader

    def start(self) -> None:
        self._due = self._loop.time() + TICK
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def add(self, stream: Any) -> None:
        (self.streams if isinstance(stream, TxStream) else self.playouts).append(stream)

    def remove(self, stream: Any) -> None:
        for streams in (self.streams, self.playouts):
            if stream in streams:
                streams.remove(stream)

    @property
    def sending(self) -> int:
        return len(self.streams) + len(self.playouts)

    def _tick(self) -> None:
        now = self._loop.time()
        self.lags_ms.append((now - self._due) * 1000)
        for stream in self.streams:
            if stream.due <= now:
                stream.emit(now)
        if self.playouts:
            native.module().emit_all(self.playouts, now)
        self._due += TICK
        if self._due <= now:  # a tick that overran: re-anchor rather than fire back-to-back
            self._due = now + TICK
        self._handle = self._loop.call_at(self._due, self._tick)
