"""STUN messages as ICE uses them, sans-IO: parse a datagram, check it, build the answer.

RFC 8489 (which obsoletes 5389) with the short-term credential mechanism, and the ICE
attributes of RFC 8445 section 16.1. `parse` turns one datagram (or one RFC 4571 frame)
into a `Message`: the header, the attributes in the order they came, and the raw bytes,
so `check_integrity` (HMAC-SHA1, key = the ICE password) and `check_fingerprint`
(CRC-32 xor 0x5354554e) can be computed over exactly what was received. `build` makes a
message and signs it. `looks_like_stun` is the RFC 7983 first-byte test (`demux`'s) plus
the magic cookie.

Everything parsed here comes from whoever can reach the worker's media port, so the
parser bounds the message (a length that matches the datagram, at most `MAX_MESSAGE`
bytes, at most `MAX_ATTRIBUTES` attributes), validates every attribute it knows before
anyone reads it, and raises nothing but `StunError`.

What the parser decides, per RFC 8489 section 14: only the first of duplicate attributes
counts; attributes after MESSAGE-INTEGRITY are ignored except FINGERPRINT (and are not
listed); nothing may follow FINGERPRINT. Unknown comprehension-required attributes
(type < 0x8000) are listed in `Message.unknown_required` for the 420 answer; unknown
comprehension-optional ones are kept as raw attributes and otherwise ignored.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.ice.demux import FrameKind, classify

HEADER_BYTES = 20
MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
TRANSACTION_ID_BYTES = 12
FINGERPRINT_XOR = 0x5354554E

# A browser's connectivity check is 100-200 bytes; RFC 8489 keeps a STUN message over UDP
# within the path MTU. 2048 leaves room for vendor attributes and refuses
# the 64 KiB an RFC 4571 frame could claim, which no ICE check needs.
MAX_MESSAGE = 2048
# Chrome sends about 8 attributes in a check; 32 bounds the parse loop and the list kept.
MAX_ATTRIBUTES = 32
# RFC 5389 section 15.3: USERNAME is "less than 513 bytes" (RFC 8489 tightens the sender
# side to 509; a receiver accepts what RFC 5389 senders may send).
MAX_USERNAME_BYTES = 512
# RFC 8489 section 14.8: the reason phrase is at most 763 bytes of UTF-8.
MAX_REASON_BYTES = 763

# Attribute types (RFC 8489 section 18.3, RFC 8445 section 16.1).
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
SOFTWARE = 0x8022
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A

# The comprehension-required types we understand; any other type below 0x8000 in a
# request draws a 420 (RFC 8489 section 6.3.1). MESSAGE-INTEGRITY-SHA256 (0x001C) is
# deliberately not here: ICE's short-term credentials use SHA-1, and a peer that insists
# on SHA-256 is told so by the 420.
KNOWN_REQUIRED = frozenset({
    MAPPED_ADDRESS, USERNAME, MESSAGE_INTEGRITY, ERROR_CODE, UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS, PRIORITY, USE_CANDIDATE,
})
COMPREHENSION_OPTIONAL = 0x8000  # types from here up may be ignored when unknown
# The types whose values the parser validates and decodes into Message's fields.
DECODED = KNOWN_REQUIRED | {ICE_CONTROLLED, ICE_CONTROLLING}

_INTEGRITY_BYTES = 20  # HMAC-SHA1
_TIEBREAKER_FIELDS = {ICE_CONTROLLING: "ice_controlling", ICE_CONTROLLED: "ice_controlled"}
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_HEADER = struct.Struct("!HHI")
_ATTR_HEADER = struct.Struct("!HH")

# Methods (RFC 8489 section 18.2): ICE uses only Binding.
BINDING = 0x001


class StunError(ValueError):
    """Not a STUN message we accept; the only exception `parse` raises."""


class StunClass(enum.IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


@dataclass(frozen=True, slots=True)
class Attribute:
    type: int
    value: bytes  # without the padding
    offset: int  # where its 4-byte header starts in Message.raw


Address = tuple[str, int]  # (ip, port)


@dataclass(frozen=True, slots=True)
class Message:
    """One parsed STUN message. The typed fields hold the first occurrence of each known
    attribute (None / False when absent); `attributes` lists them all, in order."""

    method: int
    cls: StunClass
    transaction_id: bytes
    attributes: tuple[Attribute, ...]
    raw: bytes
    username: str | None = None
    priority: int | None = None
    use_candidate: bool = False
    ice_controlling: int | None = None  # the tiebreaker
    ice_controlled: int | None = None
    xor_mapped_address: Address | None = None
    mapped_address: Address | None = None
    error_code: tuple[int, str] | None = None
    unknown_attributes: tuple[int, ...] = ()  # the UNKNOWN-ATTRIBUTES attribute's list
    unknown_required: tuple[int, ...] = ()  # comprehension-required types we do not know
    integrity_offset: int | None = None  # where MESSAGE-INTEGRITY starts
    fingerprint_offset: int | None = None

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of `attr_type`, or None."""
        for attr in self.attributes:
            if attr.type == attr_type:
                return attr.value
        return None

    def check_integrity(self, key: bytes) -> bool:
        """Whether MESSAGE-INTEGRITY is present and is HMAC-SHA1(key) over the message up
        to it, with the header's length counting up to and including it (RFC 8489 14.5)."""
        at = self.integrity_offset
        if at is None:
            return False
        expected = _integrity(self.raw, at, key)
        return hmac.compare_digest(expected, self.raw[at + 4:at + 4 + _INTEGRITY_BYTES])

    def check_fingerprint(self) -> bool:
        """Whether FINGERPRINT is present and matches (RFC 8489 section 14.7)."""
        at = self.fingerprint_offset
        if at is None:
            return False
        (value,) = struct.unpack_from("!I", self.raw, at + 4)
        return value == _fingerprint(self.raw, at)


