"""The customer's call: AP-S verify, the WebRTC leg, then the desk phone over SIP.

It contains the customer's `WebRtcLeg`, the `SipLeg` to the desk phone, the room it opens
(where the agent's video leg joins it later) and, when the offer asks for it, the recorder.
The leg reports to it (`LegOwner`), as does the SIP leg (`SipLegOwner`); it reports to the
worker through `CallHost`.

Every call AP-S verified ends with exactly one release report and EndCall, whatever ends
it and whenever: the verify request runs as a task of its own that the call's teardown
never cancels (a cancelled request may already have made AP-S issue a roomkey whose answer
we would then never read), and the teardown waits for it, channel still booked, before it
frees the channel and reports.
"""

from __future__ import annotations

import asyncio
import logging

from msgspec import UNSET

from appliance.core import protocol as p
from appliance.core.tasks import spawn
from appliance.edges import bus
from appliance.edges.aps_client import ApsUnavailable, VerifyRejected, VerifyResult
from appliance.recording.capture import CallRecorder
from workers.call_state import Event, Release, State
from workers.host import CallHost, Relayed
from workers.leg import WebRtcLeg
from workers.room import Room
from workers.room_watch import watch_thresholds
from workers.rooms import RoomRegistry
from workers.sip_leg import CallParties, SipLeg
from workers.video_relay import VideoRelay

log = logging.getLogger("appliance.call")


def _opt(value: object) -> object:
    return None if value is UNSET else value


