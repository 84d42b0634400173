"""The STUN codec (appliance/ice/stun.py) against RFC 5769's test vectors and against
aioice's STUN code (the installed reference implementation), both ways: what aioice builds
parses here and passes our integrity and fingerprint checks, and what we build parses in
aioice and passes its checks. Then every rule the parser enforces, and hostile input: random
bytes and mutated valid messages raise nothing but StunError."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from aioice import stun as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.ice import stun
from appliance.ice.stun import StunClass, StunError
from tests.fuzz_scale import scaled

# RFC 5769 sections 2.1-2.3 (the short-term password is the section 2 one).
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149a"
    "eaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf")
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f722000200008"
    "0001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96")
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f722000200014"
    "0002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275"
    "bfe3ed4180280004c8fb0b4c")
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

FUZZ = settings(max_examples=scaled(300, 30000), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
CROSS = settings(max_examples=scaled(100, 5000), deadline=None)


def raw(body: bytes = b"", *, message_type: int = 0x0001, length: int | None = None,
        cookie: int = stun.MAGIC_COOKIE, txid: bytes = TXID) -> bytes:
    """A message exactly as written: no padding, lengths or checks added."""
    n = len(body) if length is None else length
    return struct.pack("!HHI", message_type, n, cookie) + txid + body


def attr(attr_type: int, value: bytes, pad: bytes = b"\0") -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + pad * (-len(value) % 4)


# -- RFC 5769 -------------------------------------------------------------------------------


def test_rfc5769_sample_request() -> None:
    m = stun.parse(RFC5769_REQUEST)
    assert (m.method, m.cls, m.transaction_id) == (stun.BINDING, StunClass.REQUEST, TXID)
    assert m.username == "evtj:h6vY"  # its padding is three spaces: padding is not value
    assert m.priority == 0x6E0001FF
    assert m.ice_controlled == 0x932FF9B151263B36
    assert m.ice_controlling is None and not m.use_candidate
    assert m.get(stun.SOFTWARE) == b"STUN test client"
    assert [a.type for a in m.attributes] == [
        stun.SOFTWARE, stun.PRIORITY, stun.ICE_CONTROLLED, stun.USERNAME,
        stun.MESSAGE_INTEGRITY, stun.FINGERPRINT]
    assert m.check_integrity(RFC5769_PASSWORD)
    assert not m.check_integrity(RFC5769_PASSWORD[:-1])
    assert m.check_fingerprint()
    assert m.unknown_required == ()
    assert m.raw == RFC5769_REQUEST


@pytest.mark.parametrize(("data", "address"), [
    (RFC5769_IPV4_RESPONSE, ("192.0.2.1", 32853)),
    (RFC5769_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
])
def test_rfc5769_sample_responses(data: bytes, address: tuple[str, int]) -> None:
    m = stun.parse(data)
    assert (m.method, m.cls) == (stun.BINDING, StunClass.SUCCESS)
    assert m.xor_mapped_address == address
    assert m.get(stun.SOFTWARE) == b"test vector"
    assert m.check_integrity(RFC5769_PASSWORD) and m.check_fingerprint()


def test_a_flipped_bit_fails_integrity_and_fingerprint() -> None:
    integrity_end = stun.parse(RFC5769_REQUEST).integrity_offset + 24  # type: ignore[operator]
    for at in range(stun.HEADER_BYTES, len(RFC5769_REQUEST) - 8):
        b = bytearray(RFC5769_REQUEST)
        b[at] ^= 0x01
        try:
            m = stun.parse(bytes(b))
        except StunError:
            continue  # the flip broke the framing: refused outright, also fine
        assert not m.check_fingerprint(), at
        if at < integrity_end:
            assert not m.check_integrity(RFC5769_PASSWORD), at


# -- the message type ---------------------------------------------------------------------


def test_type_bits_round_trip_for_every_method_and_class() -> None:
    seen = set()
    for method in range(0x1000):
        for cls in StunClass:
            t = stun.encode_type(method, cls)
            assert t & 0xC000 == 0
            assert stun.decode_type(t) == (method, cls)
            seen.add(t)
    assert len(seen) == 0x4000  # a bijection onto the 14 bits


@pytest.mark.parametrize(("cls", "ref_cls", "value"), [
    (StunClass.REQUEST, ref.Class.REQUEST, 0x0001),
    (StunClass.INDICATION, ref.Class.INDICATION, 0x0011),
    (StunClass.SUCCESS, ref.Class.RESPONSE, 0x0101),
    (StunClass.ERROR, ref.Class.ERROR, 0x0111),
])
def test_binding_types_match_aioice(cls: StunClass, ref_cls: ref.Class, value: int) -> None:
    assert stun.encode_type(stun.BINDING, cls) == ref.Method.BINDING | ref_cls == value


# -- cross-checks against aioice --------------------------------------------------------------

usernames = st.text(min_size=1, max_size=120).filter(lambda s: len(s.encode()) <= 512)
keys = st.binary(min_size=1, max_size=64)


@CROSS
@given(username=usernames, priority=st.integers(0, 2**32 - 1),
       tiebreaker=st.integers(0, 2**64 - 1), controlling=st.booleans(),
       use_candidate=st.booleans(), key=keys)
def test_aioice_checks_parse_and_verify_here(username: str, priority: int, tiebreaker: int,
                                             controlling: bool, use_candidate: bool,
                                             key: bytes) -> None:
    m = ref.Message(ref.Method.BINDING, ref.Class.REQUEST)
    m.attributes["USERNAME"] = username
    m.attributes["PRIORITY"] = priority
    m.attributes["ICE-CONTROLLING" if controlling else "ICE-CONTROLLED"] = tiebreaker
    if use_candidate:
        m.attributes["USE-CANDIDATE"] = None
    m.add_message_integrity(key)
    ours = stun.parse(bytes(m))
    assert ours.transaction_id == m.transaction_id
    assert (ours.method, ours.cls) == (stun.BINDING, StunClass.REQUEST)
    assert ours.username == username and ours.priority == priority
    assert ours.use_candidate == use_candidate
    assert (ours.ice_controlling if controlling else ours.ice_controlled) == tiebreaker
    assert (ours.ice_controlled if controlling else ours.ice_controlling) is None
    assert ours.check_integrity(key)
    assert not ours.check_integrity(key + b"x")
    assert ours.check_fingerprint()


addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
ports = st.integers(0, 0xFFFF)
transaction_ids = st.binary(min_size=12, max_size=12)


@CROSS
@given(ip=addresses, port=ports, txid=transaction_ids, key=keys,
       code=st.integers(300, 699), reason=st.text(max_size=40))
def test_our_messages_parse_and_verify_in_aioice(ip: str, port: int, txid: bytes, key: bytes,
                                                  code: int, reason: str) -> None:
    success = stun.build(stun.BINDING, StunClass.SUCCESS, txid, [
        (stun.XOR_MAPPED_ADDRESS, stun.encode_address(ip, port, txid))], integrity_key=key)
    m = ref.parse_message(success)  # raises if its FINGERPRINT check fails
    assert (m.message_method, m.message_class) == (ref.Method.BINDING, ref.Class.RESPONSE)
    assert m.transaction_id == txid
    assert m.attributes["XOR-MAPPED-ADDRESS"] == (ip, port)
    assert m.check_message_integrity(key)
    assert stun.parse(success).xor_mapped_address == (ip, port)

    error = stun.build(stun.BINDING, StunClass.ERROR, txid, [
        (stun.ERROR_CODE, stun.encode_error_code(code, reason))], integrity_key=key)
    m = ref.parse_message(error)
    assert m.message_class == ref.Class.ERROR
    assert m.attributes["ERROR-CODE"] == (code, reason)
    assert m.check_message_integrity(key)
    assert stun.parse(error).error_code == (code, reason)

    unsigned = stun.build(stun.BINDING, StunClass.ERROR, txid, [
        (stun.ERROR_CODE, stun.encode_error_code(401, "Unauthenticated"))])
    m = ref.parse_message(unsigned)
    assert "MESSAGE-INTEGRITY" not in m.attributes and "FINGERPRINT" in m.attributes


@CROSS
@given(username=usernames, priority=st.integers(0, 2**32 - 1),
       tiebreaker=st.integers(0, 2**64 - 1), key=keys, txid=transaction_ids)
def test_our_checks_parse_in_aioice(username: str, priority: int, tiebreaker: int,
                                    key: bytes, txid: bytes) -> None:
    data = stun.build(stun.BINDING, StunClass.REQUEST, txid, [
        (stun.USERNAME, username.encode()), (stun.PRIORITY, stun.encode_u32(priority)),
        (stun.ICE_CONTROLLING, stun.encode_u64(tiebreaker)), (stun.USE_CANDIDATE, b"")],
        integrity_key=key)
    m = ref.parse_message(data)
    assert m.attributes["USERNAME"] == username
    assert m.attributes["PRIORITY"] == priority
    assert m.attributes["ICE-CONTROLLING"] == tiebreaker
    assert "USE-CANDIDATE" in m.attributes
    assert m.check_message_integrity(key)


@CROSS
@given(ip=addresses, port=ports, txid=transaction_ids)
def test_address_encoding_is_byte_for_byte_aioice_s(ip: str, port: int, txid: bytes) -> None:
    assert stun.encode_address(ip, port, txid) == ref.pack_xor_address((ip, port), txid)
    assert stun.encode_address(ip, port, None) == ref.pack_address((ip, port))
    assert stun.decode_address(ref.pack_xor_address((ip, port), txid), txid) == (ip, port)
    assert stun.decode_address(ref.pack_address((ip, port)), None) == (ip, port)


def test_error_code_encoding_is_aioice_s() -> None:
    for code in (300, 400, 401, 420, 487, 500, 699):
        assert stun.encode_error_code(code, "why") == ref.pack_error_code((code, "why"))


# -- what the parser refuses --------------------------------------------------------------

USERNAME_ATTR = attr(stun.USERNAME, b"abcd:efgh")


@pytest.mark.parametrize(("data", "why"), [
    (b"", "shorter than a STUN header"),
    (raw()[:19], "shorter than a STUN header"),
    (raw(message_type=0x4001), "first two bits"),
    (raw(message_type=0x8001), "first two bits"),
    (raw(cookie=0x2112A443), "no magic cookie"),
    (raw(USERNAME_ATTR, length=len(USERNAME_ATTR) + 4), "does not match"),
    (raw(USERNAME_ATTR, length=len(USERNAME_ATTR) - 4), "does not match"),
    (raw(USERNAME_ATTR + b"\0\0", length=len(USERNAME_ATTR) + 2), "multiple of 4"),
    (raw(struct.pack("!HH", stun.USERNAME, 9) + b"abcd:efgh"), "multiple of 4"),
    (raw(struct.pack("!HH", stun.USERNAME, 13) + b"abcd:efghijk"), "runs past the end"),
    (raw(struct.pack("!HH", 0x8055, 0xFFFF)), "runs past the end"),
    (raw(attr(stun.FINGERPRINT, b"\0" * 4) + USERNAME_ATTR), "after FINGERPRINT"),
    (raw(attr(stun.FINGERPRINT, b"\0" * 4) + attr(stun.FINGERPRINT, b"\0" * 4)),
     "after FINGERPRINT"),
    (raw(attr(stun.FINGERPRINT, b"\0" * 8)), "FINGERPRINT is not 4 bytes"),
    (raw(attr(0x8055, b"") * 33), "more than 32 attributes"),
    (raw(attr(stun.USERNAME, b"u" * 513)), "USERNAME of 513 bytes"),
    (raw(attr(stun.USERNAME, b"\xff\xfe")), "not UTF-8"),
    (raw(attr(stun.MESSAGE_INTEGRITY, b"\0" * 19)), "not 20"),
    (raw(attr(stun.PRIORITY, b"\0" * 3)), "PRIORITY of 3 bytes"),
    (raw(attr(stun.USE_CANDIDATE, b"\0")), "USE-CANDIDATE with a value"),
    (raw(attr(stun.ICE_CONTROLLING, b"\0" * 4)), "not 8"),
    (raw(attr(stun.ICE_CONTROLLED, b"\0" * 9)), "not 8"),
    (raw(attr(stun.XOR_MAPPED_ADDRESS, b"\0\x01\0")), "shorter than 4"),
    (raw(attr(stun.XOR_MAPPED_ADDRESS, b"\0\x01" + b"\0" * 18)), "IPv4 address attribute"),
    (raw(attr(stun.XOR_MAPPED_ADDRESS, b"\0\x02" + b"\0" * 6)), "IPv6 address attribute"),
    (raw(attr(stun.XOR_MAPPED_ADDRESS, b"\0\x03" + b"\0" * 6)), "family 0x03 unknown"),
    (raw(attr(stun.MAPPED_ADDRESS, b"\0\x00" + b"\0" * 6)), "family 0x00 unknown"),
    (raw(attr(stun.ERROR_CODE, b"\0\0\x04")), "shorter than 4"),
    (raw(attr(stun.ERROR_CODE, b"\0\0\x02\x00")), "out of range"),
    (raw(attr(stun.ERROR_CODE, b"\0\0\x07\x00")), "out of range"),
    (raw(attr(stun.ERROR_CODE, b"\0\0\x04\x64")), "out of range"),
    (raw(attr(stun.ERROR_CODE, b"\0\0\x04\x01" + b"r" * 764)), "too long"),
    (raw(attr(stun.ERROR_CODE, b"\0\0\x04\x01\xc3")), "not UTF-8"),
    (raw(attr(stun.UNKNOWN_ATTRIBUTES, b"\0\x01\0")), "odd length"),
    (raw(b"\0" * 2048), "longer than the 2048"),
    ("not bytes", "unparsable"),
])
def test_refused(data: bytes, why: str) -> None:
    with pytest.raises(StunError, match=why):
        stun.parse(data)


def test_max_message_is_configurable_and_inclusive() -> None:
    data = raw(attr(0x8055, b"x" * 96))
    assert stun.parse(data, max_message=len(data)).attributes[0].value == b"x" * 96
    with pytest.raises(StunError, match="longer than"):
        stun.parse(data, max_message=len(data) - 1)


def test_limits_are_inclusive() -> None:
    m = stun.parse(raw(attr(stun.USERNAME, "é".encode() * 256)))  # 512 bytes
    assert m.username == "é" * 256
    assert len(stun.parse(raw(attr(0x8055, b"") * 32)).attributes) == 32
    assert stun.parse(raw(attr(stun.ERROR_CODE, b"\0\0\x06\x63"))).error_code == (699, "")


def test_attributes_after_message_integrity_are_ignored_except_fingerprint() -> None:
    key = b"secret"
    signed = stun.build(stun.BINDING, StunClass.REQUEST, TXID, [
        (stun.USERNAME, b"ab:cd")], integrity_key=key, fingerprint=False)
    # Append PRIORITY and an unknown required attribute after MESSAGE-INTEGRITY (outside
    # what it covers), then a FINGERPRINT over the lot, as an attacker on the path could.
    body = signed[20:] + attr(stun.PRIORITY, b"\0\0\0\x07") + attr(0x0077, b"zz")
    unsigned_tail = raw(body + attr(stun.FINGERPRINT, b"\0" * 4))
    fp = stun._fingerprint(unsigned_tail, len(unsigned_tail) - 8)
    data = unsigned_tail[:-4] + struct.pack("!I", fp)
    m = stun.parse(data)
    assert m.priority is None and m.unknown_required == ()
    assert [a.type for a in m.attributes] == [
        stun.USERNAME, stun.MESSAGE_INTEGRITY, stun.FINGERPRINT]
    assert m.check_integrity(key) and m.check_fingerprint()
    # aioice ignores them the same way.
    r = ref.parse_message(data)
    assert "PRIORITY" not in r.attributes and r.check_message_integrity(key)


def test_the_first_of_duplicates_counts() -> None:
    m = stun.parse(raw(attr(stun.USERNAME, b"first") + attr(stun.USERNAME, b"second")
                       + attr(stun.PRIORITY, b"\0\0\0\x01") + attr(stun.PRIORITY, b"\0")))
    assert m.username == "first" and m.priority == 1
    assert m.get(stun.USERNAME) == b"first"
    assert len(m.attributes) == 4  # all listed; the second PRIORITY is never decoded


def test_unknown_comprehension_required_attributes_are_listed_once() -> None:
    m = stun.parse(raw(attr(0x0002, b"") + attr(0x7FFF, b"abc") + attr(0x0002, b"x")
                       + attr(0x8000, b"") + attr(0xC057, b"\0\0\0\0")
                       + attr(0x001C, b"\0" * 32)))
    # 0x001C is MESSAGE-INTEGRITY-SHA256: required, and not supported here.
    assert m.unknown_required == (0x0002, 0x7FFF, 0x001C)
    assert m.get(0xC057) == b"\0\0\0\0"


def test_unknown_attributes_attribute_round_trip() -> None:
    data = stun.build(stun.BINDING, StunClass.ERROR, TXID, [
        (stun.ERROR_CODE, stun.encode_error_code(420, "Unknown Attribute")),
        (stun.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes([0x0002, 0x7FFF, 0x001C]))])
    m = stun.parse(data)
    assert m.error_code == (420, "Unknown Attribute")
    assert m.unknown_attributes == (0x0002, 0x7FFF, 0x001C)
    assert m.check_fingerprint() and not m.check_integrity(b"")  # no MESSAGE-INTEGRITY


def test_without_fingerprint_or_integrity_the_checks_say_no() -> None:
    data = stun.build(stun.BINDING, StunClass.REQUEST, TXID, [(stun.USERNAME, b"a:b")],
                      fingerprint=False)
    m = stun.parse(data)
    assert m.fingerprint_offset is None and not m.check_fingerprint()
    assert m.integrity_offset is None and not m.check_integrity(b"a")


def test_build_pads_with_zeros_and_counts_the_length() -> None:
    data = stun.build(0x123, StunClass.INDICATION, TXID, [(0x8055, b"abcde")],
                      fingerprint=False)
    assert data[2:4] == b"\x00\x0c"
    assert data[20:] == b"\x80\x55\x00\x05abcde\0\0\0"
    m = stun.parse(data)
    assert (m.method, m.cls) == (0x123, StunClass.INDICATION)


@pytest.mark.parametrize("call", [
    lambda: stun.build(stun.BINDING, StunClass.REQUEST, b"short"),
    lambda: stun.build(0x1000, StunClass.REQUEST, TXID),
    lambda: stun.build(stun.BINDING, StunClass.REQUEST, TXID, [(0x10000, b"")]),
    lambda: stun.build(stun.BINDING, StunClass.REQUEST, TXID, [(0x8055, b"x" * 0x10000)]),
    lambda: stun.build(stun.BINDING, StunClass.REQUEST, TXID, [(0x8055, b"x" * 0xFFFF)] * 2),
    lambda: stun.encode_address("999.1.1.1", 1, None),
    lambda: stun.encode_address("127.0.0.1", 65536, None),
    lambda: stun.encode_error_code(200, "OK"),
    lambda: stun.encode_error_code(400, "x" * 764),
])
def test_build_refuses_what_cannot_be_said(call: object) -> None:
    with pytest.raises(StunError):
        call()  # type: ignore[operator]


def test_an_ipv6_address_with_a_scope_encodes_as_its_address() -> None:
    # What asyncio reports for a link-local source; the scope is local to us.
    value = stun.encode_address("fe80::1%lo", 5000, TXID)
    assert stun.decode_address(value, TXID) == ("fe80::1", 5000)


# -- RFC 7983 demultiplexing ----------------------------------------------------------------


def test_looks_like_stun_by_first_byte_and_cookie() -> None:
    for first in range(256):
        data = bytes([first, 1]) + b"\0\0" + stun.MAGIC_COOKIE_BYTES + bytes(12)
        assert stun.looks_like_stun(data) == (first <= 3), first
    assert not stun.looks_like_stun(RFC5769_REQUEST[:4] + b"\0\0\0\0" + RFC5769_REQUEST[8:])
    assert not stun.looks_like_stun(RFC5769_REQUEST[:19])
    assert stun.looks_like_stun(RFC5769_REQUEST)
    dtls = bytes([22, 0xFE, 0xFD]) + bytes(30)
    rtp = bytes([0x80, 0x60]) + bytes(30)
    assert not stun.looks_like_stun(dtls) and not stun.looks_like_stun(rtp)


# -- hostile input ------------------------------------------------------------------------


def _survive(data: bytes) -> None:
    try:
        m = stun.parse(data)
    except StunError:
        return
    # What parses must be safe to ask about.
    assert isinstance(m.check_integrity(b"key"), bool)
    assert isinstance(m.check_fingerprint(), bool)
    assert len(m.attributes) <= stun.MAX_ATTRIBUTES
    assert m.raw == data


@pytest.mark.fuzz
@FUZZ
@given(st.binary(max_size=2100))
def test_random_bytes_raise_only_stun_error(data: bytes) -> None:
    _survive(data)


@pytest.mark.fuzz
@FUZZ
@given(message_type=st.integers(0, 0x3FFF), body=st.binary(max_size=400))
def test_random_bodies_behind_a_valid_header_raise_only_stun_error(message_type: int,
                                                                   body: bytes) -> None:
    # A real header with the right length gets the attribute loop to chew on the body.
    _survive(raw(body, message_type=message_type))
    _survive(raw(body + bytes(-len(body) % 4), message_type=message_type))


def _valid_messages() -> list[bytes]:
    m = ref.Message(ref.Method.BINDING, ref.Class.REQUEST)
    m.attributes.update({"USERNAME": "abcd:efgh", "PRIORITY": 1, "ICE-CONTROLLING": 2,
                         "USE-CANDIDATE": None})
    m.add_message_integrity(b"k")
    return [bytes(m), RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE,
            stun.build(stun.BINDING, StunClass.ERROR, TXID, [
                (stun.ERROR_CODE, stun.encode_error_code(420, "Unknown")),
                (stun.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes([2, 3]))])]


VALID = _valid_messages()


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b += rng.randbytes(rng.choice((1, 2, 4, 8)))
        elif op == 3 and len(b) >= 24:
            # An attribute length: the field the attribute walk trusts most.
            at = rng.randrange(20, len(b) - 3) & ~3
            b[at + 2:at + 4] = struct.pack("!H", rng.choice((0, 1, 3, 4, 0xFFFF,
                                                             rng.randrange(0x10000))))
        elif op == 4 and len(b) >= 4:
            b[2:4] = struct.pack("!H", max(0, len(b) - 20))  # keep the header consistent
        elif op == 5 and len(b) >= 24:
            at = rng.randrange(20, len(b) - 3) & ~3
            b[at:at + 2] = struct.pack("!H", rng.choice(
                (stun.USERNAME, stun.MESSAGE_INTEGRITY, stun.FINGERPRINT, stun.ERROR_CODE,
                 stun.XOR_MAPPED_ADDRESS, stun.PRIORITY, stun.USE_CANDIDATE,
                 stun.ICE_CONTROLLING, stun.UNKNOWN_ATTRIBUTES, 0x0002, 0xC057)))
    return bytes(b)


@pytest.mark.fuzz
@FUZZ
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(VALID) - 1))
def test_mutated_valid_messages_raise_only_stun_error(seed: int, which: int) -> None:
    _survive(mutate(random.Random(seed), VALID[which]))


@pytest.mark.fuzz
def test_many_mutations_some_still_parse() -> None:
    """The mutation fuzz must reach past the header checks, or it proves little."""
    rng = random.Random(5769)
    parsed = 0
    for _ in range(scaled(3000, 300000)):
        data = mutate(rng, rng.choice(VALID))
        _survive(data)
        try:
            stun.parse(data)
            parsed += 1
        except StunError:
            pass
    assert parsed > 100


def test_ipv4_and_ipv6_address_kinds_are_decoded_as_such() -> None:
    for ip in ("0.0.0.0", "255.255.255.255", "::", "::ffff:1.2.3.4", "2001:db8::"):
        value = stun.encode_address(ip, 1, TXID)
        got = stun.decode_address(value, TXID)[0]
        assert ipaddress.ip_address(got) == ipaddress.ip_address(ip)
