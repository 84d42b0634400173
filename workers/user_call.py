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
from appliance.call_state import CallMachine, Event, Transition
from appliance.rtc_adapter import apply_candidate_policy, make_configuration
from appliance.sdp_candidates import local_candidates
from appliance.tasks import spawn

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
        try:
            await pc.setRemoteDescription(RTCSessionDescription(self.offer.offer.sdp, "offer"))
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

    def connection_closed(self) -> None:
        self._apply(Event.CONNECTION_CLOSED)

    def shutdown(self) -> None:
        self._apply(Event.SHUTDOWN)

    # -- the machine's decisions -------------------------------------------------------

    def _apply(self, event: Event, detail: str = "") -> None:
        transition = self.machine.handle(event, detail)
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
        spawn(self._teardown(release.cause, release.causestring), f"teardown-{self.channel}")

    async def _teardown(self, cause: int, causestring: str) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
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
