"""A caller's audio that can be recognised after a trip through PCMU and back.

Each 20 ms frame carries its own sequence number in the signs of its first 16 samples
(G.711 keeps signs), so the far end of an echo path can tell which frame came back, when,
and which never did: packet counts, loss and round trip, measured on real decoded audio.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from dataclasses import dataclass, field

from aiortc.mediastreams import MediaStreamTrack
from av import AudioFrame

RATE = 8000
SAMPLES = 160
BITS = 16
LEVEL = 12000


class TaggedAudioTrack(MediaStreamTrack):
    """20 ms frames at 8 kHz; frame n has n in the signs of samples 0..15."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.sent_at: dict[int, float] = {}
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._n * SAMPLES / RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        n = self._n & 0xFFFF
        samples = [(LEVEL if (n >> bit) & 1 else -LEVEL) for bit in range(BITS)]
        # The rest is a quiet tone so the frame is not silence to a VAD.
        samples += [int(3000 * math.sin(2 * math.pi * 400 * i / RATE)) for i in
                    range(BITS, SAMPLES)]
        frame = AudioFrame(format="s16", layout="mono", samples=SAMPLES)
        frame.planes[0].update(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
        frame.sample_rate = RATE
        frame.pts = self._n * SAMPLES
        frame.time_base = fractions.Fraction(1, RATE)
        self.sent_at[n] = time.monotonic()
        self._n += 1
        return frame


@dataclass
class EchoReport:
    sent: int
    received: int
    lost: int
    loss_pct: float
    rtt_ms_median: float
    rtt_ms_p95: float


@dataclass
class TagReader:
    """Observes decoded audio frames (SDK `call.frame_observers["audio"]`): decodes tags
    and records arrival times, counts frames that carry sound."""

    arrivals: dict[int, float] = field(default_factory=dict)
    frames: int = 0
    loud_frames: int = 0

    def __call__(self, frame: AudioFrame) -> None:
        self.frames += 1
        raw = bytes(frame.planes[0])
        channels = len(frame.layout.channels)
        step = 2 * channels  # s16, interleaved: read the first channel
        samples = [int.from_bytes(raw[i:i + 2], "little", signed=True)
                   for i in range(0, len(raw) - 1, step)]
        if max((abs(s) for s in samples), default=0) > 1000:
            self.loud_frames += 1
        if frame.sample_rate == RATE and len(samples) >= BITS:
            tag = self._tag(samples[:BITS])
            if tag is not None and tag not in self.arrivals:
                self.arrivals[tag] = time.monotonic()

    @staticmethod
    def _tag(samples: list[int]) -> int | None:
        # Every tag sample is loud; a frame that is not ours (silence, ringback) is not.
        if min(abs(s) for s in samples) < LEVEL // 3:
            return None
        return sum(1 << bit for bit, s in enumerate(samples) if s > 0)

    def report(self, source: TaggedAudioTrack, settle: float = 0.5) -> EchoReport:
        cutoff = time.monotonic() - settle  # frames too recent to have come back yet
        sent = [n for n, at in source.sent_at.items() if at < cutoff]
        first = min(self.arrivals, default=None)
        # Count from the first frame that came back: before it the path was still ringing.
        counted = [n for n in sent if first is not None and n >= first]
        got = [n for n in counted if n in self.arrivals]
        rtts = sorted((self.arrivals[n] - source.sent_at[n]) * 1000 for n in got)
        lost = len(counted) - len(got)

        def pct(q: float) -> float:
            return rtts[min(len(rtts) - 1, int(q * len(rtts)))] if rtts else float("nan")

        return EchoReport(
            sent=len(counted),
            received=len(got),
            lost=lost,
            loss_pct=100.0 * lost / len(counted) if counted else 100.0,
            rtt_ms_median=pct(0.5),
            rtt_ms_p95=pct(0.95),
        )
