"""One browser's WebRTC leg in a media worker: the answer, ICE, DTLS, and the packets.

A component of a call: the customer's call (`UserCall`) and the agent's (`AgentCall`) each
contain one. It is the I/O edge around the call's `CallMachine`: it awaits aiortc, feeds the
outcomes to the machine (as does its owner, with the events only the owner sees) and
performs the release the machine decides on, reporting each step to its owner through
`LegOwner`. Once DTLS is up the leg's packets take the short path (`SrtpFastPath`) to
whoever consumes them: the voice bridge, the video relay.

Its ICE is one of two transports: by default aioice's, with sockets of the call's own from
the port range; with the worker's media port (`[media] udp_port`, workers/media_port.py)
an ICE-lite connection on that port, whose failure reason (consent lost...) becomes the
release's detail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from msgspec import UNSET

from appliance.core import protocol as p
from appliance.core.tasks import spawn
from appliance.edges.lite_transport import LiteConnection, offer_without_candidates
from appliance.edges.rtc_adapter import (
    AudioSender,
    SilentTrack,
    SrtpFastPath,
    apply_candidate_policy,
    audio_sender,
    make_configuration,
    sender_ssrc,
)
from appliance.media import rtcp
from appliance.media.codec_choice import CodecChoice, NoCommonCodec, choose_codecs
from appliance.media.rtp import ABS_SEND_TIME_URI
from appliance.media.video import VideoSink
from workers.call_state import CallMachine, Event, Release, State, Transition
from workers.host import LegHost, Relayed
from workers.media_port import MediaPort, describe_failure, wants_tcp
from workers.sdp_candidates import extension_id, local_candidates
from workers.video_relay import FeedbackSink, PacketSink, VideoRelay

log = logging.getLogger("appliance.call")


class LegOwner(Protocol):
    """The call that contains a leg: what the leg reports to it, in this order."""

    async def admit(self) -> None:
        """Runs first, before the answer: must feed the leg VERIFY_OK or a refusal."""
        ...

    def connected(self) -> None:
        """DTLS is up and the fast path attached."""
        ...

    def released(self, release: Release) -> None:
        """The machine released the leg (its peer connection is still open)."""
        ...

    async def teardown(self, release: Release) -> None:
        """Runs once the release is done; it `close()`s the leg, then reports the end."""
        ...


class WebRtcLeg:
    def __init__(self, host: LegHost, relay: VideoRelay, owner: LegOwner, conn: int,
                 channel: int, offer: p.Offer, *, module: str,
                 send_kinds: tuple[str, ...]) -> None:
        self._host = host
        self._relay = relay
        self._owner = owner
        self.conn = conn
        self.channel = channel
        self.offer = offer
        self.dialogid = offer.dialogid
        self.ref = offer.ref
        self.module = module  # "User" or "Agent", for the logs
        # What we send to this browser (the answer is sendrecv for these, recvonly otherwise).
        self.send_kinds = send_kinds
        self._machine = CallMachine()
        self.pc: RTCPeerConnection | None = None
        self.started = time.monotonic()
        self.connected_at: float | None = None
        self.audio: CodecChoice | None = None
        self.video: CodecChoice | None = None
        # Where relayed video for this browser goes: one per leg, since it carries the
        # outgoing stream's sequence numbers and timestamps across successive sources.
        self._video_sink: VideoSink | None = None
        self.abs_send_time_id: int | None = None
        self.fast_path: SrtpFastPath | None = None
        # Consumers of this browser's packets, by payload type, and of its RTCP feedback.
        self._rtp_sinks: dict[int, PacketSink] = {}
        self._feedback_sinks: dict[int, FeedbackSink] = {}
        self._timers: list[asyncio.TimerHandle] = []
        self._pending_ice: list[p.IceCandidate] = []
        self._task: asyncio.Task[None] | None = None
        self._tracks: list[SilentTrack] = []
        # On the worker's media port: this leg's ICE-lite connections (one with BUNDLE).
        self._lite: list[LiteConnection] = []

    # -- the machine -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._machine.state

    @property
    def live(self) -> bool:
        return self._machine.live

    @property
    def medium(self) -> int:
        return self.offer.medium

    def _requested_audio(self) -> str | None:
        return None if self.offer.audio is UNSET else self.offer.audio

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._setup(), name=f"call-{self.channel}")

    async def _setup(self) -> None:
        try:
            await self._owner.admit()
            if self._machine.live:
                await self._answer()
        except Exception:  # never let one call take the worker down
            log.exception("channel %d: call setup failed", self.channel)
            if self._machine.live:
                # PEER_GONE: the one event that releases, with the cause given, from every
                # live state (SDP_REFUSED exists only while answering).
                self.apply(Event.PEER_GONE,
                           release=Release(p.CAUSE_TEMPORARY_FAILURE, "internal error"))

    async def _answer(self) -> None:
        assert self.offer.offer is not UNSET
        config = self._host.config
        port = self._host.media_port
        tcp_only = port is not None and wants_tcp(self.offer)
        if port is not None and (refusal := port.refusal(tcp_only)) is not None:
            log.info("channel %d: refused: %s", self.channel,
                     port.error or "RTP over TCP asked for, media.tcp_port is 0")
            self.apply(refusal)
            return
        pc = RTCPeerConnection(make_configuration(config.ice_servers()))
        self.pc = pc
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            # One codec per medium left in the offer: what we relay without decoding.
            offer_sdp, self.audio, self.video = choose_codecs(
                self.offer.offer.sdp, self._requested_audio()
            )
            if self.audio is None and self.video is None:
                raise NoCommonCodec("the offer has neither audio nor video")
            if port is not None:
                # A lite agent never contacts the browser's candidates (it learns its
                # address from the checks), and aiortc must not resolve their mDNS names.
                offer_sdp = offer_without_candidates(offer_sdp)
            await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            # Tracks make the answer sendrecv; their packets come from the relay.
            for kind in self.send_kinds:
                if getattr(self, kind) is not None:
                    track = SilentTrack(kind)
                    self._tracks.append(track)
                    pc.addTrack(track)
            await self._attach_ice(pc, port, tcp_only)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError & co. on SDP it cannot use
            if self._machine.live:
                self.apply(Event.SDP_REFUSED, str(exc) or type(exc).__name__)
            return
        if not self._machine.live:
            return
        sdp = pc.localDescription.sdp
        self.abs_send_time_id = extension_id(sdp, "video", ABS_SEND_TIME_URI)
        self.send(
            p.Answer(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                     medium=self.offer.medium,
                     answer=p.SessionDescription(type="answer", sdp=sdp))
        )
        for candidate in local_candidates(sdp):
            self.send(
                p.Ice(dialogid=self.dialogid, ref=self.ref, channel=self.channel, ice=candidate)
            )
        self.apply(Event.ANSWER_SENT)
        for ice in self._pending_ice:
            await self._add_remote_candidate(ice)
        self._pending_ice.clear()
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.call_later(config.media.dtls_timeout, self.apply, Event.DTLS_TIMEOUT)
        )
        if pc.connectionState == "connected":  # raced ahead of our handler registration
            self._on_connection_state()

    async def _attach_ice(self, pc: RTCPeerConnection, port: MediaPort | None,
                          tcp_only: bool) -> None:
        """Today's per-call aioice sockets, or the worker's media port."""
        if port is None:
            apply_candidate_policy(pc, self._host.candidate_policy)
        else:
            self._lite = await port.attach(pc, tcp_only=tcp_only)

    def _on_connection_state(self) -> None:
        pc = self.pc
        if pc is None or not self._machine.live:
            return
        state = pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self.apply(Event.DTLS_CONNECTED)
        elif state == "failed":
            self.apply(Event.MEDIA_FAILED, self._failure_detail())
        elif state == "closed":
            # aiortc closed the pc before we did: the browser closed DTLS (a hang-up), or
            # the lite connection ended and aiortc, seeing DTLS end, closed first.
            if self._lite_failure() is None:
                log.info("channel %d: the browser closed its media connection", self.channel)
                self.apply(Event.MEDIA_CLOSED)
            else:
                self.apply(Event.MEDIA_FAILED, self._failure_detail())

    def _lite_failure(self) -> str | None:
        return next((c.failure for c in self._lite if c.failure is not None), None)

    def _failure_detail(self) -> str:
        port = self._host.media_port
        if port is None:
            return "ICE/DTLS failed"
        reason = self._lite_failure()
        log.info("channel %d: media transport failed on the worker's port: %s", self.channel,
                 reason or "DTLS failed, ICE was up")
        return describe_failure(reason, port.consent_timeout)

    async def close(self) -> None:
        """Stop a setup still running, the tracks and the peer connection."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        for track in self._tracks:
            track.stop()
        if self.pc is not None:
            try:
                await self.pc.close()
            except Exception:
                log.exception("channel %d: closing the peer connection failed", self.channel)

    # -- packets -------------------------------------------------------------------------

    @property
    def lite_connections(self) -> list[LiteConnection]:
        """Its ICE connections on the worker's media port (none on per-call sockets)."""
        return list(self._lite)

    @property
    def relaying(self) -> bool:
        """Whether the fast path was attached (DTLS came up)."""
        return self.fast_path is not None

    def relayed(self) -> Relayed:
        if self.fast_path is None:
            return Relayed()
        return Relayed(self.fast_path.received, self.fast_path.sent)

    def route_rtp(self, payload_type: int, sink: PacketSink) -> None:
        """This browser's RTP of `payload_type` goes to `sink` from now on."""
        self._rtp_sinks[payload_type] = sink

    def route_feedback(self, ssrc: int, sink: FeedbackSink) -> None:
        """This browser's RTCP feedback about `ssrc` goes to `sink` from now on."""
        self._feedback_sinks[ssrc] = sink

    def clear_feedback(self) -> None:
        self._feedback_sinks.clear()

    def silent_track(self, kind: str) -> SilentTrack | None:
        return next((t for t in self._tracks if t.kind == kind), None)

    def video_sink(self) -> VideoSink:
        """Where relayed video for this browser goes."""
        assert self.video is not None
        if self._video_sink is None:
            self._video_sink = VideoSink(self.send_rtp, self.our_ssrc("video"),
                                         self.video.payload_type, self.abs_send_time_id)
        return self._video_sink

    def our_ssrc(self, kind: str) -> int:
        assert self.pc is not None
        return sender_ssrc(self.pc, kind)

    def audio_sender(self) -> AudioSender:
        assert self.pc is not None
        return audio_sender(self.pc)

    def _on_rtp(self, packet: bytes) -> None:
        sink = self._rtp_sinks.get(packet[1] & 0x7F)
        if sink is not None:
            sink(packet)

    def _on_rtcp(self, packet: bytes) -> None:
        for item in rtcp.parse(packet):
            ssrc = item.ssrc if isinstance(item, rtcp.ReportBlock) else (
                item.ssrcs[0] if isinstance(item, rtcp.Remb) and item.ssrcs else
                getattr(item, "media_ssrc", None))
            sink = self._feedback_sinks.get(ssrc) if ssrc is not None else None
            if sink is not None:
                sink(item)

    def send_rtp(self, packet: bytes) -> None:
        if self.fast_path is not None:
            self.fast_path.send_rtp(packet)

    def send_rtcp(self, packet: bytes) -> None:
        if self.fast_path is not None:
            self.fast_path.send_rtcp(packet)

    # -- inputs from the browser ---------------------------------------------------------

    def client_action(self, action: p.Action) -> None:
        """The browser's own actions on its leg: release and ICE (the call takes the rest)."""
        if isinstance(action, p.Release):
            self.apply(Event.CLIENT_RELEASE)
        elif isinstance(action, p.Ice) and action.ice is not UNSET:
            if self.pc is None or self.pc.remoteDescription is None:
                self._pending_ice.append(action.ice)
            else:
                spawn(self._add_remote_candidate(action.ice))
        else:
            log.info("channel %d: %s ignored in this call state", self.channel,
                     type(action).__name__)

    async def _add_remote_candidate(self, ice: p.IceCandidate) -> None:
        if self.pc is None or not ice.candidate:
            return
        try:
            candidate = candidate_from_sdp(ice.candidate.removeprefix("candidate:"))
            candidate.sdpMid = None if ice.sdpMid is UNSET else ice.sdpMid
            candidate.sdpMLineIndex = None if ice.sdpMLineIndex is UNSET else ice.sdpMLineIndex
            await self.pc.addIceCandidate(candidate)
        except Exception as exc:  # a bad candidate is the browser's problem, not a crash
            log.info("channel %d: ignored remote candidate %r: %s", self.channel, ice, exc)

    def connection_closed(self) -> None:
        self.apply(Event.CONNECTION_CLOSED)

    def shutdown(self) -> None:
        self.apply(Event.SHUTDOWN)

    def release(self, cause: int, causestring: str) -> None:
        """The room ends this leg (the customer's call is over)."""
        self.apply(Event.PEER_GONE, release=Release(cause, causestring))

    # -- the machine's decisions -------------------------------------------------------

    def apply(self, event: Event, detail: str = "", release: Release | None = None) -> None:
        """Feed the machine one event and perform what it decides."""
        transition = self._machine.handle(event, detail, release)
        if transition is None:
            return
        if event is Event.DTLS_CONNECTED:
            self._on_dtls_connected()
        if transition.release is not None:
            self._release(transition)

    def _on_dtls_connected(self) -> None:
        setup_ms = (time.monotonic() - self.started) * 1000
        log.info("channel %d: DTLS connected %.0f ms after offer (%s leg)", self.channel,
                 setup_ms, self.module)
        self._host.call_connected(self.channel, setup_ms)  # setup over: admission counts it
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        assert self.pc is not None
        self.fast_path = self._relay.attach(self.pc, self._on_rtp, self._on_rtcp,
                                            self._rtp_sinks)
        self.send(
            p.DTLSconnect(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                          medium=p.medium_name(self.offer.medium))
        )
        if self.offer.lifetime > 0:
            loop = asyncio.get_running_loop()
            self._timers.append(
                loop.call_later(self.offer.lifetime, self.apply, Event.LIFETIME_EXPIRED)
            )
        self._owner.connected()

    def _release(self, transition: Transition) -> None:
        release = transition.release
        assert release is not None
        if release.tell_client:
            self.send(
                p.Release(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                          cause=release.cause, causestring=release.causestring)
            )
        log.info("channel %d: released, cause %d %s (%s leg)", self.channel, release.cause,
                 release.causestring, self.module)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._owner.released(release)
        # A hang-up by either side is normal; anything the appliance or network caused is not.
        normal = (release.cause == p.CAUSE_NORMAL and release.causestring in (
            "normal release", "lifetime expired")) or not release.tell_client
        self._host.leg_released(normal, self.relayed())
        if self.fast_path is not None:
            self.fast_path.detach()
        spawn(self._owner.teardown(release), f"teardown-{self.channel}")

    def send(self, action: p.Action) -> None:
        self._host.to_client(self.conn, action)
