"""Capture files as the media worker writes them: exclusive, locked, durable at every flush.

The writers are used while the call runs, so they are built for a process that may be killed
at any moment: every write goes straight to the kernel (no user-space buffer to lose), and
`flush()` also rewrites the header's sizes and fsyncs. A writer holds an exclusive flock on
its file; the Convertor refuses a capture whose lock is still held (its worker is alive and
writing). Every file is created O_EXCL with mode 0600: captures are plaintext recordings of a
call, and an existing file (another call's) is never overwritten or appended to.

The formats themselves live in wav.py and ivf.py; layouts: docs/recording-format.md.
"""

from __future__ import annotations

import fcntl
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Self

from appliance.core.private_files import create_private, makedirs_private

# Both formats keep sizes and counts in 32-bit header fields: past this they are clamped.
U32_MAX = 0xFFFFFFFF


class CaptureFormatError(Exception):
    """A capture file that is not in the expected format and cannot be repaired."""


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until all of `data` is in the kernel (a write may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_capture(path: Path) -> int:
    makedirs_private(path.parent)
    fd = create_private(path)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written": see the module doc
    return fd


def try_lock_capture(path: Path) -> int | None:
    """Lock a capture for repair/conversion: an open descriptor, or None if a writer holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class CaptureFile(ABC):
    """An incrementally written capture: its header is rewritten (sizes, counts) on every
    flush and at close. flush() may run in another thread than the writes (pwrite does not
    move the write position); the lock keeps it apart from close()."""

    def __init__(self, path: Path, header: bytes) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = _open_capture(path)
        write_all(self._fd, header)

    @abstractmethod
    def _rewrite_header(self, fd: int) -> None:
        """Bring the header's sizes and counts up to what has been written."""

    def flush(self) -> None:
        """Make everything written so far durable and readable with a correct header."""
        with self._lock:
            fd = self._require_open()
            self._rewrite_header(fd)
            os.fsync(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                self._rewrite_header(fd)
                os.fsync(fd)
            finally:
                os.close(fd)  # also releases the flock: the Convertor may take the file now

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