def looks_like_stun(data: bytes) -> bool:
    """A first byte that RFC 7983 gives to STUN (`demux`), then the magic cookie at bytes
    4..7, which tells an RFC 8489 message from anything else in that range."""
    return (len(data) >= HEADER_BYTES and classify(data) is FrameKind.STUN
            and data[4:8] == MAGIC_COOKIE_BYTES)


def decode_type(message_type: int) -> tuple[int, StunClass]:
    """(method, class) from the 14 type bits, where the class bits C1 C0 sit at bit 8 and
    bit 4 among the method bits (RFC 8489 section 5)."""
    method = (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | (
        (message_type & 0x3E00) >> 2)
    cls = ((message_type & 0x0100) >> 7) | ((message_type & 0x0010) >> 4)
    return method, StunClass(cls)


def encode_type(method: int, cls: StunClass) -> int:
    if not 0 <= method <= 0xFFF:
        raise StunError(f"method {method} does not fit in 12 bits")
    return ((method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
            | ((cls & 0b01) << 4) | ((cls & 0b10) << 7))


def parse(data: bytes, *, max_message: int = MAX_MESSAGE) -> Message:
    """One STUN message from one datagram (or one RFC 4571 frame), or StunError."""
    try:
        return _parse(bytes(data), max_message)
    except StunError:
        raise
    except (ValueError, IndexError, struct.error, UnicodeDecodeError, TypeError) as exc:
        # A bound the checks below missed must still surface as ours, never as a crash.
        raise StunError(f"unparsable STUN message: {exc}") from None


def _parse(data: bytes, max_message: int) -> Message:
    n = len(data)
    if n < HEADER_BYTES:
        raise StunError(f"{n} bytes: shorter than a STUN header")
    if n > max_message:
        raise StunError(f"{n} bytes: longer than the {max_message} we accept")
    message_type, length, cookie = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise StunError("the first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("no magic cookie")
    if length % 4:
        raise StunError(f"length {length} is not a multiple of 4")
    if HEADER_BYTES + length != n:
        raise StunError(f"length {length} does not match the {n - HEADER_BYTES} bytes after "
                        "the header")
    method, cls = decode_type(message_type)
    transaction_id = data[8:HEADER_BYTES]

    attributes: list[Attribute] = []
    fields: dict[str, object] = {}
    unknown: list[int] = []
    decoded: set[int] = set()
    integrity_at: int | None = None
    fingerprint_at: int | None = None
    seen = 0
    pos = HEADER_BYTES
    while pos < n:
        seen += 1
        if seen > MAX_ATTRIBUTES:
            raise StunError(f"more than {MAX_ATTRIBUTES} attributes")
        if fingerprint_at is not None:
            raise StunError("an attribute after FINGERPRINT")
        # n - pos is a positive multiple of 4 here, so the 4-byte header is all there.
        attr_type, attr_len = _ATTR_HEADER.unpack_from(data, pos)
        start = pos + 4
        end = start + attr_len
        padded_end = start + ((attr_len + 3) & ~3)
        if padded_end > n:
            raise StunError(f"attribute {attr_type:#06x} runs past the end of the message")
        value = data[start:end]
        if attr_type == FINGERPRINT:
            if attr_len != 4:
                raise StunError("FINGERPRINT is not 4 bytes")
            fingerprint_at = pos
            attributes.append(Attribute(attr_type, value, pos))
        elif integrity_at is None:
            # RFC 8489 section 14: only the first of duplicates is processed.
            if attr_type in DECODED:
                if attr_type not in decoded:
                    decoded.add(attr_type)
                    _decode_known(attr_type, value, transaction_id, fields)
            elif attr_type < COMPREHENSION_OPTIONAL and attr_type not in unknown:
                unknown.append(attr_type)
            if attr_type == MESSAGE_INTEGRITY:
                integrity_at = pos
            attributes.append(Attribute(attr_type, value, pos))
        # else: after MESSAGE-INTEGRITY and not FINGERPRINT: ignored (RFC 8489 section 9).
        pos = padded_end

    return Message(
        method=method, cls=cls, transaction_id=transaction_id, attributes=tuple(attributes),
        raw=data, unknown_required=tuple(unknown), integrity_offset=integrity_at,
        fingerprint_offset=fingerprint_at, **fields,  # type: ignore[arg-type]
    )


def _decode_known(attr_type: int, value: bytes, transaction_id: bytes,
                  fields: dict[str, object]) -> None:
    """Validate one known attribute and set its typed field, or raise StunError."""
    n = len(value)
    if attr_type == USERNAME:
        if n > MAX_USERNAME_BYTES:
            raise StunError(f"USERNAME of {n} bytes (the limit is {MAX_USERNAME_BYTES})")
        fields["username"] = _utf8(value, "USERNAME")
    elif attr_type == MESSAGE_INTEGRITY:
        if n != _INTEGRITY_BYTES:
            raise StunError(f"MESSAGE-INTEGRITY of {n} bytes, not 20")
    elif attr_type == PRIORITY:
        if n != 4:
            raise StunError(f"PRIORITY of {n} bytes, not 4")
        fields["priority"] = struct.unpack("!I", value)[0]
    elif attr_type == USE_CANDIDATE:
        if n:
            raise StunError("USE-CANDIDATE with a value")
        fields["use_candidate"] = True
    elif attr_type == XOR_MAPPED_ADDRESS:
        fields["xor_mapped_address"] = decode_address(value, transaction_id)
    elif attr_type == MAPPED_ADDRESS:
        fields["mapped_address"] = decode_address(value, None)
    elif attr_type == ERROR_CODE:
        fields["error_code"] = _decode_error_code(value)
    elif attr_type in (ICE_CONTROLLING, ICE_CONTROLLED):
        if n != 8:
            raise StunError(f"ICE-CONTROLLING/ICE-CONTROLLED of {n} bytes, not 8")
        fields[_TIEBREAKER_FIELDS[attr_type]] = struct.unpack("!Q", value)[0]
    elif attr_type == UNKNOWN_ATTRIBUTES:
        if n % 2:
            raise StunError("UNKNOWN-ATTRIBUTES of an odd length")
        fields["unknown_attributes"] = struct.unpack(f"!{n // 2}H", value)


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError(f"{what} is not UTF-8") from None


def _decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("ERROR-CODE shorter than 4 bytes")
    if len(value) - 4 > MAX_REASON_BYTES:
        raise StunError("ERROR-CODE reason phrase too long")
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunError(f"ERROR-CODE {error_class}{number:02d} out of range")
    return error_class * 100 + number, _utf8(value[4:], "ERROR-CODE reason")


def decode_address(value: bytes, transaction_id: bytes | None) -> Address:
    """(ip, port) of a (XOR-)MAPPED-ADDRESS value; XORed when `transaction_id` is given."""
    if len(value) < 4:
        raise StunError("address attribute shorter than 4 bytes")
    family = value[1]
    if family == _FAMILY_IPV4:
        if len(value) != 8:
            raise StunError("IPv4 address attribute is not 8 bytes")
    elif family == _FAMILY_IPV6:
        if len(value) != 20:
            raise StunError("IPv6 address attribute is not 20 bytes")
    else:
        raise StunError(f"address family {family:#04x} unknown")
    port_and_ip = value[2:]
    if transaction_id is not None:
        port_and_ip = _xor(port_and_ip, transaction_id)
    port = struct.unpack("!H", port_and_ip[:2])[0]
    packed = port_and_ip[2:]
    ip = ipaddress.IPv4Address(packed) if family == _FAMILY_IPV4 else ipaddress.IPv6Address(
        packed)
    return str(ip), port


def _xor(port_and_ip: bytes, transaction_id: bytes) -> bytes:
    # RFC 8489 section 14.2: the port with the cookie's top 16 bits, an IPv4 address with
    # the cookie, an IPv6 address with the cookie then the transaction id.
    pad = MAGIC_COOKIE_BYTES[:2] + MAGIC_COOKIE_BYTES + transaction_id
    return bytes(a ^ b for a, b in zip(port_and_ip, pad, strict=False))


def encode_address(ip: str, port: int, transaction_id: bytes | None) -> bytes:
    """A (XOR-)MAPPED-ADDRESS value: XORed when `transaction_id` is given."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise StunError(f"not an IP address: {ip!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port {port} out of range")
    family = _FAMILY_IPV4 if address.version == 4 else _FAMILY_IPV6
    port_and_ip = struct.pack("!H", port) + address.packed
    if transaction_id is not None:
        port_and_ip = _xor(port_and_ip, _transaction_id(transaction_id))
    return bytes((0, family)) + port_and_ip


def encode_error_code(code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise StunError(f"error code {code} out of range")
    phrase = reason.encode("utf-8")
    if len(phrase) > MAX_REASON_BYTES:
        raise StunError("reason phrase too long")
    return struct.pack("!HBB", 0, code // 100, code % 100) + phrase


def encode_unknown_attributes(types: Iterable[int]) -> bytes:
    listed = list(types)
    return struct.pack(f"!{len(listed)}H", *listed)


def encode_u32(value: int) -> bytes:
    """PRIORITY's value."""
    return struct.pack("!I", value)


def encode_u64(value: int) -> bytes:
    """ICE-CONTROLLING's and ICE-CONTROLLED's value: the tiebreaker."""
    return struct.pack("!Q", value)


def build(method: int, cls: StunClass, transaction_id: bytes,
          attributes: Iterable[tuple[int, bytes]] = (), *, integrity_key: bytes | None = None,
          fingerprint: bool = True) -> bytes:
    """The bytes of one message: the attributes in order, then MESSAGE-INTEGRITY when
    `integrity_key` is given, then FINGERPRINT (the order RFC 8489 section 14 requires)."""
    body = bytearray()
    for attr_type, value in attributes:
        if not 0 <= attr_type <= 0xFFFF or len(value) > 0xFFFF:
            raise StunError(f"attribute {attr_type:#x} of {len(value)} bytes does not fit")
        body += _ATTR_HEADER.pack(attr_type, len(value)) + value + bytes(-len(value) % 4)
    trailer = 4 + _INTEGRITY_BYTES if integrity_key is not None else 0
    trailer += 8 if fingerprint else 0
    if len(body) + trailer > 0xFFFF:
        raise StunError("message longer than a 16-bit length can say")
    header = struct.pack("!H", encode_type(method, cls))
    tail = MAGIC_COOKIE_BYTES + _transaction_id(transaction_id)
    data = bytearray(header + b"\0\0" + tail + body)
    if integrity_key is not None:
        at = len(data)
        data += _ATTR_HEADER.pack(MESSAGE_INTEGRITY, _INTEGRITY_BYTES) + bytes(_INTEGRITY_BYTES)
        data[at + 4:] = _integrity(bytes(data), at, integrity_key)
    if fingerprint:
        at = len(data)
        data += _ATTR_HEADER.pack(FINGERPRINT, 4) + bytes(4)
        data[at + 4:] = struct.pack("!I", _fingerprint(bytes(data), at))
    data[2:4] = struct.pack("!H", len(data) - HEADER_BYTES)
    return bytes(data)


def _transaction_id(transaction_id: bytes) -> bytes:
    if len(transaction_id) != TRANSACTION_ID_BYTES:
        raise StunError("a transaction id is 12 bytes")
    return bytes(transaction_id)


def _with_length(data: bytes, upto: int, extra: int) -> bytes:
    """The message's first `upto` bytes with the header's length rewritten as if the
    message ended `extra` bytes after them: what MESSAGE-INTEGRITY and FINGERPRINT cover."""
    return data[:2] + struct.pack("!H", upto - HEADER_BYTES + extra) + data[4:upto]


def _integrity(data: bytes, at: int, key: bytes) -> bytes:
    return hmac.new(key, _with_length(data, at, 4 + _INTEGRITY_BYTES), hashlib.sha1).digest()


def _fingerprint(data: bytes, at: int) -> int:
    return (binascii.crc32(_with_length(data, at, 8)) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
