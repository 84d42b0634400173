"""The job file: what the Convertor needs to find, mux, encrypt and clean up one recording.

The media worker writes it before the first capture (a crash always leaves a job behind) and
again at hang-up; the Convertor then records its attempts and outcome in it. Every save is
atomic, so a reader sees the old job or the new one. Fields: docs/recording-format.md,
"The job file".
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

import msgspec

from appliance.core.private_files import create_private, fsync_dir, makedirs_private
from appliance.recording.capture_files import write_all
from appliance.recording.capture_paths import CapturePaths, base_name, capture_paths

JobStatus = Literal["recording", "ended", "converted"]


class JobError(Exception):
    """A job file that cannot be read or written."""


class VideoFiles(msgspec.Struct):
    user: str | None = None  # the customer's camera
    agent: str | None = None  # the agent's PC camera


class Job(msgspec.Struct, kw_only=True):
    version: int = 1
    roomkey: int
    appliance_id: str
    dialogid: int
    ref: int
    channel: int
    started_at: float
    ended_at: float | None = None
    audio: str | None = None  # relative to the recording directory
    video: VideoFiles = msgspec.field(default_factory=VideoFiles)
    status: JobStatus = "recording"
    record_file: str | None = None
    attempts: int = 0
    last_error: str | None = None

    @property
    def base(self) -> str:
        return base_name(self.dialogid, self.ref, self.channel)


def new_job(*, roomkey: int, appliance_id: str, dialogid: int, ref: int, channel: int,
            started_at: float, audio: bool = True, video_user: bool = False,
            video_agent: bool = False) -> tuple[Job, CapturePaths]:
    """A "recording" job naming the standard capture paths the call will write."""
    paths = capture_paths(dialogid, ref, channel, started_at)
    job = Job(roomkey=roomkey, appliance_id=appliance_id, dialogid=dialogid, ref=ref,
              channel=channel, started_at=started_at, audio=paths.audio if audio else None,
              video=VideoFiles(paths.video_user if video_user else None,
                               paths.video_agent if video_agent else None))
    return job, paths


def load_job(path: Path) -> Job:
    try:
        job = msgspec.json.decode(path.read_bytes(), type=Job)
    except OSError as exc:
        raise JobError(f"cannot read job {path}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise JobError(f"invalid job {path}: {exc}") from None
    if job.version != 1:
        raise JobError(f"job {path}: unsupported version {job.version}")
    return job


def save_job(path: Path, job: Job) -> None:
    """Write atomically: readers see the old job or the new one, never half of one."""
    makedirs_private(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = create_private(tmp)
    try:
        write_all(fd, msgspec.json.format(msgspec.json.encode(job)) + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

