"""The desk-phone half of a User call: INVITE, the RTP sockets and the voice bridge.

It turns SIP events into a few calls on its owner (`SipLegOwner`), and the owner's
decisions (hang up, send a key) into SIP and RTP. The voice crosses to the customer's
browser through the WebRTC leg it is given (`BrowserLeg`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance import native
from appliance.core.config import Config
from appliance.edges.rtc_adapter import AudioSender, sync_sender_report
from appliance.media import rtp
from appliance.media.codec_choice import AudioChoice
from appliance.media.ringback import Cadence
from appliance.media.rtp import ntp_now
from appliance.media.sip_rtp import RtpSocketPair
from appliance.media.voice import BrowserAudio, VoiceBridge, VoiceRecorder
from appliance.sip import events as sip_events
from appliance.sip.auth import Credentials
from appliance.sip.endpoint import SipEndpoint
from appliance.sip.sdp import SdpError, audio_endpoint, build_offer
from appliance.sip.session_timer import TimerSettings
from workers import native_voice

log = logging.getLogger("appliance.sip_leg")


class SipLegOwner(Protocol):
    """The call the SIP leg belongs to: what the phone's side did."""

    def sip_ringing(self) -> None: ...
    def sip_answered(self) -> None: ...
    def sip_failed(self, cause: int, causestring: str) -> None: ...
    def sip_hangup(self) -> None: ...
    def phone_dtmf(self, key: str) -> None: ...


class BrowserLeg(native_voice.VoiceLeg, Protocol):
    """The customer's WebRTC leg (`WebRtcLeg`), as the voice bridge uses it."""

    channel: int

    def audio_sender(self) -> AudioSender: ...
    def send_rtp(self, packet: bytes) -> None: ...
    def send_rtcp(self, packet: bytes) -> None: ...
    def route_rtp(self, payload_type: int, sink: Callable[[bytes], None]) -> None: ...


@dataclass(frozen=True)
class CallParties:
    caller: str
    callee: str
    roomkey: int


def user_to_user(roomkey: int) -> str:
    """`User-to-User: <hex>;encoding=hex` (RFC 7433) carrying the room the agent joins."""
    info = json.dumps({"roomkey": roomkey}, separators=(",", ":")).encode()
    return f"{info.hex()};encoding=hex"


