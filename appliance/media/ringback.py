"""The ringback tone the caller hears while the desk phone rings (180 without SDP).

One cadence cycle is rendered once per process as 20 ms PCMU payloads; playing it is
just handing out the next payload every 20 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from appliance.media import g711

FRAME_MS = 20
SAMPLES_PER_FRAME = 160  # 20 ms at 8 kHz


@dataclass(frozen=True)
class Cadence:
    frequencies: tuple[float, ...] = (440.0, 480.0)  # Taiwan / North America ringback
    on_ms: int = 1000
    off_ms: int = 2000


@lru_cache(maxsize=8)
def render(cadence: Cadence) -> tuple[bytes, ...]:
    """Every 20 ms PCMU payload of one on/off cycle."""
    frames: list[bytes] = []
    on_frames = cadence.on_ms // FRAME_MS
    for i in range(on_frames):
        frames.append(
            g711.tone(list(cadence.frequencies), FRAME_MS, start_sample=i * SAMPLES_PER_FRAME)
        )
    silence = bytes([g711.SILENCE]) * SAMPLES_PER_FRAME
    frames += [silence] * (cadence.off_ms // FRAME_MS)
    return tuple(frames)


class Ringback:
    """The next payload and its RTP timestamp, frame after frame."""

    __slots__ = ("_frames", "_index", "timestamp")

    def __init__(self, cadence: Cadence = Cadence()) -> None:
        self._frames = render(cadence)
        self._index = 0
        self.timestamp = 0

    def next_frame(self) -> tuple[int, bytes]:
        payload = self._frames[self._index]
        self._index = (self._index + 1) % len(self._frames)
        ts = self.timestamp
        self.timestamp = (self.timestamp + SAMPLES_PER_FRAME) & 0xFFFFFFFF
        return ts, payload
