"""Files that hold secrets or plaintext recordings: created 0600 and exclusive, read only
when private, directories 0700, renames made durable.

Used by every library that keeps something private on disk: the recording captures and
keys, the AP-S and agent token files, the effective config.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def create_private(path: Path) -> int:
    """A new file, mode 0600, failing if the name exists; returns a write-only descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)


def read_private(path: Path, limit: int, what: str, error: type[Exception]) -> bytes:
    """At most `limit` + 1 bytes of an existing secret file, refused (raising `error` with a
    message naming `what`) if it is missing, not a regular file, a symlink, or readable by
    group or others. O_NOFOLLOW + fstat on the open descriptor: the file checked is the
    file read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"no {what} at {path}") from None
    except OSError as exc:
        raise error(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise error(
                f"{what} {path} is accessible by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def makedirs_private(directory: Path) -> None:
    """mkdir -p where every directory we create is 0700 (mkdir's mode covers only the leaf)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)  # exist_ok: another worker may race us


def fsync_dir(directory: Path) -> None:
    """Make a rename/create in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_secret_once(path: Path, data: bytes) -> None:
    """Put `data` at `path` (0600, its directories 0700) unless the name exists already.

    The whole secret goes to a private temp file first, then link() puts it into place:
    link fails if the name exists, so two processes starting together agree on one secret
    (the loser's is dropped) and nobody ever reads a half-written file. O_EXCL + 0600: never
    readable by others, even briefly.
    """
    makedirs_private(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = create_private(tmp)
    try:
        os.fchmod(fd, 0o600)  # a restrictive umask may have removed our own read bit
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process won the race: use its secret
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
