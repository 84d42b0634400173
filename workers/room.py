"""A room: the customer's call and, once the agent's page joins, the agent's video leg.

It links the two browser legs: video both ways (through the `VideoRelay` it is given),
Join/Leave indications, app data (`peerdata` command) from one party to the other, the
quality figures every 5 s and the network watch every second. Everything it measures or
records with is given to it: each camera's `VideoPath`, the voice bridge's meters, the
recorder, the watch's settings; the calls that own the legs stay out of its sight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.core import protocol as p
from appliance.core.config import MessagesConfig
from appliance.media.conditions import Thresholds
from appliance.media.quality import Figures, PartyQuality
from appliance.media.video import VideoPath
from workers.leg import WebRtcLeg
from workers.room_watch import RoomWatch, VoiceMeters
from workers.video_relay import VideoRelay

if TYPE_CHECKING:
    from appliance.recording.capture import CallRecorder

log = logging.getLogger("appliance.room")

QUALITY_INTERVAL = 5.0


class Room:
    def __init__(self, roomkey: int, user: WebRtcLeg, relay: VideoRelay,
                 thresholds: Thresholds, messages: MessagesConfig) -> None:
        self.roomkey = roomkey
        self.user = user  # the customer's leg
        self.agent: WebRtcLeg | None = None  # the agent's video leg, once admitted
        self._relay = relay
        self.user_video: VideoPath | None = None  # customer's camera -> agent's page
        self.agent_video: VideoPath | None = None  # agent's camera -> customer's page
        self._voice: VoiceMeters | None = None  # the call's voice bridge, once it exists
        self._quality_timer: asyncio.TimerHandle | None = None
        self._watch_timer: asyncio.TimerHandle | None = None
        self.watch = RoomWatch(roomkey, thresholds, messages)
        self._recorder: CallRecorder | None = None
        self.closed = False

    # -- the customer's leg --------------------------------------------------------------

    def user_connected(self, video: VideoPath | None, recorder: CallRecorder | None) -> None:
        """The customer's DTLS is up: `video` is its camera's path, `recorder` the call's."""
        self._recorder = recorder
        self.user_video = video
        if video is not None:
            video.tap = self._recording_tap("user")
        self._schedule_quality()
        self._schedule_watch()

    def voice_connected(self, voice: VoiceMeters | None) -> None:
        """The call's voice bridge to the desk phone exists: its meters count from now."""
        self._voice = voice

    def user_ended(self) -> None:
        """The customer's call is over: the agent's page is told and released too."""
        self.closed = True
        for timer in (self._quality_timer, self._watch_timer):
            if timer is not None:
                timer.cancel()
        agent = self.agent
        if agent is not None and agent.live:
            agent.send(self._peerdata(agent, self.user, "Leave", p.medium_name(
                self.user.medium)))
            agent.release(p.CAUSE_NORMAL, "normal release")

    # -- the agent's leg -----------------------------------------------------------------

    def admit(self, agent: WebRtcLeg) -> str | None:
        """None if the agent may join, else why not (the causestring of its release).

        The supervisor books one agent per room and refuses a second before it reaches us;
        a second one here means its bookkeeping and ours disagree."""
        if self.agent is not None:
            log.error("room %d: already has the agent on channel %d; refusing the agent on "
                      "channel %d", self.roomkey, self.agent.channel, agent.channel)
            return "room already has an agent"
        self.agent = agent
        return None

    def agent_connected(self, agent: WebRtcLeg, video: VideoPath | None) -> None:
        """The agent's DTLS is up: `video` is its camera's path."""
        user = self.user
        if self.closed or agent is not self.agent:
            return
        self.agent_video = video
        if video is not None:
            video.tap = self._recording_tap("agent")
        self._relay.join(user, self.user_video, agent, video)
        log.info("room %d: agent on channel %d joined the customer on channel %d",
                 self.roomkey, agent.channel, user.channel)
        user.send(self._peerdata(user, agent, "Join", "video"))
        agent.send(self._peerdata(agent, user, "Join", p.medium_name(user.medium)))

    def _recording_tap(self, who: str) -> Callable[[bytes, bool, int, int], None] | None:
        recorder = self._recorder
        if recorder is None:
            return None
        return lambda payload, marker, ts, seq: recorder.video(who, payload, marker, ts, seq)

    def agent_left(self, agent: WebRtcLeg) -> None:
        if agent is not self.agent:
            return
        self.agent = None
        self._relay.part(self.user, self.user_video)
        self.agent_video = None
        if not self.closed and self.user.live:
            log.info("room %d: agent on channel %d left", self.roomkey, agent.channel)
            self.user.send(self._peerdata(self.user, agent, "Leave", "video"))

    # -- duplicate login (Flow 3) ----------------------------------------------------------

    def duplicate_login(self, text: str) -> int:
        """The customer logged in again on another appliance: AP-S's text goes to both
        parties, each on its own dialogid/ref/channel. The call itself goes on (ending it is
        up to the people in it). Returns how many legs were told."""
        told = 0
        for leg in (self.user, self.agent):
            if leg is None or not leg.live:
                continue
            # "warning": possible misuse of the customer's identity deserves attention (the
            # pages show it amber, announced as an alert); "error" would say the call failed.
            leg.send(p.Message(dialogid=leg.dialogid, ref=leg.ref, channel=leg.channel,
                               message=text, level="warning", position="top", displaytime=10))
            told += 1
        log.info("room %d: duplicate login shown to %d part%s", self.roomkey, told,
                 "y" if told == 1 else "ies")
        return told

    # -- app data and indications --------------------------------------------------------

    def command(self, sender: WebRtcLeg, action: p.PeerData) -> None:
        """`peerdata` type "command" from one party is delivered to the other."""
        other: WebRtcLeg | None = self.agent if sender is self.user else self.user
        if other is None or not other.live:
            log.info("room %d: peerdata from channel %d has nobody to go to", self.roomkey,
                     sender.channel)
            return
        other.send(
            p.PeerData(dialogid=other.dialogid, ref=other.ref, channel=other.channel,
                       peerchannel=sender.channel, type="command",
                       medium=p.medium_name(sender.medium), peerdata=action.peerdata,
                       value=action.value, nickname=action.nickname, userid=action.userid)
        )

    @staticmethod
    def _peerdata(to: WebRtcLeg, peer: WebRtcLeg, what: str, medium: str) -> p.PeerData:
        return p.PeerData(dialogid=to.dialogid, ref=to.ref, channel=to.channel,
                          peerchannel=peer.channel, type="indication", medium=medium,
                          peerdata=what, value="width=0000;height=0000")

    # -- network watch every second -------------------------------------------------------

    def _schedule_watch(self) -> None:
        if not self.closed:
            self._watch_timer = asyncio.get_running_loop().call_later(1.0, self._watch_tick)

    def _watch_tick(self) -> None:
        try:
            for video in (self.user_video, self.agent_video):
                if video is not None:
                    video.keyframe_check()
            self.watch.tick(self.user, self.agent, self.user_video, self.agent_video,
                            self._voice)
        except Exception:  # a measurement glitch must not stop the watch for the call
            log.exception("room %d: network watch failed", self.roomkey)
        finally:
            self._schedule_watch()

    # -- quality every 5 s ---------------------------------------------------------------

    def _schedule_quality(self) -> None:
        if not self.closed:
            loop = asyncio.get_running_loop()
            self._quality_timer = loop.call_later(QUALITY_INTERVAL, self._report_quality)

    def _report_quality(self) -> None:
        if self.closed:
            return
        try:
            customer, agent_side = self.sample()
            user, agent = self.user, self.agent
            peer_channel = agent.channel if agent is not None else user.channel
            user.send(_figures(p.MyResolution, user, user.channel, customer))
            user.send(_figures(p.PeerResolution, user, peer_channel, agent_side))
            if agent is not None and agent.live and agent.relaying:
                agent.send(_figures(p.MyResolution, agent, agent.channel, agent_side))
                agent.send(_figures(p.PeerResolution, agent, user.channel, customer))
        finally:
            self._schedule_quality()

    def sample(self) -> tuple[Figures, Figures]:
        """(the customer's streams, the agent side's streams: desk phone voice + agent video)
        as the appliance received them over the last period."""
        voice = self._voice
        customer = PartyQuality(voice.browser_meter if voice else None,
                                self.user_video.meter if self.user_video else None)
        agent_side = PartyQuality(voice.phone_meter if voice else None,
                                  self.agent_video.meter if self.agent_video else None)
        if self.user_video is not None:
            customer.remb_bps = self.user_video.receiver_remb_bps
        if self.agent_video is not None:
            agent_side.remb_bps = self.agent_video.receiver_remb_bps
        return customer.sample(), agent_side.sample()


def _figures(kind: type[p.MyResolution] | type[p.PeerResolution], to: WebRtcLeg, channel: int,
             figures: Figures) -> p.MyResolution | p.PeerResolution:
    return kind(dialogid=to.dialogid, ref=to.ref, channel=channel, width=figures.width,
                height=figures.height, REMB=figures.REMB, framerate=figures.framerate,
                audio_bitrate=figures.audio_bitrate, video_bitrate=figures.video_bitrate,
                jitter=figures.jitter, packetloss=figures.packetloss)
