"""The notice channel between appliances, in one process over loopback TCP."""

from __future__ import annotations

import io
import logging
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from zmq.utils import z85

from appliance.core import config
from supervisor.peer_keys import load_or_create, main_peer_key
from supervisor.peers import (
    DELIVERED,
    REFUSED,
    UNKNOWN_ROOMKEY,
    DuplicateLoginNotice,
    NoticeStats,
    PeerAuthenticator,
    Peers,
    send_notice,
)


def _free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keypair_is_created_private_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "peers" / "ms-1.key_secret"
    first = load_or_create(path, "ms-1")
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create(path, "ms-1") == first
    assert zmq.curve_public(first.secret) == first.public


def test_peer_key_command_prints_the_public_key(tmp_path: Path) -> None:
    conf = tmp_path / "a.toml"
    conf.write_text(f'[appliance]\nid = "ms-7"\ndata_dir = "{tmp_path}"\n')
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main_peer_key(["--config", str(conf)]) == 0
    keys = load_or_create(tmp_path / "peers" / "ms-7.key_secret", "ms-7")
    assert out.getvalue().strip() == keys.public.decode()
    with redirect_stderr(io.StringIO()):
        assert main_peer_key(["--config", str(tmp_path / "missing.toml")]) == 1


def test_a_peer_without_a_usable_key_is_a_config_error() -> None:
    with pytest.raises(config.ConfigError, match="40-character Z85"):
        config.from_dict({"peers": {"peers": {"ms-2": {"endpoint": "tcp://x:1",
                                                       "public_key": "short"}}}})
    with pytest.raises(config.ConfigError, match="endpoint is missing"):
        config.from_dict({"peers": {"peers": {"ms-2": {"public_key": "a" * 40}}}})


async def test_notices_are_acknowledged_and_a_borrowed_name_is_refused(
    tmp_path: Path,
) -> None:
    k2 = load_or_create(tmp_path / "b" / "peers" / "ms-2.key_secret", "ms-2")
    k1 = load_or_create(tmp_path / "a" / "peers" / "ms-1.key_secret", "ms-1")
    endpoint = f"tcp://127.0.0.1:{_free_tcp_port()}"
    delivered: list[tuple[int, str, str]] = []

    def deliver(roomkey: int, message: str, from_ms: str) -> str:
        delivered.append((roomkey, message, from_ms))
        return DELIVERED if roomkey == 1 else UNKNOWN_ROOMKEY

    ms1 = Peers(config.from_dict({
        "appliance": {"id": "ms-1", "data_dir": str(tmp_path / "a")},
        "peers": {"listen": endpoint,
                  "peers": {"ms-2": {"endpoint": "tcp://127.0.0.1:1",
                                     "public_key": k2.public.decode()}}},
    }), deliver)
    ms2 = Peers(config.from_dict({
        "appliance": {"id": "ms-2", "data_dir": str(tmp_path / "b")},
        "peers": {"timeout": 2.0,
                  "peers": {"ms-1": {"endpoint": endpoint, "public_key": k1.public.decode()}}},
    }), lambda *_: DELIVERED)
    ms1.start()
    ms2.start()
    try:
        await ms2.notify("ms-1", 1, "x" * 200)  # cut to the protocol's 128 bytes at MS-1
        await ms2.notify("ms-1", 2, "gone")  # an answered notice, not a failure
        await ms2.notify("ms-9", 1, "nobody")  # not in [peers]: counted as a failure
        assert delivered == [(1, "x" * 128, "ms-2"), (2, "gone", "ms-2")]
        assert (ms2.stats.sent, ms2.stats.failures, ms1.stats.received) == (2, 1, 2)
        # A configured peer cannot speak in another appliance's name.
        ack = await send_notice(ms2._ctx, k2, ms2.config.peers["ms-1"],  # type: ignore[arg-type]
                                DuplicateLoginNotice("ms-3", 1, "spoof"), 2.0)
        assert ack.status == REFUSED
        assert len(delivered) == 2
    finally:
        ms1.close()
        ms2.close()


def test_refusals_of_strangers_keys_are_bounded_in_memory_and_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Keys come from whoever connects: a flood of new keys grows no table without bound
    and writes at most REFUSAL_LINES lines per interval; one key is logged once."""
    ctx = zmq.asyncio.Context()
    try:
        zap = PeerAuthenticator(ctx, {}, tmp_path / "certs", NoticeStats())
        caplog.set_level(logging.WARNING, logger="appliance.peers")
        for n in range(5000):
            zap._note_refusal(z85.encode(n.to_bytes(32, "big")), "127.0.0.9")
        for _ in range(3):
            zap._note_refusal(z85.encode((7).to_bytes(32, "big")), "127.0.0.9")
        lines = [r for r in caplog.records if "refused a peer notice" in r.getMessage()]
        assert len(lines) == PeerAuthenticator.REFUSAL_LINES
        assert len(zap._refusal_logged) <= PeerAuthenticator.MAX_KEYS_REMEMBERED
        assert zap.stats.keys_refused == 5003
    finally:
        ctx.term()
