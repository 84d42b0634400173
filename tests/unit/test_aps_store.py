"""The reference AP-S's SQLite store, against a real database file."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from appliance.core.token_file import TokenFileError, load_or_create_token, read_token
from reference_aps import store as store_module
from reference_aps.store import (
    ROOMKEY_MAX,
    ROOMKEY_MIN,
    IdentityBlocked,
    LiveElsewhere,
    Store,
    VerifyRequest,
    new_roomkey,
)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    s = Store(tmp_path / "data" / "aps" / "aps.sqlite3", clock=clock)
    yield s
    s.close()


def request(
    appliance_id: str = "ms-1", dialogid: int = 13290721, ref: int = 2392510, **kw: object
) -> VerifyRequest:
    fields: dict[str, object] = {
        "appliance_id": appliance_id,
        "channel": 4,
        "dialogid": dialogid,
        "ref": ref,
        "caller": 5678,
        "callee": 9333,
        "identity": "A123456789",
        "module": "User",
    }
    fields.update(kw)
    return VerifyRequest(**fields)  # type: ignore[arg-type]


def test_creates_parent_dirs_schema_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "aps.sqlite3"
    s = Store(path)
    s.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"calls", "blocked_identities"} <= tables
        columns = [r[1] for r in db.execute("PRAGMA table_info(calls)")]
        assert columns == list(store_module.CALL_COLUMNS)
    finally:
        db.close()


def test_new_roomkey_is_twelve_digits() -> None:
    keys = [new_roomkey() for _ in range(1000)]
    assert all(ROOMKEY_MIN <= k <= ROOMKEY_MAX and len(str(k)) == 12 for k in keys)


def test_roomkeys_unique_random_not_sequential(store: Store) -> None:
    keys = [store.verify(request(dialogid=i, ref=i)).roomkey for i in range(200)]
    assert len(set(keys)) == 200
    assert all(10**11 <= k < 10**12 for k in keys)
    assert keys != sorted(keys) and keys != sorted(keys, reverse=True)
    steps = {b - a for a, b in pairwise(keys)}
    assert len(steps) > 100  # no fixed stride
    # Spread over the whole range, as uniform draws are; a counter would cluster.
    assert max(keys) - min(keys) > 10**11


def test_roomkey_collision_draws_again(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([111_111_111_111, 111_111_111_111, 222_222_222_222])
    monkeypatch.setattr(store_module, "new_roomkey", lambda: next(draws))
    first = store.verify(request(dialogid=1))
    second = store.verify(request(dialogid=2))
    assert (first.roomkey, second.roomkey) == (111_111_111_111, 222_222_222_222)


def test_verify_is_idempotent_while_live(store: Store) -> None:
    first = store.verify(request())
    again = store.verify(request())
    assert first.created and not again.created
    assert again.roomkey == first.roomkey
    assert len(store.recent_calls(10)) == 1


def test_retry_key_includes_appliance_and_ref(store: Store) -> None:
    a = store.verify(request(appliance_id="ms-1")).roomkey
    b = store.verify(request(appliance_id="ms-2")).roomkey
    c = store.verify(request(appliance_id="ms-1", ref=1)).roomkey
    assert len({a, b, c}) == 3


def test_reused_dialog_ids_after_the_call_ended_get_a_new_roomkey(store: Store) -> None:
    old = store.verify(request()).roomkey
    assert store.released(old, 1.0, 16, "normal release")
    new = store.verify(request())
    assert new.created and new.roomkey != old


def test_duplicate_login_on_another_appliance(store: Store) -> None:
    old = store.verify(request(appliance_id="ms-1", dialogid=1)).roomkey
    outcome = store.verify(request(appliance_id="ms-2", dialogid=2))
    assert outcome.duplicate == LiveElsewhere(appliance_id="ms-1", roomkey=old)
    assert outcome.roomkey != old
    assert store.get_call(outcome.roomkey)["live"] == 1  # type: ignore[index]


def test_no_duplicate_on_same_appliance_or_other_identity(store: Store) -> None:
    store.verify(request(appliance_id="ms-1", dialogid=1))
    assert store.verify(request(appliance_id="ms-1", dialogid=2)).duplicate is None
    other = request(appliance_id="ms-2", dialogid=3, identity="B987654321")
    assert store.verify(other).duplicate is None


def test_no_duplicate_after_old_call_released(store: Store) -> None:
    old = store.verify(request(appliance_id="ms-1", dialogid=1)).roomkey
    store.released(old, 5.0, 16, "normal release")
    assert store.verify(request(appliance_id="ms-2", dialogid=2)).duplicate is None


def test_blocked_identity_is_refused(store: Store) -> None:
    store.block("A123456789")
    assert store.is_blocked("A123456789")
    with pytest.raises(IdentityBlocked):
        store.verify(request())
    assert store.recent_calls(10) == []
    store.unblock("A123456789")
    assert store.verify(request()).created


def test_call_detail_record_lifecycle(store: Store, clock: FakeClock) -> None:
    roomkey = store.verify(request()).roomkey
    assert store.answered(roomkey, 1_700_000_010.5)
    assert store.set_record_file(roomkey, "audio/20200405/13290723392510_004.wav")
    assert store.released(roomkey, 1_700_000_100.0, 16, "normal release")
    # A retried report must not overwrite the first one.
    assert store.released(roomkey, 1_700_000_999.0, 41, "other")
    clock.now = 1_700_000_105.0
    assert store.end_call(roomkey, "")  # "" must not erase the RecordFile name
    row = store.get_call(roomkey)
    assert row is not None
    assert row["verified_at"] == 1_700_000_000.0
    assert row["answered_at"] == 1_700_000_010.5
    assert (row["ended_at"], row["cause"], row["causestring"]) == (
        1_700_000_100.0,
        16,
        "normal release",
    )
    assert row["record_file"] == "audio/20200405/13290723392510_004.wav"
    assert row["endcall_at"] == 1_700_000_105.0
    assert row["live"] == 0
    assert (row["appliance_id"], row["dialogid"], row["ref"], row["channel"]) == (
        "ms-1",
        13290721,
        2392510,
        4,
    )
    assert (row["caller"], row["callee"], row["identity"], row["module"]) == (
        5678,
        9333,
        "A123456789",
        "User",
    )


def test_end_call_without_release_ends_the_call(store: Store, clock: FakeClock) -> None:
    roomkey = store.verify(request()).roomkey
    clock.now += 60
    assert store.end_call(roomkey, "video/x.mp4")
    row = store.get_call(roomkey)
    assert row is not None
    assert (row["ended_at"], row["endcall_at"], row["live"]) == (clock.now, clock.now, 0)
    assert row["record_file"] == "video/x.mp4"


def test_end_call_unrecorded_stores_empty_record_file(store: Store) -> None:
    roomkey = store.verify(request()).roomkey
    assert store.end_call(roomkey, "")
    assert store.get_call(roomkey)["record_file"] == ""  # type: ignore[index]


def test_unknown_roomkey_reports_false(store: Store) -> None:
    assert not store.answered(5, 1.0)
    assert not store.released(5, 1.0, 16, "normal release")
    assert not store.set_record_file(5, "x")
    assert not store.end_call(5, "")
    assert store.get_call(5) is None


def test_recent_calls_newest_first_and_limited(store: Store) -> None:
    keys = [store.verify(request(dialogid=i)).roomkey for i in range(5)]
    assert [c["roomkey"] for c in store.recent_calls(3)] == keys[::-1][:3]


def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "aps.sqlite3"
    first = Store(path)
    roomkey = first.verify(request()).roomkey
    first.block("Z999")
    first.close()
    second = Store(path)
    try:
        assert second.get_call(roomkey) is not None
        assert second.is_blocked("Z999")
    finally:
        second.close()


# -- file modes (finding 13: national IDs on disk) -----------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_database_and_its_journals_are_private(tmp_path: Path, umask: int) -> None:
    db = tmp_path / "new" / "aps" / "aps.sqlite3"
    old = os.umask(umask)
    try:
        s = Store(db)
        s.verify(request())
        s.block("B1")
        files = {p.name: _mode(p) for p in db.parent.iterdir()}
        s.close()
    finally:
        os.umask(old)
    assert files == {"aps.sqlite3": 0o600, "aps.sqlite3-wal": 0o600, "aps.sqlite3-shm": 0o600}
    assert _mode(db.parent) == 0o700 and _mode(db.parent.parent) == 0o700


def test_a_world_readable_database_is_tightened_before_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "aps.sqlite3"
    Store(db).close()
    for p in tmp_path.iterdir():
        p.chmod(0o644)  # as older versions left it
    s = Store(db)
    s.verify(request())
    s.close()
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {"aps.sqlite3": 0o600}
    assert "readable by group/others (mode 0644); now 0600" in caplog.text


# -- token files -------------------------------------------------------------------------------


def test_token_file_is_created_private_and_random(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "api-token"
    old = os.umask(0o000)
    try:
        token = load_or_create_token(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert len(token) >= 40 and token == path.read_text().strip()
    assert load_or_create_token(path) == token  # kept across starts
    assert load_or_create_token(tmp_path / "other") != token
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    path.write_text("sekrit\n")
    path.chmod(0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == "sekrit"


@pytest.mark.parametrize("content", [b"", b"  \n", b"two words", b"\xff\xfe", b"x" * 5000])
def test_unusable_token_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "api-token"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(TokenFileError):
        read_token(path)


def test_missing_or_symlinked_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="no token file"):
        read_token(tmp_path / "absent")
    target = tmp_path / "target"
    target.write_text("t")
    target.chmod(0o600)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(TokenFileError):
        read_token(tmp_path / "link")
