"""This appliance's CURVE keypair for the notice channel between appliances, and the
`appliance peer-key` command that shows operators the public half to exchange.

The secret key lives in a ZeroMQ certificate file (the format `zmq.auth` and czmq read),
mode 0600, created on first use. Peers are configured by public key only, so the secret
never has to leave the box.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from appliance.core import config as cfg

log = logging.getLogger("appliance.peers")


class PeerKeyError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Keypair:
    public: bytes  # Z85, 40 bytes
    secret: bytes  # Z85, 40 bytes


def load_or_create(path: Path, appliance_id: str) -> Keypair:
    """The keypair in `path`, created (0600, in a 0700 directory) when there is none."""
    if not path.exists():
        _create(path, appliance_id)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise PeerKeyError(f"cannot read the peer secret key {path}: {exc}") from None
    if secret is None or len(public) != 40 or len(secret) != 40:
        raise PeerKeyError(f"{path} is not a CURVE secret certificate (no secret-key)")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Like ssh: still usable, but whoever can read it can pose as this appliance.
        log.warning("peer secret key %s is readable by others (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return Keypair(public, secret)


def _create(path: Path, appliance_id: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.curve_keypair()
    text = (
        f"#   ZeroMQ CURVE **Secret** Certificate of appliance {appliance_id}\n"
        "#   Do not give this file to anyone; peers need only the public key\n"
        "#   (`appliance peer-key` prints it).\n\n"
        "metadata\n"
        f'    appliance = "{appliance_id}"\n'
        "curve\n"
        f'    public-key = "{public.decode()}"\n'
        f'    secret-key = "{secret.decode()}"\n'
    )
    # Written to a private temporary name, then linked into place: a concurrent first
    # start (`peer-key` while `run` starts) never reads half a file, and never overwrites
    # a key the other process already created.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        log.info("created this appliance's peer keypair in %s", path)
    finally:
        tmp.unlink(missing_ok=True)


def main_peer_key(argv: list[str] | None = None) -> int:
    """`appliance peer-key [--config FILE]`: print this appliance's public key (Z85),
    creating the keypair on first use. Exit status 0, or 1 with a message on stderr."""
    parser = argparse.ArgumentParser(
        prog="appliance peer-key",
        description="Print this appliance's CURVE public key for the [peers] table of other "
        "appliances (the keypair is created on first use).",
    )
    parser.add_argument("--config", default=None, help="TOML config file (default: built-in)")
    args = parser.parse_args(argv)
    try:
        config = cfg.load(args.config)
        keys = load_or_create(config.peer_secret_key_path(), config.appliance.id)
    except (cfg.ConfigError, PeerKeyError, OSError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    print(keys.public.decode())
    # The hint goes to stderr so that `$(appliance peer-key)` captures the key alone.
    print(f"# public key of appliance {config.appliance.id!r}: on each peer appliance put it in "
          f"[peers.peers.{config.appliance.id}] public_key", file=sys.stderr)
    return 0
