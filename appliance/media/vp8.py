"""VP8 at the byte level (RFC 7741 payload descriptor, RFC 6386 frame header), for the
relay's quality taps and the recorder: reading sizes and keyframe flags, never decoding."""

from __future__ import annotations

import struct

_START_CODE = b"\x9d\x01\x2a"


def descriptor(payload: bytes) -> tuple[bool, int, int] | None:
    """(start of partition, partition index, offset of the VP8 data) of an RTP payload, or
    None if the descriptor is malformed (RFC 7741 4.2)."""
    if not payload:
        return None
    first, i = payload[0], 1
    if first & 0x80:  # X: extension byte follows
        if len(payload) < 2:
            return None
        ext, i = payload[1], 2
        if ext & 0x80:  # I: picture ID, 7 or 15 bits (M)
            if len(payload) <= i:
                return None
            i += 2 if payload[i] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            i += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX
            i += 1
    if i >= len(payload):
        return None
    return bool(first & 0x10), first & 0x07, i


def frame_is_keyframe(frame: bytes) -> bool:
    """RFC 6386 9.1: bit 0 of the frame tag is 0 on a key frame."""
    return bool(frame) and not frame[0] & 1


def frame_keyframe_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a VP8 key frame's header, None for an inter frame."""
    if len(frame) < 10 or not frame_is_keyframe(frame) or frame[3:6] != _START_CODE:
        return None
    width, height = struct.unpack_from("<HH", frame, 6)
    return width & 0x3FFF, height & 0x3FFF  # the top 2 bits are an upscaling hint


def payload_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) if this RTP payload starts a VP8 key frame."""
    # Per packet on the relay: most packets are not the start of partition 0; say so early.
    if not payload or payload[0] & 0x17 != 0x10:
        return None
    parsed = descriptor(payload)
    if parsed is None:
        return None
    return frame_keyframe_size(payload[parsed[2] : parsed[2] + 10])
