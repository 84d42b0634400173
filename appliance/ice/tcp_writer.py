"""The bounded send side of one ICE-TCP connection: a worker never waits for a slow reader.

A worker relays every call on one event loop; a browser on a congested link (or one that
stops reading on purpose) must cost its own call some frames, never the others their
latency, nor the worker its memory. `SendBuffer` (sans-IO) holds RFC 4571-framed bytes up
to a byte limit and drops a WHOLE frame that does not fit (a partial frame would put the
peer's decoder out of step for good), counting what it drops. `FramedWriter` is the edge:
it hands the buffer to an asyncio transport while the transport accepts, and holds it
while the transport has said pause_writing(); the connection's protocol forwards its
pause_writing/resume_writing calls to it. Dropping whole frames is what TCP media wants:
SRTP has its own loss recovery (NACK, keyframe requests), and late media is useless.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from appliance.ice.framing import HEADER_BYTES, MAX_FRAME, encode

DEFAULT_LIMIT = 256 * 1024  # about a second of a call's video at 2 Mbit/s
MIN_LIMIT = HEADER_BYTES + MAX_FRAME  # so any one frame fits into an empty buffer
MAX_LIMIT = 16 * 1024 * 1024
# How much of the buffer one transport.write gets: writes stay cheap, and the transport's
# own buffer (bounded by its high-water mark) stays small beside ours.
WRITE_CHUNK = 64 * 1024


@dataclass
class SendCounters:
    frames_accepted: int = 0  # offered and queued (each goes out whole unless the line dies)
    frames_sent: int = 0  # of which every byte has been taken for the socket
    frames_dropped: int = 0  # refused whole: no room, or over RFC 4571's 65535 bytes
    bytes_accepted: int = 0  # framed bytes queued (LENGTH headers included)
    bytes_sent: int = 0  # framed bytes taken for the socket
    bytes_dropped: int = 0  # payload bytes of the dropped frames


class SendBuffer:
    """Framed bytes waiting for the socket, at most `limit` of them."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if not MIN_LIMIT <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be {MIN_LIMIT}..{MAX_LIMIT} bytes")
        self.limit = limit
        self.counters = SendCounters()
        self._frames: deque[bytes] = deque()  # framed, oldest first
        self._head_taken = 0  # bytes of _frames[0] already taken
        self._pending = 0  # bytes in _frames not yet taken

    @property
    def pending(self) -> int:
        """Bytes queued and not yet taken."""
        return self._pending

    def offer(self, frame: bytes | bytearray | memoryview) -> bool:
        """Queue `frame` (framed) if it fits under the limit; else drop all of it."""
        size = HEADER_BYTES + len(frame)
        c = self.counters
        if len(frame) > MAX_FRAME or self._pending + size > self.limit:
            c.frames_dropped += 1
            c.bytes_dropped += len(frame)
            return False
        self._frames.append(encode(frame))
        self._pending += size
        c.frames_accepted += 1
        c.bytes_accepted += size
        return True

    def take(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of the queue, oldest first, for the socket to write now.
        The cut may fall inside a frame: the rest follows on the next take."""
        if max_bytes <= 0 or not self._frames:
            return b""
        parts: list[bytes] = []
        room = max_bytes
        frames = self._frames
        while frames and room:
            head = frames[0]
            left = len(head) - self._head_taken
            if left <= room:
                parts.append(head[self._head_taken:] if self._head_taken else head)
                frames.popleft()
                self._head_taken = 0
                self.counters.frames_sent += 1
                room -= left
            else:
                parts.append(head[self._head_taken:self._head_taken + room])
                self._head_taken += room
                room = 0
        out = b"".join(parts)
        self._pending -= len(out)
        self.counters.bytes_sent += len(out)
        return out

    def clear(self) -> int:
        """Forget what is queued (the connection is gone); returns how many bytes."""
        dropped = self._pending
        self._frames.clear()
        self._head_taken = 0
        self._pending = 0
        return dropped


class WriteTransport(Protocol):
    """What FramedWriter needs of an asyncio.Transport (any stream transport has it)."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        ...


class FramedWriter:
    """Frames onto a stream transport through a SendBuffer; `send` never blocks or raises.

    The transport's high-water mark is set to WRITE_CHUNK, so its own buffer stays under
    2 * WRITE_CHUNK: past the mark it calls the protocol's pause_writing(), which must call
    ours; frames then wait in the SendBuffer (dropped whole when it is full) until
    resume_writing(). Memory per connection: `limit` + 2 * WRITE_CHUNK + the kernel's.
    """

    def __init__(self, transport: WriteTransport, limit: int = DEFAULT_LIMIT) -> None:
        self._transport = transport
        self.buffer = SendBuffer(limit)
        self._paused = False
        transport.set_write_buffer_limits(high=WRITE_CHUNK, low=WRITE_CHUNK // 4)

    @property
    def paused(self) -> bool:
        return self._paused

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Queue one frame and write what the transport will take; False: dropped."""
        if self._transport.is_closing():
            c = self.buffer.counters
            c.frames_dropped += 1
            c.bytes_dropped += len(frame)
            return False
        accepted = self.buffer.offer(frame)
        if accepted and not self._paused:
            self._flush()
        return accepted

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._flush()

    def connection_lost(self) -> None:
        """The transport is gone: what is queued will never be sent."""
        self.buffer.clear()

    def _flush(self) -> None:
        # transport.write may call pause_writing() before it returns: the loop stops there.
        while not self._paused and self.buffer.pending and not self._transport.is_closing():
            self._transport.write(self.buffer.take(WRITE_CHUNK))
