"""SQLite storage of the reference AP-S: call-detail records and blocked identities.

Pure storage, no HTTP: the aiohttp layer in ``server.py`` validates requests and calls
these methods. Every method is one short transaction, so calling them synchronously
from an event-loop handler is acceptable at the scale of one call centre.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.private_files import makedirs_private

log = logging.getLogger("appliance.aps")

# Roomkeys are 12 decimal digits: long enough that guessing a live one (to join a
# stranger's video as "Agent") is hopeless, short enough to fit in a URL and a SIP header.
ROOMKEY_MIN = 10**11
ROOMKEY_MAX = 10**12 - 1  # inclusive
_ROOMKEY_TRIES = 32  # collisions in a 9e11 space are rare; 32 misses means something is wrong

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    roomkey      INTEGER NOT NULL UNIQUE,
    appliance_id TEXT    NOT NULL,
    dialogid     INTEGER NOT NULL,
    ref          INTEGER NOT NULL,
    channel      INTEGER,
    caller       INTEGER,
    callee       INTEGER,
    identity     TEXT    NOT NULL,
    module       TEXT    NOT NULL,
    verified_at  REAL    NOT NULL,
    answered_at  REAL,
    ended_at     REAL,
    cause        INTEGER,
    causestring  TEXT,
    record_file  TEXT,
    endcall_at   REAL,
    live         INTEGER NOT NULL DEFAULT 1 CHECK (live IN (0, 1))
);
-- Duplicate-login lookups only ever look at live calls.
CREATE INDEX IF NOT EXISTS calls_live_identity ON calls (identity) WHERE live = 1;
-- Idempotent verify looks a call up by the appliance's own call identifiers.
CREATE INDEX IF NOT EXISTS calls_dialog ON calls (appliance_id, dialogid, ref);
CREATE TABLE IF NOT EXISTS blocked_identities (
    identity TEXT PRIMARY KEY
);
"""

CALL_COLUMNS: tuple[str, ...] = (
    "id",
    "roomkey",
    "appliance_id",
    "dialogid",
    "ref",
    "channel",
    "caller",
    "callee",
    "identity",
    "module",
    "verified_at",
    "answered_at",
    "ended_at",
    "cause",
    "causestring",
    "record_file",
    "endcall_at",
    "live",
)
_SELECT_CALLS = f"SELECT {', '.join(CALL_COLUMNS)} FROM calls"


class IdentityBlocked(Exception):
    """The identity is in ``blocked_identities``; verify must refuse it."""


@dataclass(frozen=True, slots=True)
class VerifyRequest:
    appliance_id: str
    channel: int
    dialogid: int
    ref: int
    caller: int | None
    callee: int | None
    identity: str
    module: str


@dataclass(frozen=True, slots=True)
class LiveElsewhere:
    """The same identity's live call on another appliance (Flow 3, duplicate login)."""

    appliance_id: str
    roomkey: int


@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    roomkey: int
    created: bool  # False when this was a retry of a verify already answered
    duplicate: LiveElsewhere | None


