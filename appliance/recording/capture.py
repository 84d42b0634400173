"""The recorder tap of one call: what the appliance relays, written as it goes, undecoded.

- Voice: a stereo µ-law WAV (left: the customer as the phone hears them, right: the desk
  phone), both directions placed on one clock by their RTP timestamps, anchored at the
  arrival of their first packet.
- Video: each camera's VP8 frames, reassembled from RTP (not decoded) into an IVF file,
  stamped on the same clock so the Convertor can align them.
- A job file names all of it from the first second: a worker killed mid-call leaves captures
  the Convertor can still finish (the writers' file locks vanish with the process).

Writing is plain `os.write` into the page cache on the worker's loop; the periodic flush
(sizes + fsync) runs in a thread so a slow disk never stalls the media of other calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from appliance.core.periodic import FailureLog
from appliance.media.vp8_depacketizer import Vp8Depacketizer
from appliance.recording.capture_paths import resolve_in
from appliance.recording.ivf import IvfWriter
from appliance.recording.job import Job, new_job, save_job
from appliance.recording.wav import WavWriter, interleave

log = logging.getLogger("appliance.recording")

AUDIO_RATE = 8000
VIDEO_RATE = 90000
FLUSH_INTERVAL = 2.0
# Audio is written this far behind real time, so late packets still find their place.
AUDIO_SLACK = 0.5


class _AudioLane:
    """One direction of the voice, positioned by RTP timestamp on the recording clock."""

    def __init__(self) -> None:
        self.anchor: int | None = None  # recording sample index of the first packet
        self.first_ts = 0
        self.pending: dict[int, bytes] = {}  # recording sample index -> µ-law bytes

    def put(self, timestamp: int, payload: bytes, arrival_index: int) -> None:
        if self.anchor is None:
            self.anchor, self.first_ts = arrival_index, timestamp
        offset = (timestamp - self.first_ts) & 0xFFFFFFFF
        if offset >= 0x80000000:  # before the first packet: too late to matter
            return
        self.pending[self.anchor + offset] = payload

    def take(self, start: int, end: int) -> bytes:
        """Samples [start, end) with silence where nothing arrived; consumed packets go."""
        lane = bytearray([0xFF]) * (end - start)
        for index in sorted(self.pending):
            payload = self.pending[index]
            if index >= end:
                break
            if index + len(payload) <= start:
                del self.pending[index]
                continue
            lo = max(index, start)
            hi = min(index + len(payload), end)
            lane[lo - start : hi - start] = payload[lo - index : hi - index]
            if index + len(payload) <= end:
                del self.pending[index]
        return bytes(lane)


class _VideoLane:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: IvfWriter | None = None
        self.depacketizer = Vp8Depacketizer()
        self.anchor: int | None = None  # recording pts of the first frame's timestamp
        self.first_ts = 0

    def packet(self, payload: bytes, marker: bool, timestamp: int, seq: int,
               arrival_pts: int) -> None:
        for frame in self.depacketizer.push(payload, marker, timestamp, seq):
            if self.anchor is None:
                self.anchor, self.first_ts = arrival_pts, frame.timestamp
            if self.writer is None:
                self.writer = IvfWriter(self.path)
            offset = (frame.timestamp - self.first_ts) & 0xFFFFFFFF
            if offset < 0x80000000:
                self.writer.write_frame(frame.data, self.anchor + offset)


class CallRecorder:
    """One recorded call's captures and job. The voice bridge feeds it as its
    `appliance.media.voice.VoiceRecorder` (customer_audio, phone_audio), the video relay
    through `video`."""

    def __init__(self, recording_dir: Path, *, roomkey: int, appliance_id: str, dialogid: int,
                 ref: int, channel: int, video: bool) -> None:
        self.root = recording_dir
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.job, self.paths = new_job(
            roomkey=roomkey, appliance_id=appliance_id, dialogid=dialogid, ref=ref,
            channel=channel, started_at=self.started_at, audio=True, video_user=video,
            video_agent=video)
        self.job_path = resolve_in(recording_dir, self.paths.job)
        save_job(self.job_path, self.job)  # first, so a crash always leaves a job behind
        self._wav = WavWriter(resolve_in(recording_dir, self.paths.audio))
        self._customer = _AudioLane()
        self._phone = _AudioLane()
        self._written = 0  # recording samples already in the WAV
        self._video = {
            "user": _VideoLane(resolve_in(recording_dir, self.paths.video_user)),
            "agent": _VideoLane(resolve_in(recording_dir, self.paths.video_agent)),
        } if video else {}
        self._timer: asyncio.TimerHandle | None = None
        # One line a minute at most while writes keep failing (a full disk fails every tick).
        self._write_errors = FailureLog(f"recording {self.paths.audio}: write", logger=log)
        self._flushing: asyncio.Future[None] | None = None
        self.closed = False

    @property
    def record_file(self) -> str:
        """The name the original reports in record_status and RecordFile."""
        return self.paths.audio

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._tick)

    # -- taps (called per packet by the voice bridge and the video relay) -----------------

    def _now_index(self, rate: int) -> int:
        return round((time.monotonic() - self._t0) * rate)

    def customer_audio(self, timestamp: int, payload: bytes) -> None:
        if not self.closed:
            self._customer.put(timestamp, payload, self._now_index(AUDIO_RATE))

    def phone_audio(self, timestamp: int, payload: bytes) -> None:
        if not self.closed:
            self._phone.put(timestamp, payload, self._now_index(AUDIO_RATE))

    def video(self, who: str, payload: bytes, marker: bool, timestamp: int, seq: int) -> None:
        lane = self._video.get(who)
        if lane is not None and not self.closed:
            lane.packet(payload, marker, timestamp, seq, self._now_index(VIDEO_RATE))

    # -- writing ---------------------------------------------------------------------------

    def _write_audio(self, upto: int) -> None:
        if upto > self._written:
            left = self._customer.take(self._written, upto)
            right = self._phone.take(self._written, upto)
            self._wav.write_frames(interleave(left, right))
            self._written = upto

    def _tick(self) -> None:
        if self.closed:
            return
        try:
            self._write_audio(self._now_index(AUDIO_RATE) - int(AUDIO_SLACK * AUDIO_RATE))
            if self._flushing is None or self._flushing.done():
                loop = asyncio.get_running_loop()
                self._flushing = loop.run_in_executor(None, self._flush_files)
        except Exception as exc:  # a full disk or a bug: the call goes on, the next tick retries
            self._write_errors.failed(exc, time.monotonic())
        finally:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._tick)

    def _flush_files(self) -> None:
        self._wav.flush()
        for lane in self._video.values():
            if lane.writer is not None:
                lane.writer.flush()

    async def close(self) -> Job:
        """The call is over: write the rest, close the files, mark the job ended."""
        if self.closed:
            return self.job
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._flushing is not None:
            await asyncio.wait([self._flushing])
        self._write_audio(self._now_index(AUDIO_RATE))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._close_files)
        self.job.ended_at = time.time()
        self.job.status = "ended"
        # A camera that never sent a frame has no file: the job must not name it.
        for who, lane in self._video.items():
            if lane.writer is None:
                setattr(self.job.video, who, None)
        save_job(self.job_path, self.job)
        return self.job

    def _close_files(self) -> None:
        self._wav.close()
        for lane in self._video.values():
            if lane.writer is not None:
                lane.writer.close()
