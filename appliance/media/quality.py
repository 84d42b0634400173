"""Call quality from the packets the appliance forwards, never from decoding them.

A `StreamMeter` sits on one incoming stream: bytes (bitrate), RTP sequence numbers (loss),
RFC 3550 interarrival jitter, frame boundaries (marker bit: frame rate) and, for VP8, the
picture size written in every keyframe's header. `Quality.figures()` turns a party's audio
and video meters into the protocol's `my_resolution` / `peer_resolution` fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance.media.rtp import ReceiveStats, RtpHeader
from appliance.media.vp8 import payload_keyframe_size as vp8_keyframe_size


class StreamMeter:
    __slots__ = ("_window_bytes", "_window_frames", "_window_start", "height", "is_vp8",
                 "keyframes", "rtp", "width")

    def __init__(self, clock_rate: int, is_vp8: bool = False) -> None:
        self.rtp = ReceiveStats(clock_rate)
        self.is_vp8 = is_vp8
        self.width = 0
        self.height = 0
        self.keyframes = 0
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._window_frames = 0

    def packet(self, header: RtpHeader, packet: bytes, arrival: float) -> bool:
        """Account for one packet; True when it starts a VP8 keyframe."""
        size = len(packet)
        self.rtp.update(header, size, arrival)
        self._window_bytes += size
        if header.marker:
            self._window_frames += 1
        if self.is_vp8:
            offset = header.payload_offset
            size_wh = vp8_keyframe_size(packet[offset : offset + 16]) if (
                len(packet) > offset and packet[offset] & 0x17 == 0x10) else None
            if size_wh is not None:
                self.keyframes += 1
                self.width, self.height = size_wh
                return True
        return False

    def window(self, now: float | None = None) -> tuple[float, float]:
        """(kbit/s, frames/s) since the previous call; starts a new window."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._window_start, 1e-3)
        kbps = self._window_bytes * 8 / elapsed / 1000
        fps = self._window_frames / elapsed
        self._window_start = now
        self._window_bytes = 0
        self._window_frames = 0
        return kbps, fps


@dataclass
class Figures:
    width: int = 0
    height: int = 0
    REMB: int = 0
    framerate: int = 0
    audio_bitrate: int = 0
    video_bitrate: int = 0
    jitter: int = 0
    packetloss: int = 0


class PartyQuality:
    """One party's streams as the appliance receives them, plus the REMB its receiver sent."""

    def __init__(self, audio: StreamMeter | None, video: StreamMeter | None) -> None:
        self.audio = audio
        self.video = video
        self.remb_bps = 0
        self.last: Figures = Figures()

    def sample(self) -> Figures:
        """Figures for the last window (call once per reporting period)."""
        figures = Figures(REMB=self.remb_bps // 1000)
        if self.audio is not None:
            kbps, _ = self.audio.window()
            figures.audio_bitrate = round(kbps)
            figures.jitter = round(self.audio.rtp.jitter_ms)
            figures.packetloss += self.audio.rtp.lost
        if self.video is not None:
            kbps, fps = self.video.window()
            figures.video_bitrate = round(kbps)
            figures.framerate = round(fps)
            figures.width, figures.height = self.video.width, self.video.height
            figures.packetloss += self.video.rtp.lost
        self.last = figures
        return figures
