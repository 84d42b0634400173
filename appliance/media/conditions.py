"""When a party's network fails them (sans-IO: figures in, decisions out).

Once a second the room feeds each party's measured figures; a condition starts when it has
held for `hold_s` and ends when it has been clear for `clear_s` (hysteresis, so video does
not flap on and off). The room turns starts and ends into paused/resumed video and the
original's system messages:

| condition of party X    | measured as                                   | pause | X   | other |
|-------------------------|-----------------------------------------------|-------|-----|-------|
| delay on X's side       | jitter of X's video as we receive it          | X->Y  | 501 | 502   |
| X's video congested     | loss on X's video as we receive it            | X->Y  | 503 | 504   |
| X's network congested   | loss X reports on what we send it, or its REMB | both  | 505 | 506   |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Condition(Enum):
    DELAY = "delay"
    VIDEO_CONGESTED = "video_congested"
    NETWORK_CONGESTED = "network_congested"


MESSAGE_IDS = {  # condition -> (to the party it concerns, to the other party)
    Condition.DELAY: (501, 502),
    Condition.VIDEO_CONGESTED: (503, 504),
    Condition.NETWORK_CONGESTED: (505, 506),
}


@dataclass(frozen=True)
class Thresholds:
    delay_jitter_ms: float = 80.0  # a camera's frames arriving this unevenly: a bad uplink
    video_loss_pct: float = 10.0  # of X's video packets lost on their way to us
    downlink_loss_pct: float = 10.0  # of our packets to X, as X's receiver reports them
    remb_min_kbps: float = 30.0  # X's browser asks for less than this: video is useless
    hold_s: float = 3.0
    clear_s: float = 5.0
    silent_mic_s: float = 10.0


@dataclass(frozen=True)
class Sample:
    """One party's figures over the last second."""

    video_jitter_ms: float = 0.0
    video_loss_pct: float = 0.0
    downlink_loss_pct: float = 0.0
    remb_kbps: float | None = None  # None: the party sent no REMB yet
    receiving_video: bool = False  # X is sending us video at all


@dataclass(frozen=True)
class Change:
    condition: Condition
    started: bool  # False: it ended


@dataclass
class _Tracker:
    active: bool = False
    since: float | None = None  # when the raw condition last became true / false


@dataclass
class PartyWatch:
    thresholds: Thresholds
    _trackers: dict[Condition, _Tracker] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._trackers = {c: _Tracker() for c in Condition}

    def active(self) -> set[Condition]:
        return {c for c, t in self._trackers.items() if t.active}

    def feed(self, sample: Sample, now: float) -> list[Change]:
        t = self.thresholds
        raw = {
            Condition.DELAY: sample.receiving_video and sample.video_jitter_ms > t.delay_jitter_ms,
            Condition.VIDEO_CONGESTED: sample.receiving_video
            and sample.video_loss_pct > t.video_loss_pct,
            Condition.NETWORK_CONGESTED: sample.downlink_loss_pct > t.downlink_loss_pct
            or (sample.remb_kbps is not None and sample.remb_kbps < t.remb_min_kbps),
        }
        changes = []
        for condition, is_bad in raw.items():
            tracker = self._trackers[condition]
            # `since` marks when the raw value last differed from the tracker's state.
            if is_bad != tracker.active:
                if tracker.since is None:
                    tracker.since = now
                needed = t.hold_s if is_bad else t.clear_s
                if now - tracker.since >= needed:
                    tracker.active = is_bad
                    tracker.since = None
                    changes.append(Change(condition, is_bad))
            else:
                tracker.since = None
        return changes


class MicrophoneWatch:
    """510: no sound from the customer's microphone for `silent_mic_s` after connect."""

    def __init__(self, thresholds: Thresholds, connected_at: float) -> None:
        self.limit = thresholds.silent_mic_s
        self.last_sound = connected_at
        self.warned = False

    def heard(self, now: float) -> None:
        self.last_sound = now

    def check(self, now: float) -> bool:
        """True once, when the silence has lasted too long."""
        if not self.warned and now - self.last_sound >= self.limit:
            self.warned = True
            return True
        return False


def pcmu_has_sound(payload: bytes) -> bool:
    """Digital silence in µ-law is 0xFF/0x7F (and near it); a live mic never stays there."""
    # A stride of 7 so a tone whose period divides 8 samples is not read at one phase.
    return any(b not in (0xFF, 0x7F, 0xFE, 0x7E) for b in payload[::7])


def opus_has_sound(payload: bytes) -> bool:
    """Opus DTX / silence frames are a few bytes; speech or noise is tens of bytes."""
    return len(payload) > 10
