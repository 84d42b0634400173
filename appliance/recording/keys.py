"""The deployment's recording master secret: 32 random bytes, the root of every recording key.

A roomkey is a 12-digit number the customer's AP-S hands out; it identifies the recording but is
far too guessable to be a key. The real key of each file is derived from this secret (see
crypto.py), so whoever holds the secret file holds every recording: it is created 0600 and a
key file that anyone but its owner can read is refused rather than silently used.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from appliance.core.private_files import (
    create_secret_once,
    read_private,
)

MASTER_LEN = 32


class MasterKeyError(Exception):
    """The master secret is missing, malformed or not protected well enough."""


def default_key_path(config_path: str | None = None) -> Path:
    """The key file the appliance's config names ([recording] master_key_file, or the default
    under data_dir): what `appliance decrypt`/`convert` use without --key-file."""
    from appliance.core import config as cfg  # here: the offline tools need no config otherwise

    try:
        return cfg.load(config_path).master_key_path
    except cfg.ConfigError as exc:
        raise MasterKeyError(str(exc)) from None


def master_from_hex(text: str) -> bytes:
    """A master secret given as 64 hex digits (e.g. from the config file or a vault)."""
    try:
        master = bytes.fromhex(text.strip())
    except ValueError:
        raise MasterKeyError("the recording master secret must be hex digits") from None
    if len(master) != MASTER_LEN:
        raise MasterKeyError(
            f"the recording master secret must be {MASTER_LEN} bytes ({2 * MASTER_LEN} hex "
            f"digits), got {len(master)} bytes"
        )
    return master


def load_master(path: Path) -> bytes:
    """Read an existing key file; never creates one (decrypting with a fresh key is pointless)."""
    data = read_private(path, MASTER_LEN, "recording key file", MasterKeyError)
    if len(data) != MASTER_LEN:
        raise MasterKeyError(
            f"recording key file {path} must hold exactly {MASTER_LEN} bytes, "
            f"it holds {'more' if len(data) > MASTER_LEN else len(data)}"
        )
    return data


def load_or_create_master(path: Path) -> bytes:
    """The master secret at `path`, generated on first use.

    Call this once at appliance start-up (so a bad key file stops the service early); the
    offline tools (`appliance decrypt`, `appliance convert`) use load_master and never create.
    """
    if not os.path.lexists(path):
        create_secret_once(path, secrets.token_bytes(MASTER_LEN))
    return load_master(path)
