"""The agent's credential: a short-lived token AP-S issues with the roomkey.

Without it the roomkey is the only thing that admits an agent leg, and a roomkey can be
guessed or read over a shoulder. An integrator who sets a shared secret on both sides
(`[aps] agent_token_secret_file` here, the same secret in AP-S) makes the appliance refuse
an agent offer whose `token` is missing, forged, for another room, or expired.

The token is stateless, so the appliance needs no round trip to AP-S to check it:

    token = "<expires>.<mac>"
    expires = Unix time (seconds, decimal) after which the token is refused
    mac     = base64url, unpadded, of HMAC-SHA256(secret, "agent:<roomkey>:<expires>")

It is at most 60 characters, well inside the protocol's 128-byte value limit.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

MAX_TOKEN_CHARS = 64
MAX_LIFETIME_S = 7 * 24 * 3600  # a token claiming a longer life than this is refused


class TokenRefused(Exception):
    """Why an agent token does not admit the leg (names the problem, never the secret)."""


def _mac(secret: bytes, roomkey: int, expires: int) -> str:
    digest = hmac.new(secret, f"agent:{roomkey}:{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(secret: bytes, roomkey: int, now: float, ttl_s: float) -> str:
    """A token admitting the agent leg of `roomkey` until `now + ttl_s`."""
    if not secret:
        raise ValueError("an agent token needs a non-empty secret")
    expires = int(now + ttl_s)
    return f"{expires}.{_mac(secret, roomkey, expires)}"


def check(secret: bytes, roomkey: int, token: str, now: float) -> None:
    """Raise `TokenRefused` unless `token` admits the agent leg of `roomkey` at `now`."""
    if not token:
        raise TokenRefused("missing agent token")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenRefused("agent token too long")
    expires_text, dot, mac = token.partition(".")
    if not dot or not expires_text.isascii() or not expires_text.isdigit() \
            or len(expires_text) > 12:
        raise TokenRefused("malformed agent token")
    expires = int(expires_text)
    # Compare the MAC first, in constant time, so the answer says nothing about the secret.
    if not hmac.compare_digest(mac.encode(), _mac(secret, roomkey, expires).encode()):
        raise TokenRefused("agent token does not match this roomkey")
    if expires < now:
        raise TokenRefused("agent token expired")
    if expires > now + MAX_LIFETIME_S:
        raise TokenRefused("agent token lifetime too long")