class UserCall:
    module = "User"

    def __init__(self, host: CallHost, rooms: RoomRegistry, relay: VideoRelay, conn: int,
                 channel: int, offer: p.Offer) -> None:
        self._host = host
        self._rooms = rooms
        self._relay = relay
        self.conn = conn
        self.channel = channel
        self.offer = offer
        self.dialogid = offer.dialogid
        self.ref = offer.ref
        self.leg = WebRtcLeg(host, relay, self, conn, channel, offer, module=self.module,
                             send_kinds=("audio", "video"))
        self.roomkey: int | None = None
        self.room: Room | None = None
        self.sip: SipLeg | None = None
        self.recorder: CallRecorder | None = None
        self._rtcp_sync: asyncio.TimerHandle | None = None
        self._verify: asyncio.Task[VerifyResult] | None = None
        self._closed = asyncio.Event()

    # -- Call: what the worker drives -------------------------------------------------------

    def start(self) -> None:
        self.leg.start()

    def client_action(self, action: p.Action) -> None:
        if isinstance(action, p.DTMF):
            if self.sip is not None and self.leg.state in (State.RINGING, State.ANSWERED):
                self.sip.send_dtmf(action.value)
            else:
                log.info("channel %d: DTMF %s ignored before the phone leg is up",
                         self.channel, action.value)
        elif isinstance(action, p.PeerData) and self.room is not None:
            self.room.command(self.leg, action)
        else:
            self.leg.client_action(action)

    def connection_closed(self) -> None:
        self.leg.connection_closed()

    def shutdown(self) -> None:
        self.leg.shutdown()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def relayed(self) -> Relayed:
        live = self.leg.relayed()
        voice = self.sip.native_voice if self.sip is not None else None
        if voice is None:
            return live
        # The phone's voice the native loop sent the browser (from the phone's socket).
        return Relayed(live.received, live.sent + voice.relayed_to_browser())

    # -- AP-S -----------------------------------------------------------------------------

    async def _verify_with_aps(self) -> VerifyResult:
        offer = self.offer
        result = await self._host.verify(
            channel=self.channel,
            dialogid=offer.dialogid,
            ref=offer.ref,
            caller=_opt(offer.caller),
            callee=_opt(offer.callee),
            userdata=_opt(offer.userdata) or "",
            suid=_opt(offer.suid),
            module=offer.module,
        )
        # Kept at once, even if the call is already over: the teardown reports its end.
        self.roomkey = result.roomkey
        return result

    async def admit(self) -> None:
        self._verify = asyncio.create_task(self._verify_with_aps(), name=f"verify-{self.channel}")
        try:
            # shield: the teardown cancels this setup task, never the request itself.
            result = await asyncio.shield(self._verify)
        except VerifyRejected as exc:
            log.info("channel %d: AP-S refused the user: %s", self.channel, exc)
            self.leg.apply(Event.VERIFY_REJECTED)
            return
        except ApsUnavailable as exc:
            log.warning("channel %d: AP-S unavailable: %s", self.channel, exc)
            self.leg.apply(Event.APS_DOWN)
            return
        if result.notify is not None:
            # Duplicate login (Flow 3): the supervisor tells the other appliance; this call
            # goes on at once, whatever becomes of that notice.
            n = result.notify
            self._host.send(bus.NotifyPeer(n.ms, n.roomkey, n.message))
        if not self.leg.live:  # the browser hung up while AP-S was thinking
            return  # the teardown reports the end of this roomkey
        config = self._host.config
        self.room = Room(result.roomkey, self.leg, self._relay,
                         watch_thresholds(config.conditions), config.messages)
        self._rooms.open(self.room)
        self._host.send(bus.RoomOpened(self.channel, result.roomkey))
        self.leg.apply(Event.VERIFY_OK)
        self.leg.send(p.Alert(dialogid=self.dialogid, ref=self.ref, channel=self.channel))

    # -- connected: the room and the desk phone ----------------------------------------

    def connected(self) -> None:
        if self.offer.record == 1:
            self._start_recording()
        if self.room is not None:
            self.room.user_connected(self._relay.receive(self.leg), self.recorder)
        spawn(self._start_sip(), f"sip-{self.channel}")

    def _start_recording(self) -> None:
        assert self.roomkey is not None and self.room is not None
        config = self._host.config
        try:
            recorder = CallRecorder(
                config.recording_path, roomkey=self.roomkey, appliance_id=config.appliance.id,
                dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                video=self.leg.video is not None)
        except OSError as exc:
            # The call goes on unrecorded; the operator sees why.
            log.error("channel %d: cannot record: %s", self.channel, exc)
            return
        recorder.start()
        self.recorder = recorder
        log.info("channel %d: recording to %s", self.channel, recorder.record_file)
        self.leg.send(p.RecordStatus(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                                     medium=self.offer.medium, status="start",
                                     record_file=recorder.record_file))
        spawn(self._host.report_record_file(self.roomkey, recorder.record_file))

    async def _start_sip(self) -> None:
        endpoint = self._host.sip_endpoint
        offer = self.offer
        if endpoint is None:
            self.leg.apply(Event.SIP_SETUP_FAILED, "no SIP endpoint on this worker")
            return
        if offer.callee is UNSET:
            self.leg.apply(Event.SIP_SETUP_FAILED, "the offer names no callee")
            return
        audio = self.leg.audio
        if audio is None:
            self.leg.apply(Event.SIP_SETUP_FAILED, "the offer has no audio")
            return
        assert self.roomkey is not None
        caller = "anonymous" if offer.caller is UNSET else str(offer.caller)
        self.sip = SipLeg(self, self.leg, endpoint, self._host.config)
        try:
            await self.sip.start(audio, CallParties(caller, str(offer.callee), self.roomkey))
            self.sip.record_to(self.recorder)
            if self.room is not None:
                self.room.voice_connected(self.sip.bridge)
        except Exception as exc:
            log.exception("channel %d: cannot start the SIP leg", self.channel)
            self.leg.apply(Event.SIP_SETUP_FAILED, str(exc) or type(exc).__name__)
            return
        if self.leg.live:
            self.leg.apply(Event.INVITE_SENT)
            self._schedule_rtcp_sync()
        else:
            self.sip.close()

    def _schedule_rtcp_sync(self) -> None:
        if self.sip is not None and self.leg.live:
            # Re-armed first: one failed sync must not stop the call's sender reports.
            self._rtcp_sync = asyncio.get_running_loop().call_later(1.0, self._schedule_rtcp_sync)
            self.sip.sync_rtcp()

    # -- SipLegOwner ------------------------------------------------------------------------

    def sip_ringing(self) -> None:
        self.leg.apply(Event.SIP_RINGING)

    def sip_answered(self) -> None:
        self.leg.apply(Event.SIP_ANSWERED)
        if not self.leg.live:
            return
        self.leg.send(self._audio_peerdata("Join"))
        if self.roomkey is not None:
            spawn(self._host.report_answered(self.roomkey))

    def sip_failed(self, cause: int, causestring: str) -> None:
        if self.leg.state is State.ANSWERED:  # the phone left an answered call
            self.leg.send(self._audio_peerdata("Leave"))
        self.leg.apply(Event.SIP_FAILED, release=Release(cause, causestring))

    def sip_hangup(self) -> None:
        if self.leg.state is State.ANSWERED:
            self.leg.send(self._audio_peerdata("Leave"))
        self.leg.apply(Event.SIP_BYE)

    def phone_dtmf(self, key: str) -> None:
        if self.leg.live:
            self.leg.send(p.DTMF(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                                 value=key))

    def _audio_peerdata(self, what: str) -> p.PeerData:
        # The desk phone has no channel of its own: it is this call's SIP side.
        return p.PeerData(dialogid=self.dialogid, ref=self.ref, channel=self.channel,
                          peerchannel=self.channel, type="indication", medium="audio",
                          peerdata=what, value="width=0000;height=0000")

    # -- the end ---------------------------------------------------------------------------

    def released(self, release: Release) -> None:
        if self._rtcp_sync is not None:
            self._rtcp_sync.cancel()
        if self.sip is not None:
            self.sip.close()  # BYE or CANCEL unless the phone ended it
        if self.room is not None:
            self.room.user_ended()

    async def teardown(self, release: Release) -> None:
        # The channel, and with it the call's setup slot, stays booked until a verify in
        # flight settles: that is what bounds the AP-S requests in flight ([admission]
        # max_setup_*), however fast a client opens offers and closes the tab.
        await self._verify_settled()
        await self.leg.close()
        self._host.call_ended(self)
        try:
            await self._report_end(release)
        finally:
            self._closed.set()

    async def _report_end(self, release: Release) -> None:
        if self.roomkey is None:
            return
        if self.room is not None:
            self._rooms.close(self.room)
        recorder = self.recorder
        if recorder is not None:
            try:
                await recorder.close()
                self._host.send(bus.RecordingEnded(str(recorder.job_path)))
            except OSError:
                # The captures and job stay on disk: the supervisor picks them up.
                log.exception("channel %d: closing the recording failed", self.channel)
        await self._host.report_released(self.roomkey, release.cause, release.causestring,
                                         recorded=recorder is not None)

    async def _verify_settled(self) -> None:
        """Wait for a verify still in flight: its roomkey, if AP-S issues one, must be ended.

        Bounded by the AP-S client's own timeout and attempts; its failure was already
        handled (or no longer matters) by the time the call is torn down.
        """
        verify = self._verify
        if verify is None or verify.done():
            if verify is not None and not verify.cancelled():
                verify.exception()  # retrieved: no "exception was never retrieved" noise
            return
        log.info("channel %d: released while AP-S verifies; waiting for its answer to close "
                 "the call record", self.channel)
        try:
            await verify
        except (VerifyRejected, ApsUnavailable):
            pass  # no roomkey was issued, or none we can know of
        except Exception:
            log.exception("channel %d: AP-S verify failed", self.channel)
