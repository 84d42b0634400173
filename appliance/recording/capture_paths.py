"""Where one call's captures, job and final recording live under the recording directory.

Names follow the original's (`<dialogid><ref>_<channel:03d>`), grouped by the local calendar
day the call started; paths are relative to the recording directory, as the job file stores
them, and `resolve_in` turns them back into paths that cannot leave it.
Layout: docs/recording-format.md, "Directory layout".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.recording.capture_files import CaptureFormatError


def base_name(dialogid: int, ref: int, channel: int) -> str:
    """`<dialogid><ref>_<channel:03d>`, the original's naming (e.g. 132907212392510_004)."""
    return f"{dialogid}{ref}_{channel:03d}"


def day_of(timestamp: float) -> str:
    """YYYYMMDD of a Unix time, local time (the call centre's calendar day)."""
    return time.strftime("%Y%m%d", time.localtime(timestamp))


@dataclass(frozen=True)
class CapturePaths:
    """Paths relative to the recording directory, as stored in the job file."""

    audio: str
    video_user: str
    video_agent: str
    job: str
    final: str


def capture_paths(dialogid: int, ref: int, channel: int, started_at: float) -> CapturePaths:
    base, day = base_name(dialogid, ref, channel), day_of(started_at)
    return CapturePaths(
        audio=f"audio/{day}/{base}.wav",
        video_user=f"video/{day}/{base}.user.ivf",
        video_agent=f"video/{day}/{base}.agent.ivf",
        job=f"jobs/{base}.json",
        final=f"final/{day}/{base}.mkv.enc",
    )


def resolve_in(recording_dir: Path, relative: str) -> Path:
    """`relative` under `recording_dir`, refusing anything that would point outside it (the
    Convertor deletes the captures a job names, so a job must not be able to name /etc/...).
    The check is on the name, not on symlinks: an operator may link final/ to other storage."""
    rel = Path(os.path.normpath(relative))
    if rel.is_absolute() or not rel.parts or rel.parts[0] == "..":
        raise CaptureFormatError(f"path {relative!r} is not inside {recording_dir}")
    return recording_dir.resolve() / rel
