"""The voice half of a call: browser (SRTP, via the fast path) <-> desk phone (plain RTP).

Packets are relayed as they are when the browser speaks PCMU: new SSRC and payload type,
continuous sequence numbers and timestamps across ringback -> early media -> answered
audio, across a hold and DTMF events. The marker bit is ours, not the sender's: set at
each source switch and at the start of a talkspurt (rtp.TalkSpurts). Only a browser that
insists on Opus is transcoded.

Only the phone's RTP and RTCP are taken from the phone's socket pair: the source address
must be the one its SDP gave (rtp_source.PeerFilter); anything else is counted and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.core.throttle import Tally
from appliance.media import rtp
from appliance.media.conditions import opus_has_sound, pcmu_has_sound
from appliance.media.datagrams import DROPS
from appliance.media.dtmf import EventDetector, key_packets
from appliance.media.quality import StreamMeter
from appliance.media.ringback import Cadence, Ringback
from appliance.media.rtp_source import PeerFilter
from appliance.media.sip_rtp import Address, RtpSocketPair
from appliance.media.transcode import OpusToPcmu, PcmuToOpus

log = logging.getLogger("appliance.voice")

PCMU_PT = 0
FRAME_SECONDS = 0.020
RTCP_INTERVAL = 5.0

# The rewriter's "source" while we play the tone: above every SSRC (2^32 - 1), an int so
# that the native rewriter (appliance.native) takes it as well as RtpRewriter.
RINGBACK_SOURCE = 1 << 32


class Rewriter(Protocol):
    """rtp.RtpRewriter, or the native loop's Rewriter that behaves byte for byte the same
    (so that Python and the native loop can take turns on one outgoing stream)."""

    ssrc: int
    packets: int
    octets: int

    @property
    def last_timestamp(self) -> int: ...
    def mark_next(self) -> None: ...
    def stamp(self, source: int, timestamp: int, now: float) -> int: ...
    def rewrite(self, source: int, payload_type: int, marker: bool, timestamp: int,
                payload: bytes, now: float) -> bytes: ...
    def inject(self, payload_type: int, marker: bool, timestamp: int,
               payload: bytes) -> bytes: ...


class Meter(Protocol):
    """quality.StreamMeter's face: what the bridge feeds and the room's watch reads."""

    rtp: Any

    def packet(self, header: rtp.RtpHeader, packet: bytes, arrival: float) -> bool: ...
    def window(self, now: float | None = None) -> tuple[float, float]: ...


@dataclass
class VoiceParts:
    """The bridge's rewriters and meters. Python's by default; the worker gives native ones
    when the native loop may take the voice over (workers/native_voice.py)."""

    to_browser: Rewriter
    to_phone: Rewriter
    browser_meter: Meter
    phone_meter: Meter


def python_parts(browser: BrowserAudio) -> VoiceParts:
    return VoiceParts(rtp.RtpRewriter(browser.ssrc, browser.clock_rate),
                      rtp.RtpRewriter(clock_rate=8000),
                      StreamMeter(browser.clock_rate), StreamMeter(8000))


class VoiceRecorder(Protocol):
    """Where a recorded call's voice goes: each direction's µ-law payloads as relayed, with
    the RTP timestamps that place them. The recorder (appliance.recording.capture) is one;
    declared here so the bridge knows nothing of recording but these two calls."""

    def customer_audio(self, timestamp: int, payload: bytes) -> None:
        """The customer's audio as the phone hears it, on the phone-bound timeline."""

    def phone_audio(self, timestamp: int, payload: bytes) -> None:
        """The desk phone's audio, on the phone's own RTP timestamps."""


@dataclass
class BrowserAudio:
    """What was negotiated with the browser for audio."""

    codec: str  # "PCMU" or "OPUS"
    payload_type: int
    ssrc: int  # our sender's SSRC as announced in the answer SDP
    send: Callable[[bytes], None]  # SrtpFastPath.send_rtp

    @property
    def clock_rate(self) -> int:
        return 48000 if self.codec == "OPUS" else 8000


