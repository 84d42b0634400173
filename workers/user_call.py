"""One User call in a media worker: AP-S verify, the WebRTC answer, DTLS, lifetime.

This is the I/O edge around `CallMachine`: it awaits AP-S and aiortc, feeds the outcomes to
the machine, and performs the release the machine decides on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from msgspec import UNSET

from appliance import bus
from appliance import protocol as p
from appliance.aps_client import ApsUnavailable, VerifyRejected
from appliance.call_state import CallMachine, Event, Release, State, Transition
from appliance.media.codec_choice import AudioChoice, NoCommonCodec, choose_audio
from appliance.rtc_adapter import SilentTrack, apply_candidate_policy, make_configuration
from appliance.sdp_candidates import local_candidates
from appliance.tasks import spawn
from workers.sip_leg import CallParties, SipLeg

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger("appliance.call")


def _opt(value: object) -> object:
    return None if value is UNSET else value


class UserCall:
    def __init__(self, worker: Worker, conn: int, channel: int, offer: p.Offer) -> None:
        self.worker = worker
        self.conn = conn
        self.channel = channel
        self.offer = offer
        self.dialogid = offer.dialogid
        self.ref = offer.ref
        self.machine = CallMachine()
        self.roomkey: int | None = None
        self.pc: RTCPeerConnection | None = None
        self.started = time.monotonic()
        self.connected_at: float | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._pending_ice: list[p.IceCandidate] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self.audio: AudioChoice | None = None
        self.sip: SipLeg | None = None
        self._tracks: list[SilentTrack] = []
        self._rtcp_sync: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._setup(), name=f"call-{self.channel}")

    async def _setup(self) -> None:
        try:
            await self._verify()
            if self.machine.live:
                await self._answer()
        except Exception:  # never let one call take the worker down
            log.exception("channel %d: call setup failed", self.channel)
            if self.machine.live:
                self._apply(Event.SDP_REFUSED, "internal error")

    async def _verify(self) -> None:
        offer = self.offer
        try:
            result = await self.worker.aps.verify(
                channel=self.channel,
                dialogid=offer.dialogid,
                ref=offer.ref,
                caller=_opt(offer.caller),
                callee=_opt(offer.callee),
                userdata=_opt(offer.userdata) or "",
                suid=_opt(offer.suid),
                module=offer.module,
            )
        except VerifyRejected as exc:
            log.info("channel %d: AP-S refused the user: %s", self.channel, exc)
            self._apply(Event.VERIFY_REJECTED)
            return
        except ApsUnavailable as exc:
            log.warning("channel %d: AP-S unavailable: %s", self.channel, exc)
            self._apply(Event.APS_DOWN)
            return
        if not self.machine.live:  # the browser hung up while AP-S was thinking
            return
        self.roomkey = result.roomkey
        self.worker.send(bus.RoomOpened(self.channel, result.roomkey))
        self._apply(Event.VERIFY_OK)
        self._to_client(p.Alert(dialogid=self.dialogid, ref=self.ref, channel=self.channel))

    async def _answer(self) -> None:
        assert self.offer.offer is not UNSET
        config = self.worker.config
        pc = RTCPeerConnection(make_configuration(config.ice_servers()))
        self.pc = pc
        pc.on("connectionstatechange", self._on_connection_state)
        requested = None if self.offer.audio is UNSET else self.offer.audio
        try:
            # One audio codec left in the offer: PCMU (relayed as is) unless Opus is needed.
            offer_sdp, self.audio = choose_audio(self.offer.offer.sdp, requested)
            if self.audio is None:
                raise NoCommonCodec("the offer has no audio")
            await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            # A track makes the audio answer sendrecv; its packets come from the relay.
            track = SilentTrack("audio")
            self._tracks.append(track)
            pc.addTrack(track)
            apply_candidate_policy(pc, self.worker.candidate_policy)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError & co. on SDP it cannot use
            if self.machine.live:
                self._apply(Event.SDP_REFUSED, str(exc) or type(exc).__name__)
            return
        if not self.machine.live:
            return
        sdp = pc.localDescription.sdp
        self._to_client(
            p.Answer(
                dialogid=self.dialogid,
                ref=self.ref,
                channel=self.channel,
                medium=self.offer.medium,
                answer=p.SessionDescription(type="answer", sdp=sdp),
            )
        )
        for candidate in local_candidates(sdp):
            self._to_client(
                p.Ice(dialogid=self.dialogid, ref=self.ref, channel=self.channel, ice=candidate)
            )
        self._apply(Event.ANSWER_SENT)
        for ice in self._pending_ice:
            await self._add_remote_candidate(ice)
        self._pending_ice.clear()
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.call_later(config.media.dtls_timeout, self._apply, Event.DTLS_TIMEOUT)
        )
        if pc.connectionState == "connected":  # raced ahead of our handler registration
            self._on_connection_state()

    def _on_connection_state(self) -> None:
        pc = self.pc
        if pc is None or not self.machine.live:
            return
        state = pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self._apply(Event.DTLS_CONNECTED)
        elif state == "failed":
            self._apply(Event.MEDIA_FAILED, "ICE/DTLS failed")

    # -- inputs from the browser ---------------------------------------------------------

    def client_action(self, action: p.Action) -> None:
        if isinstance(action, p.Release):
            self._apply(Event.CLIENT_RELEASE)
        elif isinstance(action, p.DTMF):
            if self.sip is not None and self.machine.state in (State.RINGING, State.ANSWERED):
                self.sip.send_dtmf(action.value)
            else:
                log.info("channel %d: DTMF %s ignored before the phone leg is up",
                         self.channel, action.value)
        elif isinstance(action, p.Ice) and action.ice is not UNSET:
            if self.pc is None or self.pc.remoteDescription is None:
                self._pending_ice.append(action.ice)
            else:
                spawn(self._add_remote_candidate(action.ice))
        else:
            log.info(
                "channel %d: %s not handled yet in this call state", self.channel,
                type(action).__name__,
            )

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

    # -- the desk phone leg --------------------------------------------------------------

    async def _start_sip(self) -> None:
        endpoint = self.worker.sip_endpoint
        offer = self.offer
        if endpoint is None:
            self._apply(Event.SIP_SETUP_FAILED, "no SIP endpoint on this worker")
            return
        if offer.callee is UNSET:
            self._apply(Event.SIP_SETUP_FAILED, "the offer names no callee")
            return
        assert self.pc is not None and self.audio is not None and self.roomkey is not None
        caller = "anonymous" if offer.caller is UNSET else str(offer.caller)
        self.sip = SipLeg(self, endpoint, self.worker.config)
        try:
            await self.sip.start(self.pc, self.audio,
                                 CallParties(caller, str(offer.callee), self.roomkey))
        except Exception as exc:
            log.exception("channel %d: cannot start the SIP leg", self.channel)
            self._apply(Event.SIP_SETUP_FAILED, str(exc) or type(exc).__name__)
            return
        if self.machine.live:
            self._apply(Event.INVITE_SENT)
            self._schedule_rtcp_sync()
        else:
            self.sip.close()

    def _schedule_rtcp_sync(self) -> None:
        if self.sip is not None and self.machine.live:
            self.sip.sync_rtcp()
            self._rtcp_sync = asyncio.get_running_loop().call_later(1.0, self._schedule_rtcp_sync)

    def sip_ringing(self) -> None:
        self._apply(Event.SIP_RINGING)

    def sip_answered(self) -> None:
        self._apply(Event.SIP_ANSWERED)
        if not self.machine.live:
            return
        self._to_client(self._peerdata("Join"))
        if self.roomkey is not None:
            spawn(self.worker.report_answered(self.roomkey))

    def sip_failed(self, cause: int, causestring: str) -> None:
        self._apply(Event.SIP_FAILED, release=Release(cause, causestring))

    def sip_hangup(self) -> None:
        if self.machine.state is State.ANSWERED:
            self._to_client(self._peerdata("Leave"))
        self._apply(Event.SIP_BYE)

    def phone_dtmf(self, key: str) -> None:
        if self.machine.live:
            self._to_client(p.DTMF(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                                   value=key))

    def _peerdata(self, what: str) -> p.PeerData:
        return p.PeerData(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                          peerchannel=self.channel, type="indication", medium="audio",
                          peerdata=what, value="width=0000;height=0000")

    def connection_closed(self) -> None:
        self._apply(Event.CONNECTION_CLOSED)

    def shutdown(self) -> None:
        self._apply(Event.SHUTDOWN)

    # -- the machine's decisions -------------------------------------------------------

    def _apply(self, event: Event, detail: str = "", release: Release | None = None) -> None:
        transition = self.machine.handle(event, detail, release)
        if transition is None:
            return
        if event is Event.DTLS_CONNECTED:
            self._on_dtls_connected()
        if transition.release is not None:
            self._release(transition)

    def _on_dtls_connected(self) -> None:
        setup_ms = (time.monotonic() - self.started) * 1000
        log.info("channel %d: DTLS connected %.0f ms after offer", self.channel, setup_ms)
        self.worker.metrics_setup_ms.append(setup_ms)
        self._to_client(
            p.DTLSconnect(
                dialogid=self.dialogid,
                ref=self.ref,
                channel=self.channel,
                medium=p.medium_name(self.offer.medium),
            )
        )
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self.offer.lifetime > 0:
            loop = asyncio.get_running_loop()
            self._timers.append(
                loop.call_later(self.offer.lifetime, self._apply, Event.LIFETIME_EXPIRED)
            )
        spawn(self._start_sip(), f"sip-{self.channel}")

    def _release(self, transition: Transition) -> None:
        release = transition.release
        assert release is not None
        if release.tell_client:
            self._to_client(
                p.Release(
                    dialogid=self.dialogid,
                    ref=self.ref,
                    channel=self.channel,
                    cause=release.cause,
                    causestring=release.causestring,
                )
            )
        log.info(
            "channel %d: released, cause %d %s", self.channel, release.cause, release.causestring
        )
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._rtcp_sync is not None:
            self._rtcp_sync.cancel()
        if self.sip is not None:
            self.sip.close()  # BYE or CANCEL unless the phone ended it
        spawn(self._teardown(release.cause, release.causestring), f"teardown-{self.channel}")

    async def _teardown(self, cause: int, causestring: str) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        for track in self._tracks:
            track.stop()
        if self.pc is not None:
            try:
                await self.pc.close()
            except Exception:
                log.exception("channel %d: closing the peer connection failed", self.channel)
        self.worker.call_ended(self)
        try:
            if self.roomkey is not None:
                await self.worker.report_released(self.roomkey, cause, causestring)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _to_client(self, action: p.Action) -> None:
        self.worker.send(bus.ToClient(self.conn, action))
