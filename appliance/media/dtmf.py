"""RFC 4733 telephone-events: send a key as RTP events, recognise keys in received ones."""

from __future__ import annotations

import struct
from dataclasses import dataclass

EVENTS = "0123456789*#ABCD"
_EVENT = struct.Struct("!BBH")


def event_code(key: str) -> int:
    code = EVENTS.find(key.upper())
    if code < 0:
        raise ValueError(f"not a DTMF key: {key!r}")
    return code


@dataclass(frozen=True)
class EventPacket:
    """Payload of one telephone-event packet, and whether it starts the event."""

    payload: bytes
    first: bool


def key_packets(key: str, duration_ms: int = 160, volume: int = 10,
                packet_ms: int = 20, rate: int = 8000) -> list[EventPacket]:
    """The packets of one key press: updates every packet_ms with a growing duration (all
    with the event's start timestamp), then the end packet three times (RFC 4733 §2.5.1.4)."""
    code = event_code(key)
    step = rate * packet_ms // 1000
    total = max(step, rate * duration_ms // 1000)
    packets = []
    duration = step
    while duration < total:
        packets.append(EventPacket(_EVENT.pack(code, volume & 0x3F, duration), not packets))
        duration += step
    end = _EVENT.pack(code, 0x80 | (volume & 0x3F), min(total, 0xFFFF))
    packets += [EventPacket(end, not packets)] + [EventPacket(end, False)] * 2
    return packets


class EventDetector:
    """Reports each key once, however many updates and end retransmissions arrive."""

    __slots__ = ("_last_timestamp",)

    def __init__(self) -> None:
        self._last_timestamp: int | None = None

    def feed(self, timestamp: int, payload: bytes) -> str | None:
        if len(payload) < 4:
            return None
        code, flags, _duration = _EVENT.unpack_from(payload)
        # One event = one RTP timestamp; report it at its first packet.
        if timestamp == self._last_timestamp or code >= len(EVENTS):
            return None
        self._last_timestamp = timestamp
        del flags
        return EVENTS[code]
