"""The native path's SRTP (appliance/native/_packetloop.c, libsrtp2) against pylibsrtp's
(aiortc's, a libsrtp of its own): the same keys give the same bytes, both ways, and what
must fail fails the same way."""

from __future__ import annotations

import contextlib
import os

import pylibsrtp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import native
from appliance.media import rtp

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)

PROFILES = {  # ours -> pylibsrtp's, with the key+salt length
    "PROFILE_AES128_CM_SHA1_80": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    "PROFILE_AES128_CM_SHA1_32": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 30),
    "PROFILE_AEAD_AES_128_GCM": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    "PROFILE_AEAD_AES_256_GCM": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
}


def reference(profile: int, key: bytes, outbound: bool) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(key=key, srtp_profile=profile, ssrc_type=(
        pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND))
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return pylibsrtp.Session(policy)


def ours(name: str, key: bytes, outbound: bool) -> object:
    m = native.module()
    return m.Srtp(getattr(m, name), key, outbound)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_protect_is_byte_for_byte_pylibsrtps_and_each_unprotects_the_other(name: str) -> None:
    profile, size = PROFILES[name]
    key = os.urandom(size)
    mine_tx, ref_tx = ours(name, key, True), reference(profile, key, True)
    mine_rx, ref_rx = ours(name, key, False), reference(profile, key, False)
    for seq in range(50):
        packet = rtp.build(96, seq % 7 == 0, seq, seq * 3000, 0x1234, os.urandom(seq * 20))
        protected = mine_tx.protect(packet)
        assert protected == ref_tx.protect(packet)
        assert ref_rx.unprotect(protected) == packet
        assert mine_rx.unprotect(protected) == packet
    # RTCP: an RR (SRTCP index and E bit added by both the same way).
    rr = bytes([0x81, 201, 0, 7]) + (0x1234).to_bytes(4, "big") + os.urandom(24)
    assert mine_tx.protect_rtcp(rr) == ref_tx.protect_rtcp(rr)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_ours_unprotects_what_pylibsrtp_protects(name: str) -> None:
    profile, size = PROFILES[name]
    key = os.urandom(size)
    ref_tx, mine_rx = reference(profile, key, True), ours(name, key, False)
    for seq in range(20):
        packet = rtp.build(0, False, 1000 + seq, seq * 160, 0xABCD, os.urandom(160))
        assert mine_rx.unprotect(ref_tx.protect(packet)) == packet
    rr = bytes([0x80, 201, 0, 1]) + (0xABCD).to_bytes(4, "big")
    assert mine_rx.unprotect_rtcp(ref_tx.protect_rtcp(rr)) == rr


def test_a_replayed_or_forged_packet_is_refused() -> None:
    m = native.module()
    key = os.urandom(30)
    tx = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, key, True)
    rx = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, key, False)
    protected = tx.protect(rtp.build(96, False, 5, 0, 1, b"x" * 100))
    assert rx.unprotect(protected)[12:] == b"x" * 100
    with pytest.raises(m.SrtpError, match="replay"):
        rx.unprotect(protected)
    forged = bytearray(tx.protect(rtp.build(96, False, 6, 0, 1, b"y" * 100)))
    forged[20] ^= 1
    with pytest.raises(m.SrtpError, match="authentication"):
        rx.unprotect(bytes(forged))
    other = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, os.urandom(30), False)
    with pytest.raises(m.SrtpError):
        other.unprotect(tx.protect(rtp.build(96, False, 7, 0, 1, b"z")))
    assert issubclass(m.SrtpError, ValueError)


def test_bad_arguments_are_refused_before_libsrtp_sees_them() -> None:
    m = native.module()
    with pytest.raises(ValueError, match="30 bytes"):
        m.Srtp(m.PROFILE_AES128_CM_SHA1_80, b"short", True)
    with pytest.raises(ValueError):
        m.Srtp(99, os.urandom(30), True)
    with pytest.raises(ValueError, match="window_size"):
        m.Srtp(m.PROFILE_AES128_CM_SHA1_80, os.urandom(30), False, window_size=1)
    s = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, os.urandom(30), True)
    for bad in (b"", b"\x80" * 11, b"\x80" * 65535):
        with pytest.raises(ValueError):
            s.protect(bad)
    with pytest.raises(TypeError):
        s.protect("not bytes")
    with pytest.raises(RuntimeError):
        m.Srtp.__new__(m.Srtp).protect(b"\x80" * 20)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=1600))
def test_garbage_never_crashes_unprotect(data: bytes) -> None:
    m = native.module()
    rx = m.Srtp(m.PROFILE_AES128_CM_SHA1_80, b"k" * 30, False)
    for op in (rx.unprotect, rx.unprotect_rtcp):
        # SrtpError is a ValueError; a packet too short to be one is refused the same way.
        with contextlib.suppress(ValueError):
            op(data)
