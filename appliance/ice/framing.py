"""RFC 4571 framing for ICE-TCP, sans-IO: the decoder of one TCP connection's byte stream
and the encoder.

RFC 6544 carries STUN, DTLS and SRTP/SRTCP over TCP in RFC 4571 frames: a 2-byte
big-endian LENGTH, then LENGTH bytes. A frame is opaque bytes here; what its first byte
says it holds is `demux.classify`'s (RFC 7983), for TCP frames and UDP datagrams alike,
and the STUN parser and the DTLS/SRTP layers check the rest.

Every byte comes from whoever connected to the worker's TCP port, so the decoder bounds
what it keeps across reads (`max_buffered`), and with `stun_first` refuses a connection
whose first frame is not a STUN Binding request: on a passive candidate the connecting
(active) side opens with its connectivity check, and anything else is a stranger (an
HTTP or TLS client, a scanner). That is decided from the first 10 bytes, not after
waiting for the up to 64 KiB its bogus LENGTH claims. `feed` raises only `FramingError`;
after one the stream is out of step for good and the connection must be closed.

Zero-length frames: RFC 4571 section 2 makes LENGTH the octet count of the packet that
follows and sets no minimum, so LENGTH 0 is a legal (empty) frame and the decoder returns
it as b"". No STUN message (20-byte header), DTLS record (13) or SRTP packet (12) is
empty, so `demux.classify(b"")` is GARBAGE: the caller drops it like any other garbage.
"""

from __future__ import annotations

from appliance.ice import stun

HEADER_BYTES = 2
MAX_FRAME = 0xFFFF  # what a 16-bit LENGTH can say
# Enough for one frame of the largest size: the decoder then refuses no legal frame.
MAX_BUFFERED = HEADER_BYTES + MAX_FRAME

# The STUN header as the opening check is tested by it (RFC 8489 section 5): stun.py's.
STUN_HEADER_BYTES = stun.HEADER_BYTES
STUN_MAGIC_COOKIE = stun.MAGIC_COOKIE_BYTES
STUN_BINDING_REQUEST = b"\x00\x01"  # method Binding, class request
# A browser's connectivity check is a few hundred bytes (USERNAME of at most 513, PRIORITY,
# ICE-CONTROLLING, USE-CANDIDATE, MESSAGE-INTEGRITY(-SHA256), FINGERPRINT, a vendor
# attribute or two); an opening frame longer than the STUN parser accepts is not one, and
# is not waited for.
MAX_OPENING_FRAME = stun.MAX_MESSAGE


class FramingError(Exception):
    """The byte stream is not RFC 4571 frames we accept; close the connection."""


def is_binding_request(frame: bytes | bytearray | memoryview) -> bool:
    """A STUN Binding request by its header (RFC 8489 section 5): type, magic cookie, and a
    message length that is the rest of the frame and a multiple of 4. Attributes,
    MESSAGE-INTEGRITY and FINGERPRINT are the STUN parser's to check."""
    if len(frame) < STUN_HEADER_BYTES:
        return False
    return _opening_header_ok(bytes(frame[:10]), len(frame))


def _opening_header_ok(head: bytes, frame_len: int) -> bool:
    """`head`: the frame's first 10 bytes (type, length, cookie); `frame_len`: its LENGTH."""
    stun_len = (head[2] << 8) | head[3]
    return (head[:2] == STUN_BINDING_REQUEST and head[4:8] == STUN_MAGIC_COOKIE
            and stun_len % 4 == 0 and stun_len == frame_len - STUN_HEADER_BYTES)


def encode(frame: bytes | bytearray | memoryview) -> bytes:
    """The frame with its 2-byte LENGTH in front."""
    n = len(frame)
    if n > MAX_FRAME:
        raise FramingError(f"frame of {n} bytes: RFC 4571 frames hold at most {MAX_FRAME}")
    return n.to_bytes(2, "big") + bytes(frame)


class Decoder:
    """One TCP connection's RFC 4571 stream, fed as it is read, in any chunks.

    `max_buffered` bounds the bytes kept between reads (the unfinished frame and its
    header): a frame that could not fit is refused as soon as its LENGTH is read, so a
    peer cannot make the decoder hold more however it splits or stalls its stream.
    """

    def __init__(self, *, max_buffered: int = MAX_BUFFERED, stun_first: bool = True) -> None:
        if not HEADER_BYTES < max_buffered <= MAX_BUFFERED:
            raise ValueError(f"max_buffered must be {HEADER_BYTES + 1}..{MAX_BUFFERED}")
        self._max_frame = max_buffered - HEADER_BYTES
        self._buf = bytearray()
        self._awaiting_opening = stun_first
        self._failed: str | None = None
        self.frames = 0  # complete frames returned
        self.empty_frames = 0  # of which LENGTH 0

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held until the next read."""
        return len(self._buf)

    @property
    def opened(self) -> bool:
        """The first frame has arrived (and, with stun_first, was a Binding request)."""
        return not self._awaiting_opening

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The frames `data` completes, in order; the rest is kept for the next read."""
        if self._failed is not None:
            raise FramingError(self._failed)
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end_of_data = len(buf)
        try:
            while end_of_data - pos >= HEADER_BYTES:
                length = (buf[pos] << 8) | buf[pos + 1]
                if length > self._max_frame:
                    self._fail(f"frame of {length} bytes over the {self._max_frame} allowed")
                if self._awaiting_opening and not self._opening_plausible(pos, length):
                    self._fail("the first frame is not a STUN Binding request")
                end = pos + HEADER_BYTES + length
                if end > end_of_data:
                    break
                frames.append(bytes(buf[pos + HEADER_BYTES:end]))
                self._awaiting_opening = False
                pos = end
        finally:
            # Consumed bytes go even when the stream fails: nothing is kept for a dead stream.
            del buf[:pos]
            if self._failed is not None:
                buf.clear()
        self.frames += len(frames)
        self.empty_frames += frames.count(b"")
        return frames

    def _opening_plausible(self, pos: int, length: int) -> bool:
        """Whether the first frame, starting at `pos`, may still be a Binding request:
        its LENGTH at once, its STUN header as soon as 10 bytes of it are in."""
        if not STUN_HEADER_BYTES <= length <= MAX_OPENING_FRAME:
            return False
        head = self._buf[pos + HEADER_BYTES:pos + HEADER_BYTES + 10]
        if len(head) < 10:
            return True  # not enough yet to tell
        return _opening_header_ok(bytes(head), length)

    def _fail(self, reason: str) -> None:
        self._failed = reason
        raise FramingError(reason)
