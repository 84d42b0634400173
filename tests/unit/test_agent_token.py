"""The agent token: issued by AP-S, checked by the appliance without a round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.core.agent_token import MAX_TOKEN_CHARS, TokenRefused, check, issue

SECRET = b"s" * 32


def test_issued_token_admits_its_room_until_it_expires() -> None:
    token = issue(SECRET, 123456789012, now=1000.0, ttl_s=600)
    assert len(token) <= MAX_TOKEN_CHARS
    check(SECRET, 123456789012, token, now=1599.0)
    with pytest.raises(TokenRefused, match="expired"):
        check(SECRET, 123456789012, token, now=1601.0)


@pytest.mark.parametrize(
    ("roomkey", "secret", "why"),
    [(123456789013, SECRET, "does not match"), (123456789012, b"other", "does not match")],
)
def test_token_is_bound_to_room_and_secret(roomkey: int, secret: bytes, why: str) -> None:
    token = issue(SECRET, 123456789012, now=1000.0, ttl_s=600)
    with pytest.raises(TokenRefused, match=why):
        check(secret, roomkey, token, now=1001.0)


def test_forged_expiry_is_refused() -> None:
    token = issue(SECRET, 1, now=1000.0, ttl_s=60)
    _, mac = token.split(".")
    with pytest.raises(TokenRefused, match="does not match"):
        check(SECRET, 1, f"99999999.{mac}", now=1001.0)


@pytest.mark.parametrize("token", ["", "abc", "12.", ".x", "١٢.x", "1" * 13 + ".x", "x" * 65])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(TokenRefused):
        check(SECRET, 1, token, now=0.0)


@given(st.text(max_size=80))
def test_any_text_is_refused_cleanly(token: str) -> None:
    with pytest.raises(TokenRefused):
        check(SECRET, 1, token, now=0.0)
