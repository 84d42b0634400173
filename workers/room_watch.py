"""The room's network watch: once a second, each party's figures go to `PartyWatch`; its
decisions become paused/resumed video and system messages (501-506, 510, 520).

It is given its thresholds and message settings, and at each tick the room's legs, video
paths and voice meters; it keeps only what it needs between ticks.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from appliance.core import protocol as p
from appliance.core.config import ConditionsConfig, MessagesConfig
from appliance.media.conditions import (
    MESSAGE_IDS,
    Change,
    Condition,
    MicrophoneWatch,
    PartyWatch,
    Sample,
    Thresholds,
)
from appliance.media.quality import StreamMeter
from appliance.media.video import VideoPath
from workers import messages
from workers.leg import WebRtcLeg

log = logging.getLogger("appliance.watch")

RESUMED = 520


class VoiceMeters(Protocol):
    """What the room and its watch read of the call's voice bridge (`VoiceBridge`)."""

    browser_meter: StreamMeter  # the customer's microphone, as received
    phone_meter: StreamMeter  # the desk phone's voice, as received
    last_sound_at: float | None  # when the customer's microphone was last heard


def watch_thresholds(conditions: ConditionsConfig) -> Thresholds:
    """The `[conditions]` section as the watch's thresholds."""
    c = conditions
    return Thresholds(c.delay_jitter_ms, c.video_loss_pct, c.downlink_loss_pct,
                      c.remb_min_kbps, c.hold_s, c.clear_s, c.silent_mic_s)


class _Counters:
    """What a party's video streams looked like at the previous tick."""

    def __init__(self) -> None:
        self.expected = 0
        self.received = 0
        self.forwarded = 0  # to the party
        self.nacked = 0  # by the party


class RoomWatch:
    def __init__(self, roomkey: int, thresholds: Thresholds, messages: MessagesConfig) -> None:
        self.roomkey = roomkey
        self.thresholds = thresholds
        self.messages = messages
        self.parties = {"user": PartyWatch(self.thresholds), "agent": PartyWatch(self.thresholds)}
        self._counters = {"user": _Counters(), "agent": _Counters()}
        self.mic: MicrophoneWatch | None = None
        self.sent: list[tuple[int, int]] = []  # (channel, message id), for logs and tests

    def tick(self, user: WebRtcLeg, agent: WebRtcLeg | None, user_video: VideoPath | None,
             agent_video: VideoPath | None, voice: VoiceMeters | None,
             now: float | None = None) -> None:
        """One second of the room: the customer's and the agent's legs, each camera's path
        (customer's camera -> agent, agent's camera -> customer) and the voice meters."""
        now = time.monotonic() if now is None else now
        self._check_microphone(user, voice, now)
        if agent is None or not agent.relaying or user_video is None or agent_video is None:
            return
        legs = {"user": (user, user_video, agent_video),
                "agent": (agent, agent_video, user_video)}
        for name, (leg, incoming, outgoing) in legs.items():
            for change in self.parties[name].feed(self._sample(name, incoming, outgoing), now):
                other = agent if leg is user else user
                self._act(name, leg, other, incoming, outgoing, change)

    def _sample(self, name: str, incoming: VideoPath, outgoing: VideoPath) -> Sample:
        stats = incoming.meter.rtp
        counters = self._counters[name]
        expected = stats.expected - counters.expected
        received = stats.received - counters.received
        counters.expected, counters.received = stats.expected, stats.received
        loss = 100.0 * (expected - received) / expected if expected > 0 else 0.0
        # What the party lost of our video: its receiver reports, or its NACKs — our cache
        # repairs those, so the reports alone would hide a lossy downlink.
        forwarded = outgoing.forwarded - counters.forwarded
        nacked = outgoing.nacked - counters.nacked
        counters.forwarded, counters.nacked = outgoing.forwarded, outgoing.nacked
        if forwarded > 0:
            report = outgoing.receiver_report
            reported = 100.0 * report.fraction_lost / 256 if report is not None else 0.0
            nack_rate = 100.0 * nacked / forwarded
            downlink = max(reported, min(nack_rate, 100.0))
            remb = outgoing.receiver_remb_bps / 1000 if outgoing.receiver_remb_bps else None
        else:
            # Nothing sent to the party this second (its video paused, or no camera): its
            # last receiver report and REMB describe the past. A browser sends a REMB only
            # as video arrives, so a low one from before a pause would otherwise hold
            # "network congested" - which pauses this very path - for ever.
            downlink, remb = 0.0, None
        log.debug("room %d: %s video in: jitter %.0f ms, loss %.0f%%; out: loss %.0f%%, REMB %s",
                  self.roomkey, name, stats.jitter_ms, loss, downlink, remb)
        return Sample(video_jitter_ms=stats.jitter_ms, video_loss_pct=max(loss, 0.0),
                      downlink_loss_pct=downlink, remb_kbps=remb, receiving_video=received > 0)

    def _act(self, name: str, leg: WebRtcLeg, other: WebRtcLeg, incoming: VideoPath,
             outgoing: VideoPath, change: Change) -> None:
        # Delay and a congested camera stop that party's video; a congested network stops
        # both directions, since both cross it.
        paths = [incoming] if change.condition is not Condition.NETWORK_CONGESTED else [
            incoming, outgoing]
        reason = f"{name}:{change.condition.value}"
        if change.started:
            for path in paths:
                path.pause(reason)
            mine, theirs = MESSAGE_IDS[change.condition]
            log.info("room %d: %s on channel %d: video paused", self.roomkey,
                     change.condition.value, leg.channel)
            self.send(leg, mine)
            self.send(other, theirs)
        else:
            for path in paths:
                path.resume(reason)
            log.info("room %d: %s on channel %d cleared: video resumed", self.roomkey,
                     change.condition.value, leg.channel)
            self.send(leg, RESUMED)
            self.send(other, RESUMED)

    def _check_microphone(self, user: WebRtcLeg, voice: VoiceMeters | None, now: float) -> None:
        if user.connected_at is None:
            return
        if self.mic is None:
            self.mic = MicrophoneWatch(self.thresholds, user.connected_at)
        if voice is not None and voice.last_sound_at is not None:
            self.mic.heard(voice.last_sound_at)
        if self.mic.check(now):
            log.info("room %d: no sound from the microphone on channel %d", self.roomkey,
                     user.channel)
            self.send(user, 510)

    def send(self, leg: WebRtcLeg, message_id: int) -> None:
        if not leg.live:
            return
        self.sent.append((leg.channel, message_id))
        cfg = self.messages
        leg.send(p.Message(dialogid=leg.dialogid, ref=leg.ref, channel=leg.channel,
                           message=messages.text(message_id, cfg.language), level=cfg.level,
                           position=cfg.position, displaytime=cfg.displaytime))
