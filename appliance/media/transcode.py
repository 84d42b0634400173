"""Opus <-> PCMU, only for a browser that insists on Opus (the desk phone speaks PCMU).

PCMU browsers never come here: their packets are relayed as they are. Each direction keeps
its own codec state; frames are re-cut to 20 ms on the way out.

Payloads come from the network: an empty one would be a flush for FFmpeg (the decoder then
refuses every later packet with EOF: the call's audio is gone), garbage is a decode error.
Both are dropped and counted; the stream goes on.
"""

from __future__ import annotations

import fractions

from av import AudioFrame, AudioResampler, CodecContext, Packet
from av.error import FFmpegError

OPUS_RATE = 48000
OPUS_FRAME = 960  # 20 ms
PCMU_RATE = 8000
PCMU_FRAME = 160  # 20 ms


class OpusToPcmu:
    """Browser Opus payloads in, 20 ms PCMU payloads out."""

    def __init__(self) -> None:
        self.bad_payloads = 0  # undecodable payloads dropped
        self._decoder = CodecContext.create("libopus", "r")
        self._decoder.format = "s16"
        self._decoder.layout = "stereo"
        self._decoder.sample_rate = OPUS_RATE
        self._resampler = AudioResampler(format="s16", layout="mono", rate=PCMU_RATE,
                                          frame_size=PCMU_FRAME)
        self._encoder = CodecContext.create("pcm_mulaw", "w")
        self._encoder.format = "s16"
        self._encoder.layout = "mono"
        self._encoder.sample_rate = PCMU_RATE
        self._encoder.time_base = fractions.Fraction(1, PCMU_RATE)

    def feed(self, payload: bytes) -> list[bytes]:
        if not payload:
            return []
        out: list[bytes] = []
        try:
            frames = self._decoder.decode(Packet(payload))
        except FFmpegError:
            self.bad_payloads += 1
            return out
        for frame in frames:
            for chunk in self._resampler.resample(frame):
                out += [bytes(p) for p in self._encoder.encode(chunk)]
        return out


class PcmuToOpus:
    """20 ms PCMU payloads in (phone, or ringback), 20 ms Opus payloads out."""

    def __init__(self) -> None:
        self.bad_payloads = 0
        self._decoder = CodecContext.create("pcm_mulaw", "r")
        self._decoder.layout = "mono"
        self._decoder.sample_rate = PCMU_RATE
        self._resampler = AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE,
                                          frame_size=OPUS_FRAME)
        self._encoder = CodecContext.create("libopus", "w")
        self._encoder.bit_rate = 32000
        self._encoder.format = "s16"
        self._encoder.layout = "stereo"
        self._encoder.sample_rate = OPUS_RATE
        self._encoder.time_base = fractions.Fraction(1, OPUS_RATE)
        self._encoder.options = {"application": "voip"}

    def feed(self, payload: bytes) -> list[bytes]:
        if not payload:
            return []
        out: list[bytes] = []
        try:
            frames = self._decoder.decode(Packet(payload))
        except FFmpegError:
            self.bad_payloads += 1
            return out
        for frame in frames:
            assert isinstance(frame, AudioFrame)
            for chunk in self._resampler.resample(frame):
                out += [bytes(p) for p in self._encoder.encode(chunk)]
        return out
