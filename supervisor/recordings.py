"""After hang-up, every recording is converted and encrypted, then reported: nothing lost.

The supervisor owns this because it outlives the workers: a job left by a worker that was
killed mid-call, or by an appliance that stopped, is picked up here (at the worker's death
and at every start) and finished. The Convertor runs as a separate process; a failed or
killed run is retried with a growing delay. AP-S hears `EndCall` only once an encrypted,
verified recording exists.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
from pathlib import Path

from appliance.core.config import Config
from appliance.core.tasks import spawn
from appliance.edges.aps_client import ApsClient, ApsUnavailable
from appliance.recording.capture_files import try_lock_capture
from appliance.recording.capture_paths import resolve_in
from appliance.recording.job import JobError, load_job
from appliance.recording.keys import load_or_create_master

log = logging.getLogger("appliance.recordings")


class RecordingManager:
    def __init__(self, config: Config, aps: ApsClient) -> None:
        self.config = config
        self.aps = aps
        self.root = config.recording_path
        self.key_file = config.master_key_path
        self._running: set[Path] = set()
        self._slots = asyncio.Semaphore(1)  # one Convertor at a time: keep cores for calls
        self.converted = 0
        self.failed = 0

    def prepare(self) -> None:
        """Directories and the master secret exist before any call records."""
        for sub in ("audio", "video", "jobs", "final"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        load_or_create_master(self.key_file)

    def pick_up_leftovers(self) -> None:
        """Jobs no live writer holds: from a previous run, or a worker that just died."""
        for job_path in sorted((self.root / "jobs").glob("*.json")):
            try:
                job = load_job(job_path)
            except JobError as exc:
                log.error("unreadable recording job %s: %s", job_path, exc)
                continue
            if job.status == "converted" and job.record_file and not self._reported(job_path):
                spawn(self._report(job_path))
            elif job.status != "converted" and not self._being_written(job.audio):
                self.submit(job_path)

    def has_job(self, roomkey: int) -> bool:
        """Whether a recording job exists for this call (then EndCall is ours to send)."""
        for job_path in (self.root / "jobs").glob("*.json"):
            try:
                if load_job(job_path).roomkey == roomkey:
                    return True
            except JobError:
                continue
        return False

    def _being_written(self, audio: str | None) -> bool:
        if audio is None:
            return False
        try:
            fd = try_lock_capture(resolve_in(self.root, audio))
        except OSError:
            return False  # no capture file: nothing holds it
        if fd is None:
            return True
        os.close(fd)
        return False

    def submit(self, job_path: Path) -> None:
        job_path = job_path.resolve()
        if job_path not in self._running:
            self._running.add(job_path)
            spawn(self._convert(job_path), f"convert-{job_path.stem}")

    async def _convert(self, job_path: Path) -> None:
        delay = self.config.recording.retry_delay
        try:
            for attempt in range(1, self.config.recording.attempts + 1):
                async with self._slots:
                    code, output = await self._run_convertor(job_path)
                if code == 0:
                    self.converted += 1
                    log.info("recording %s converted and encrypted", job_path.stem)
                    await self._report(job_path)
                    return
                log.warning("Convertor failed for %s (attempt %d, exit %s): %s", job_path.stem,
                            attempt, code, output.strip()[-300:])
                await asyncio.sleep(delay)
                delay *= 2
            self.failed += 1
            log.error("recording %s not converted after %d attempts; it is kept and retried "
                      "at the next start", job_path.stem, self.config.recording.attempts)
        finally:
            self._running.discard(job_path)

    def _command(self, job_path: Path) -> list[str]:
        template = self.config.recording.convertor
        if not template:
            return [sys.executable, "-m", "launcher.cli", "convert", "--recordings",
                    str(self.root), "--key-file", str(self.key_file), str(job_path)]
        return [part.format(job=job_path, recordings=self.root, key_file=self.key_file)
                for part in shlex.split(template)]

    async def _run_convertor(self, job_path: Path) -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            *self._command(job_path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        out, _ = await process.communicate()
        return process.returncode, out.decode(errors="replace")

    # -- EndCall ---------------------------------------------------------------------------

    def _reported(self, job_path: Path) -> bool:
        return job_path.with_suffix(".reported").exists()

    async def _report(self, job_path: Path) -> None:
        job = load_job(job_path)
        assert job.record_file is not None
        delay = self.config.recording.retry_delay
        for _ in range(self.config.recording.attempts):
            try:
                await self.aps.end_call(job.roomkey, job.record_file)
            except ApsUnavailable as exc:
                log.warning("AP-S did not take EndCall for %s: %s", job_path.stem, exc)
                await asyncio.sleep(delay)
                delay *= 2
                continue
            # A marker, so a restart does not report the same recording twice.
            job_path.with_suffix(".reported").touch()
            log.info("EndCall sent for roomkey %d: %s", job.roomkey, job.record_file)
            return
