"""Secrets kept in small files: the AP-S API bearer token and the agent-token secret.

Both sides read the same file (the reference AP-S and the appliance on one box, or a copy
on each): the secret is the file's text with surrounding whitespace removed. A file that
group or others can read is refused, as the recording master key is: whoever reads the API
token reads every call record, whoever reads the agent secret can take any agent's seat.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from appliance.core.private_files import (
    create_secret_once,
    read_private,
)

MAX_TOKEN_BYTES = 4096  # far more than any sane token; bounds what we read


class TokenFileError(Exception):
    """The token file is missing, empty, unreadable or readable by others."""


def read_token(path: Path) -> str:
    """The token in `path`; never creates the file."""
    data = read_private(path, MAX_TOKEN_BYTES, "token file", TokenFileError)
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenFileError(f"token file {path} is longer than {MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"token file {path} must hold ASCII text") from None
    # It travels in an HTTP header: printable, no spaces.
    if not token or not all(33 <= ord(c) < 127 for c in token):
        raise TokenFileError(f"token file {path} must hold one word of printable ASCII")
    return token


def load_or_create_token(path: Path) -> str:
    """The token in `path`, or a new random one written there (0600) on first use."""
    if not os.path.lexists(path):
        create_secret_once(path, (secrets.token_urlsafe(32) + "\n").encode())
    return read_token(path)