class SipLeg:
    def __init__(self, owner: SipLegOwner, browser: BrowserLeg, endpoint: SipEndpoint,
                 config: Config) -> None:
        self.owner = owner
        self.browser = browser
        self.channel = browser.channel
        self.endpoint = endpoint
        self.config = config
        self.call_id: str | None = None
        self.bridge: VoiceBridge | None = None
        self.native_voice: native_voice.NativeVoice | None = None
        self._ended = False

    async def start(self, audio: AudioChoice, parties: CallParties) -> None:
        sip = self.config.sip
        rtp_address = sip.rtp_address or sip.listen
        # PCMU passes through as packets: the native loop may relay it (Opus is transcoded).
        use_native = (self.config.media.native_loop and native.AVAILABLE
                      and audio.codec == "PCMU")
        sockets = await RtpSocketPair.open(
            rtp_address, sip.rtp_port_min, sip.rtp_port_max,
            on_rtp=self._from_phone, on_rtcp=self._from_phone_rtcp,
            native_loop=native.module().PortLoop if use_native else None,
        )
        sender = self.browser.audio_sender()
        browser_audio = BrowserAudio(audio.codec, audio.payload_type, sender.ssrc,
                                     self.browser.send_rtp)
        self.bridge = VoiceBridge(
            browser_audio,
            sockets,
            on_dtmf=self.owner.phone_dtmf,
            cadence=Cadence(tuple(sip.ringback_hz), sip.ringback_on_ms, sip.ringback_off_ms),
            cname=self.config.appliance.id,
            latching=sip.rtp_latching,
            label=f"channel {self.channel}: ",
            parts=native_voice.parts(browser_audio) if use_native else None,
        )
        if use_native:
            self.native_voice = native_voice.NativeVoice(self.bridge, self.browser)
        self.bridge.start()
        self.browser.route_rtp(audio.payload_type, self.bridge.from_browser)
        credentials = Credentials(sip.username, sip.password) if sip.username else None
        call = self.endpoint.place_call(
            parties.caller,
            parties.callee,
            build_offer(rtp_address, sockets.port),
            self._on_event,
            extra_headers=[("User-to-User", user_to_user(parties.roomkey))],
            credentials=credentials,
            ring_timeout=sip.ring_timeout,
            session_timer=TimerSettings(sip.session_expires, sip.session_min_se),
        )
        self.call_id = call.call_id
        log.info("channel %d: INVITE %s -> %s (Call-ID %s, RTP %s:%d)", self.channel,
                 parties.caller, parties.callee, call.call_id, rtp_address, sockets.port)

    def record_to(self, recorder: VoiceRecorder | None) -> None:
        """The call's recorder hears both sides of the voice from now on."""
        if self.bridge is not None:
            self.bridge.record_to(recorder)

    # -- media taps ----------------------------------------------------------------------

    def _from_phone(self, packet: bytes, addr: tuple[str, int]) -> None:
        if self.bridge is not None:
            self.bridge.from_phone(packet, addr)

    def _from_phone_rtcp(self, packet: bytes, addr: tuple[str, int]) -> None:
        if self.bridge is not None:
            self.bridge.from_phone_rtcp(packet, addr)

    def sync_rtcp(self) -> None:
        """Once a second: keep aiortc's sender reports to the browser true to the relayed
        audio, and report to the browser what we receive of its audio (aiortc's receiver
        never sees those packets, so it cannot)."""
        if self.bridge is None:
            return
        out = self.bridge.to_browser
        sender = self.browser.audio_sender()
        sync_sender_report(sender.sender, out.packets, out.octets, out.last_timestamp, ntp_now())
        stats = self.bridge.browser_meter.rtp
        if stats.received:
            self.browser.send_rtcp(rtp.receiver_report(sender.ssrc, [stats.report_block()]))

    # -- SIP events ----------------------------------------------------------------------

    def _on_event(self, event: sip_events.CallEvent) -> None:
        if self._ended and not isinstance(event, sip_events.Terminated):
            return
        if isinstance(event, sip_events.Ringing):
            if event.sdp is None:
                if self.bridge is not None:
                    self.bridge.start_ringback()
            else:
                self._use_phone_sdp(event.sdp)
            self.owner.sip_ringing()
        elif isinstance(event, sip_events.Answered):
            self._use_phone_sdp(event.sdp)
            if self.bridge is not None:
                self.bridge.answered()
            self.owner.sip_answered()
        elif isinstance(event, sip_events.RemoteMediaChanged):
            self._use_phone_sdp(event.sdp)
        elif isinstance(event, sip_events.InfoDtmf):
            self.owner.phone_dtmf(event.key)
        elif isinstance(event, sip_events.Failed):
            self._ended = True
            log.info("channel %d: SIP %d %s -> cause %d %s", self.channel, event.status,
                     event.reason, event.cause, event.causestring)
            self.owner.sip_failed(event.cause, event.causestring)
        elif isinstance(event, sip_events.RemoteHangup):
            self._ended = True
            if event.cause == sip_events.RemoteHangup.cause:
                self.owner.sip_hangup()
            else:  # e.g. 102 when the session timer expired: the browser learns why
                log.info("channel %d: SIP dialog ended, cause %d %s", self.channel,
                         event.cause, event.causestring)
                self.owner.sip_failed(event.cause, event.causestring)
        elif isinstance(event, sip_events.Terminated):
            self.call_id = None

    def _use_phone_sdp(self, sdp: str) -> None:
        if self.bridge is None:
            return
        try:
            far = audio_endpoint(sdp)
        except SdpError as exc:
            log.warning("channel %d: unusable SDP from the phone: %s", self.channel, exc)
            return
        self.bridge.phone_sdp(far.address, far.port, far.telephone_event_pt, hold=far.on_hold)

    # -- the owner's commands ------------------------------------------------------------

    def send_dtmf(self, key: str) -> None:
        if self.call_id is None:
            return
        rfc4733 = self.config.sip.dtmf_mode == "rfc4733" and self.bridge is not None
        # Events on the RTP when the phone accepted telephone-event; SIP INFO otherwise.
        if not (rfc4733 and self.bridge is not None and self.bridge.send_dtmf(key)):
            self.endpoint.send_info_dtmf(self.call_id, key)

    def hangup(self) -> None:
        """BYE when answered, CANCEL while ringing; nothing if the phone already ended it."""
        if not self._ended and self.call_id is not None:
            self.endpoint.hangup(self.call_id)
        self._ended = True

    def close(self) -> None:
        self.hangup()
        if self.bridge is not None:
            self.bridge.close()
