"""RTP packets of a VP8 stream reassembled into whole VP8 frames (RFC 7741), for the recorder;
reading the descriptor and the frame header is vp8.py's."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.media import vp8


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
        keyframe = vp8.frame_is_keyframe(data)
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