def _prepare_private_db(path: Path) -> None:
    """Create the database file 0600 (national IDs, live roomkeys) before SQLite opens it.

    SQLite gives its -wal and -shm files the mode of the database file, whatever the umask,
    so a 0600 database keeps its journals private too. A database left 0644 by an older
    version is tightened here, before any new record is written to it.
    """
    makedirs_private(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        for name in (path, path.with_name(path.name + "-wal"),
                     path.with_name(path.name + "-shm")):
            _make_private(name)
    else:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.close(fd)


def _make_private(path: Path) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        log.warning("%s was readable by group/others (mode %04o); now 0600", path, mode)
        os.chmod(path, 0o600)


def new_roomkey() -> int:
    """A uniformly random 12-digit roomkey from the OS CSPRNG (never sequential)."""
    return ROOMKEY_MIN + secrets.randbelow(ROOMKEY_MAX - ROOMKEY_MIN + 1)


class Store:
    """One SQLite connection to the AP-S database (created on first use)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        _prepare_private_db(self.path)
        self._clock = clock
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so that the
        # check-then-insert in verify() cannot interleave with another writer process.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        # WAL lets integrators read the CDR (sqlite3 CLI, /cdr) while calls are written;
        # synchronous=NORMAL is durable enough under WAL and keeps commits cheap.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Short: the server calls us on its event loop, a long lock wait would stall it.
        self._db.execute("PRAGMA busy_timeout=1000")
        self._db.executescript(SCHEMA)
        # WAL mode has now created -wal and -shm with the database file's own mode (0600).
        _make_private(self.path.with_name(self.path.name + "-wal"))
        _make_private(self.path.with_name(self.path.name + "-shm"))

    def close(self) -> None:
        self._db.close()

    # -- blocked identities -------------------------------------------------------------

    def block(self, identity: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO blocked_identities (identity) VALUES (?)", (identity,)
        )

    def unblock(self, identity: str) -> None:
        self._db.execute("DELETE FROM blocked_identities WHERE identity = ?", (identity,))

    def is_blocked(self, identity: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM blocked_identities WHERE identity = ?", (identity,)
        ).fetchone()
        return row is not None

    # -- verify -------------------------------------------------------------------------

    def verify(self, req: VerifyRequest) -> VerifyOutcome:
        """Issue (or re-issue, on a retry) the roomkey for a call.

        Raises IdentityBlocked for a blocked identity.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            outcome = self._verify_locked(req)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return outcome

    def _verify_locked(self, req: VerifyRequest) -> VerifyOutcome:
        if self.is_blocked(req.identity):
            raise IdentityBlocked(req.identity)
        duplicate = self._live_elsewhere(req.identity, req.appliance_id)
        existing = self._find_retry(req)
        if existing is not None:
            return VerifyOutcome(roomkey=existing, created=False, duplicate=duplicate)
        roomkey = self._insert_call(req)
        return VerifyOutcome(roomkey=roomkey, created=True, duplicate=duplicate)

    def _find_retry(self, req: VerifyRequest) -> int | None:
        # The appliance's client retries verify when an answer is lost; the retry carries
        # the same (appliance_id, dialogid, ref) and userdata. Only a *live* call matches:
        # browsers may reuse small dialogid/ref counters across page loads, and a new call
        # must never inherit an old call's roomkey (it is the recording's encryption key).
        row = self._db.execute(
            "SELECT roomkey FROM calls WHERE appliance_id = ? AND dialogid = ? AND ref = ?"
            " AND identity = ? AND live = 1 ORDER BY id DESC LIMIT 1",
            (req.appliance_id, req.dialogid, req.ref, req.identity),
        ).fetchone()
        return None if row is None else int(row["roomkey"])

    def _live_elsewhere(self, identity: str, appliance_id: str) -> LiveElsewhere | None:
        # A second live call on the *same* appliance is not a duplicate login: that
        # appliance already knows about both calls.
        row = self._db.execute(
            "SELECT appliance_id, roomkey FROM calls WHERE identity = ? AND live = 1"
            " AND appliance_id <> ? ORDER BY id DESC LIMIT 1",
            (identity, appliance_id),
        ).fetchone()
        if row is None:
            return None
        return LiveElsewhere(appliance_id=row["appliance_id"], roomkey=int(row["roomkey"]))

    def _insert_call(self, req: VerifyRequest) -> int:
        for _ in range(_ROOMKEY_TRIES):
            roomkey = new_roomkey()
            try:
                self._db.execute(
                    "INSERT INTO calls (roomkey, appliance_id, dialogid, ref, channel, caller,"
                    " callee, identity, module, verified_at, live)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                    (
                        roomkey,
                        req.appliance_id,
                        req.dialogid,
                        req.ref,
                        req.channel,
                        req.caller,
                        req.callee,
                        req.identity,
                        req.module,
                        self._clock(),
                    ),
                )
            except sqlite3.IntegrityError:
                continue  # roomkey collision (UNIQUE): draw again
            return roomkey
        raise RuntimeError(f"no free roomkey after {_ROOMKEY_TRIES} draws")

    # -- call reports -------------------------------------------------------------------

    def answered(self, roomkey: int, at: float) -> bool:
        """Record the agent's answer; False for an unknown roomkey. First report wins."""
        cur = self._db.execute(
            "UPDATE calls SET answered_at = COALESCE(answered_at, ?) WHERE roomkey = ?",
            (at, roomkey),
        )
        return cur.rowcount > 0

    def released(self, roomkey: int, at: float, cause: int | None, causestring: str | None) -> bool:
        """Record the hang-up and end the call's liveness; False for an unknown roomkey.

        COALESCE keeps the first report, so a retried CallEvent changes nothing.
        """
        cur = self._db.execute(
            "UPDATE calls SET ended_at = COALESCE(ended_at, ?), cause = COALESCE(cause, ?),"
            " causestring = COALESCE(causestring, ?), live = 0 WHERE roomkey = ?",
            (at, cause, causestring, roomkey),
        )
        return cur.rowcount > 0

    def set_record_file(self, roomkey: int, record_file: str) -> bool:
        cur = self._db.execute(
            "UPDATE calls SET record_file = ? WHERE roomkey = ?", (record_file, roomkey)
        )
        return cur.rowcount > 0

    def end_call(self, roomkey: int, record_file: str) -> bool:
        """EndCall: the appliance is done with the call (after any recording)."""
        now = self._clock()
        # An empty record_file means "not recorded"; it must not erase a name that an
        # earlier RecordFile report stored.
        cur = self._db.execute(
            "UPDATE calls SET endcall_at = COALESCE(endcall_at, ?),"
            " record_file = COALESCE(NULLIF(?, ''), record_file, ''),"
            " ended_at = COALESCE(ended_at, ?), live = 0 WHERE roomkey = ?",
            (now, record_file, now, roomkey),
        )
        return cur.rowcount > 0

    # -- reading ------------------------------------------------------------------------

    def get_call(self, roomkey: int) -> dict[str, Any] | None:
        row = self._db.execute(f"{_SELECT_CALLS} WHERE roomkey = ?", (roomkey,)).fetchone()
        return None if row is None else dict(row)

    def recent_calls(self, limit: int) -> list[dict[str, Any]]:
        rows = self._db.execute(f"{_SELECT_CALLS} ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(row) for row in rows]
