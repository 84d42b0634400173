"""Secrets stay off disk (issue 10, finding 13): the effective config is 0600 and has none."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import msgspec
import pytest

from appliance.core import config as cfg
from appliance.core import config_secrets
from supervisor.main import prepare_data_dir

PASSWORD = "pa55-w0rd-nobody-may-read"


def config_with_password(tmp_path: Path) -> cfg.Config:
    return cfg.from_dict({
        "appliance": {"data_dir": str(tmp_path / "data")},
        "sip": {"username": "agent7", "password": PASSWORD},
    })


def test_split_takes_every_secret_out_and_merge_puts_it_back(tmp_path: Path) -> None:
    config = config_with_password(tmp_path)
    public, secrets = config_secrets.split(config)
    assert PASSWORD not in msgspec.json.encode(public).decode()
    assert "password" not in public["sip"] and public["sip"]["username"] == "agent7"
    assert secrets == {"sip": {"password": PASSWORD}}
    line = config_secrets.encode_line(secrets)
    again = config_secrets.merge(public, config_secrets.read_line(io.BytesIO(line)))
    assert again == config


def test_a_turn_credential_is_a_secret_too(tmp_path: Path) -> None:
    config = cfg.from_dict({"media": {"ice_servers": [
        {"urls": "turn:turn.example:3478", "username": "u", "credential": PASSWORD}]}})
    public, secrets = config_secrets.split(config)
    assert PASSWORD not in msgspec.json.encode(public).decode()
    assert secrets["media"]["ice_servers"][0]["credential"] == PASSWORD
    assert config_secrets.merge(public, secrets) == config


def test_no_secret_set_means_nothing_to_hand_over(tmp_path: Path) -> None:
    public, secrets = config_secrets.split(cfg.Config())
    assert secrets == {}
    # A worker started without a secrets line (stdin empty) still gets a whole config.
    assert config_secrets.merge(public, config_secrets.read_line(io.BytesIO(b""))) == \
        cfg.Config()


def test_every_listed_secret_is_a_config_field() -> None:
    # A typo in config.SECRETS would silently leave that secret in the file.
    full = msgspec.to_builtins(cfg.Config())
    for path in cfg.SECRETS:
        node = full
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, path
            node = node[part]


def test_a_secrets_line_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError):
        config_secrets.read_line(io.BytesIO(b"[1, 2]\n"))


def test_the_effective_config_is_private_from_its_first_byte(tmp_path: Path) -> None:
    config = config_with_password(tmp_path)
    old = os.umask(0)  # a permissive umask must not widen anything
    try:
        path = Path(prepare_data_dir(config))
        # A second start over an existing layout (e.g. an old 0755 run/) tightens it.
        os.chmod(config.data_path / "run", 0o755)
        path = Path(prepare_data_dir(config))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for sub in ("run", "tls"):
        assert stat.S_IMODE((config.data_path / sub).stat().st_mode) == 0o700, sub
    assert PASSWORD.encode() not in path.read_bytes()
    public = msgspec.json.decode(path.read_bytes())
    assert public["sip"]["username"] == "agent7"
    assert not list((config.data_path / "run").glob("*.tmp"))
