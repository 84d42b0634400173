"""Secrets of the config never go to disk: split them off the effective config, hand them over
a pipe.

The workers read the supervisor's effective config from `data_dir/run/effective-config.json`
(so a worker restarted an hour later sees the same config, even if the TOML file changed).
That file would otherwise hold the SIP password in clear. Instead every value listed in
`config.SECRETS` is removed from it, and the supervisor writes those values as one JSON line
to each worker's stdin at spawn; the worker reads that line before anything else.

Why stdin and not a 0600 file removed after reading, or an environment variable: a pipe has
no name anyone else can open, leaves nothing behind when a process is killed at the wrong
moment, and is not readable in /proc/PID/environ or by a child process later.
"""

from __future__ import annotations

from typing import IO, Any

import msgspec

from appliance.core.config import SECRETS, Config

MAX_SECRETS_LINE = 64 * 1024  # what a worker reads from stdin at most


def split(config: Config, paths: tuple[str, ...] = SECRETS) -> tuple[dict[str, Any],
                                                                        dict[str, Any]]:
    """(config without its secrets, the secrets alone), both as nested plain dicts."""
    public = msgspec.to_builtins(config)
    secrets: dict[str, Any] = {}
    for path in paths:
        *parents, leaf = path.split(".")
        node = public
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if value in ("", None, [], {}):
            continue  # not set: the default is no secret either
        target = secrets
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return public, secrets


def merge(public: dict[str, Any], secrets: dict[str, Any]) -> Config:
    """The full config again (what the supervisor had), from the two halves."""
    merged = _deep_merge(public, secrets)
    return msgspec.convert(merged, Config)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def encode_line(secrets: dict[str, Any]) -> bytes:
    return msgspec.json.encode(secrets) + b"\n"


def read_line(stream: IO[bytes]) -> dict[str, Any]:
    """The secrets line from the supervisor; {} when there is none (stdin empty or closed)."""
    line = stream.readline(MAX_SECRETS_LINE)
    if not line.strip():
        return {}
    secrets = msgspec.json.decode(line)
    if not isinstance(secrets, dict):
        raise ValueError("the secrets line on stdin is not a JSON object")
    return secrets