class VoiceBridge:
    def __init__(
        self,
        browser: BrowserAudio,
        phone: RtpSocketPair,
        on_dtmf: Callable[[str], None],
        cadence: Cadence | None = None,
        cname: str = "appliance",
        latching: bool = False,
        label: str = "",
        parts: VoiceParts | None = None,
    ) -> None:
        self.browser = browser
        self.phone = phone
        self.on_dtmf = on_dtmf
        self.cname = cname
        parts = parts or python_parts(browser)
        self.to_browser: Rewriter = parts.to_browser
        self.to_phone: Rewriter = parts.to_phone
        self.browser_meter: Meter = parts.browser_meter
        self.phone_meter: Meter = parts.phone_meter
        # Told of what the native loop must follow (workers/native_voice.py): the phone's
        # address or hold changed, a key press took the stream's place, the bridge closed.
        self.on_change: Callable[[], None] | None = None
        self.phone_event_pt: int | None = None
        self.phone_source = PeerFilter(latching)
        # One line per call per interval however fast a stranger sprays the port.
        self._refusals = Tally(log, f"{label}RTP/RTCP not from the phone's SDP address")
        self._held = False
        self._from_browser_spurts = rtp.TalkSpurts(browser.clock_rate)
        self._from_phone_spurts = rtp.TalkSpurts(8000)
        self._to_browser_mark = False
        self._dtmf_in = EventDetector()
        self._cadence = cadence or Cadence()
        self._ringback: Ringback | None = None
        self._ringback_timer: asyncio.TimerHandle | None = None
        self._next_tick = 0.0
        self._phone_media = False  # first RTP from the phone ends the ringback tone
        self._dtmf_busy_until = 0.0
        self._rtcp_timer: asyncio.TimerHandle | None = None
        self._closed = False
        opus = browser.codec == "OPUS"
        self._opus_to_pcmu = OpusToPcmu() if opus else None
        self._pcmu_to_opus = PcmuToOpus() if opus else None
        self._last_sound_at: float | None = None  # the customer's microphone, last heard
        # When the native loop relays the customer's voice, it samples it for sound too.
        self.native_sound: Callable[[], float | None] | None = None
        self.recorder: VoiceRecorder | None = None  # the call's recording tap, if recorded
        self._has_sound = opus_has_sound if browser.codec == "OPUS" else pcmu_has_sound
        self._transcoded_ts = 0  # our own timelines for transcoded frames
        self._opus_out_ts = 0
        self._to_phone_ts = 0

    # -- set-up from the SIP leg ---------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._rtcp_timer = loop.call_later(RTCP_INTERVAL, self._send_rtcp)

    def start_ringback(self) -> None:
        """180 without SDP: play the tone until the phone sends media or answers."""
        if self._ringback is not None or self._phone_media or self._closed:
            return
        self._ringback = Ringback(self._cadence)
        self._next_tick = asyncio.get_running_loop().time()
        self._tick()

    def stop_ringback(self) -> None:
        if self._ringback_timer is not None:
            self._ringback_timer.cancel()
            self._ringback_timer = None
        self._ringback = None

    def phone_sdp(self, host: str, port: int, event_pt: int | None, hold: bool = False) -> None:
        """Where the phone wants its RTP and sends its own from (183/200 SDP, or a
        re-INVITE of the dialog moving it). On hold (sendonly, inactive, c=0.0.0.0) the
        phone wants nothing from us: stop sending, with no gap in our sequence numbers."""
        self.phone_source.expect(host, port)
        if hold:
            self.phone.remote_rtp = None
        else:
            if self._held:
                self.to_phone.mark_next()  # after the hold, a new talkspurt for the phone
            self.phone.set_remote(host, port)
            latched = self.phone_source.latched_rtp()
            if latched is not None:
                self.phone.remote_rtp = latched
        self._held = hold
        self.phone_event_pt = event_pt
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def record_to(self, recorder: VoiceRecorder | None) -> None:
        """The call's recorder hears both sides from now on (Python relays them then)."""
        self.recorder = recorder
        self._changed()

    @property
    def last_sound_at(self) -> float | None:
        """When (monotonic) the customer's microphone was last heard, by either path."""
        native = self.native_sound() if self.native_sound is not None else None
        ours = self._last_sound_at
        if native is None or ours is None:
            return native if ours is None else ours
        return max(native, ours)

    @property
    def held(self) -> bool:
        """The phone holds the call (its SDP: sendonly, inactive, c=0.0.0.0)."""
        return self._held

    @property
    def phone_media(self) -> bool:
        """The phone has sent its audio (the ringback tone is over)."""
        return self._phone_media

    @property
    def dtmf_busy_until(self) -> float:
        """Until when (monotonic) key presses take the customer's audio's place."""
        return self._dtmf_busy_until

    @property
    def transcoding(self) -> bool:
        return self._opus_to_pcmu is not None

    def answered(self) -> None:
        self.stop_ringback()

    def _tick(self) -> None:
        if self._ringback is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        # Schedule against the ideal time so the tone does not drift with loop latency;
        # re-armed before the frame goes out, so a failing send cannot stop the tone.
        self._next_tick += FRAME_SECONDS
        delay = max(0.0, self._next_tick - loop.time())
        self._ringback_timer = loop.call_later(delay, self._tick)
        ts, payload = self._ringback.next_frame()
        self._to_browser_pcmu(RINGBACK_SOURCE, ts, payload)

    # -- browser -> phone ----------------------------------------------------------------

    def from_browser(self, packet: bytes) -> None:
        header = rtp.parse_header(packet)
        if header is None or header.payload_type != self.browser.payload_type:
            return
        now = time.monotonic()
        self.browser_meter.packet(header, packet, now)
        payload = rtp.payload_of(packet, header)
        # Look for sound in one packet of 10 (5 a second): enough for the 510 warning.
        if header.sequence % 10 == 0 and self._has_sound(payload):
            self._last_sound_at = now
        if now < self._dtmf_busy_until:
            return  # a key press is on the wire in this stream's place
        silence = self._from_browser_spurts.starts(header.sequence, header.timestamp)
        if self._opus_to_pcmu is None:
            self._to_phone(header.ssrc, header.timestamp, payload, silence > 0, now)
            return
        if silence:  # our own timeline jumps over the sender's silence too (in 8 kHz units)
            self._transcoded_ts = (self._transcoded_ts + silence // 6) & 0xFFFFFFFF
        for frame in self._opus_to_pcmu.feed(payload):
            self._transcoded_ts = (self._transcoded_ts + 160) & 0xFFFFFFFF
            self._to_phone(header.ssrc, self._transcoded_ts, frame, silence > 0, now)
            silence = 0

    def _to_phone(self, source: int, timestamp: int, payload: bytes, spurt: bool,
                  now: float) -> None:
        if self.phone.remote_rtp is None:
            # On hold (or no SDP yet): not sent, so no sequence number is used up; the
            # timeline still moves with the clock for the recording and the resume.
            self._to_phone_ts = self.to_phone.stamp(source, timestamp, now)
        else:
            out = self.to_phone.rewrite(source, PCMU_PT, spurt, timestamp, payload, now)
            self._to_phone_ts = self.to_phone.last_timestamp
            self.phone.send_rtp(out)
        if self.recorder is not None:
            self.recorder.customer_audio(self._to_phone_ts, payload)

    # -- phone -> browser ----------------------------------------------------------------

    def _refused(self, kind: str, addr: Address) -> None:
        DROPS.refused_source += 1
        expected = self.phone_source.expected(rtcp=kind == "RTCP")
        detail = (f"{kind}, the phone's SDP says {expected[0]}:{expected[1]}"
                  if expected is not None else f"{kind}, no SDP from the phone yet")
        self._refusals.note(time.monotonic(), addr, detail)

    @property
    def refused_source(self) -> int:
        """Datagrams this call refused: not from the address the phone's SDP gave."""
        return self.phone_source.refused

    def from_phone(self, packet: bytes, addr: Address) -> None:
        if not self.phone_source.accept_rtp(addr):
            self._refused("RTP", addr)
            return
        latched = self.phone_source.latched_rtp()
        if latched is not None and not self._held and self.phone.remote_rtp != latched:
            self.phone.remote_rtp = latched  # symmetric RTP: answer where it comes from
            self._changed()
        header = rtp.parse_header(packet)
        if header is None:
            return
        self.phone_meter.packet(header, packet, time.monotonic())
        if header.payload_type == self.phone_event_pt:
            key = self._dtmf_in.feed(header.timestamp, rtp.payload_of(packet, header))
            if key is not None:
                self.on_dtmf(key)
            return
        if header.payload_type != PCMU_PT:
            return
        if not self._phone_media:
            self._phone_media = True
            self.stop_ringback()
            self._changed()
        payload = rtp.payload_of(packet, header)
        if self.recorder is not None:
            self.recorder.phone_audio(header.timestamp, payload)
        silence = self._from_phone_spurts.starts(header.sequence, header.timestamp)
        self._to_browser_pcmu(header.ssrc, header.timestamp, payload, silence)

    def _to_browser_pcmu(self, source: int, timestamp: int, payload: bytes,
                         silence: int = 0) -> None:
        if self._pcmu_to_opus is None:
            self.browser.send(
                self.to_browser.rewrite(source, self.browser.payload_type, silence > 0,
                                        timestamp, payload, time.monotonic())
            )
            return
        if silence:
            self._opus_out_ts = (self._opus_out_ts + 6 * silence) & 0xFFFFFFFF
            self._to_browser_mark = True
        for frame in self._pcmu_to_opus.feed(payload):
            # 20 ms of Opus at 48 kHz per frame; the source switch logic keeps continuity.
            self._opus_out_ts = (self._opus_out_ts + 960) & 0xFFFFFFFF
            self.browser.send(
                self.to_browser.rewrite(source, self.browser.payload_type,
                                        self._to_browser_mark, self._opus_out_ts, frame,
                                        time.monotonic())
            )
            self._to_browser_mark = False

    # -- DTMF towards the phone ----------------------------------------------------------

    def send_dtmf(self, key: str, duration_ms: int = 160) -> bool:
        """RFC 4733 events on the phone's RTP; False when the phone did not offer them."""
        if self.phone_event_pt is None or self.phone.remote_rtp is None:
            return False
        packets = key_packets(key, duration_ms)
        loop = asyncio.get_running_loop()
        # The phone-bound timeline as whoever last stamped it left it (Python or the loop).
        start_ts = (self.to_phone.last_timestamp + 160) & 0xFFFFFFFF
        self._dtmf_busy_until = time.monotonic() + FRAME_SECONDS * (len(packets) + 1)
        pt = self.phone_event_pt
        for i, event in enumerate(packets):
            loop.call_later(
                i * FRAME_SECONDS,
                self._send_event, pt, event.first, start_ts, event.payload,
            )
        self._changed()
        return True

    def _send_event(self, pt: int, first: bool, timestamp: int, payload: bytes) -> None:
        if not self._closed:
            self.phone.send_rtp(self.to_phone.inject(pt, first, timestamp, payload))

    # -- RTCP towards the phone (so a PBX's quality view works) --------------------------

    def _send_rtcp(self) -> None:
        if self._closed:
            return
        # Re-arm first: a report that fails must not end the call's RTCP for good.
        self._rtcp_timer = asyncio.get_running_loop().call_later(RTCP_INTERVAL, self._send_rtcp)
        now = time.monotonic()
        due = self._refusals.deadline()
        if due is not None and now >= due:
            self._refusals.flush(now)  # the summary of refusals once the attack stops
        stats = self.phone_meter.rtp
        blocks = [stats.report_block()] if stats.received else []
        self.phone.send_rtcp(
            rtp.sender_report(
                self.to_phone.ssrc,
                self.to_phone.last_timestamp,
                self.to_phone.packets,
                self.to_phone.octets,
                blocks,
                cname=self.cname,
            )
        )

    def from_phone_rtcp(self, packet: bytes, addr: Address) -> None:
        if not self.phone_source.accept_rtcp(addr):
            self._refused("RTCP", addr)
            return
        latched = self.phone_source.latched_rtcp()
        if latched is not None:
            self.phone.remote_rtcp = latched
        # Kept for quality stats; the phone's reports about our stream live here.
        self.last_phone_rtcp = packet

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self.stop_ringback()
        if self._rtcp_timer is not None:
            self._rtcp_timer.cancel()
        self._changed()  # the native loop lets go of the phone's socket before it closes
        self.phone.close()
