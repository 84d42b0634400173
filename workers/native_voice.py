"""A call's voice relayed by the native loop (appliance.native, issue 13) instead of
Python: PCMU from the customer's browser to the desk phone and back.

The bridge (appliance/media/voice.py) stays the voice's owner and its reference: when the
native loop is there, its rewriters and meters are the loop's own objects from the first
packet (`parts`), so Python and the loop take turns on one stream with nothing handed
over - the same sequence numbers, timestamps and figures whoever sent the last packet.
`NativeVoice.sync` (the bridge's `on_change`) decides, each time something changed, what
the loop relays:

- browser -> phone: a route for the browser's PCMU on the customer's flow of the worker's
  native socket (the flow is shared with the camera: workers/native_flows.py), sent as
  plain RTP from the phone's RTP socket to the address its SDP gave; the loop does the
  sound check, our talkspurt markers, and the hold (stamp only); a key press towards the
  phone pauses it for the events' time.
- phone -> browser: the phone's RTP socket is drained by a loop of its own; a flow for the
  phone's address (the SDP's, or the latched one), a route for PCMU once the phone's first
  audio ended the ringback, SRTP-protected with one sender for the browser's audio SSRC,
  made before the stream's first packet and used by Python too (the ringback, a fallback):
  one rollover counter, never a repeated SRTP index.

Everything else stays Python: telephone-events either way, RTCP, the ringback, a recorded
call (the recorder's copy), Opus (transcoded), ICE-TCP legs, a source that is not the
phone's (refused and counted by the bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Protocol

from appliance import native
from appliance.edges.lite_transport import LiteConnection, SelectedPair
from appliance.edges.rtc_adapter import SrtpFastPath, SrtpKeys, srtp_keys
from appliance.media import rtp
from appliance.media.voice import PCMU_PT, BrowserAudio, VoiceBridge, VoiceParts
from workers import native_flows
from workers.native_video import host_port, udp_pair

log = logging.getLogger("appliance.native_voice")

PAUSE_NONE, PAUSE_DROP, PAUSE_STAMP = 0, 1, 2


class VoiceLeg(Protocol):
    """The customer's WebRTC leg, as the native voice reads it (workers/leg.py)."""

    pc: Any
    channel: int
    fast_path: SrtpFastPath | None

    @property
    def lite_connections(self) -> list[LiteConnection]: ...


class _Stats:
    """ReceiveStats' face over a native Meter: what RTCP and the quality figures read."""

    def __init__(self, meter: Any, clock_rate: int) -> None:
        self._meter = meter
        self.clock_rate = clock_rate
        self._expected_prior = 0
        self._received_prior = 0

    @property
    def ssrc(self) -> int:
        return int(self._meter.figures()["ssrc"])

    @property
    def received(self) -> int:
        return int(self._meter.figures()["received"])

    @property
    def expected(self) -> int:
        return int(self._meter.figures()["expected"])

    @property
    def extended_max(self) -> int:
        return int(self._meter.figures()["extended_max"])

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def jitter(self) -> float:
        return float(self._meter.figures()["jitter"])

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000 / self.clock_rate

    # The same block ReceiveStats builds, from these figures (one implementation).
    report_block = rtp.ReceiveStats.report_block


class NativeVoiceMeter:
    """StreamMeter's face over a native Meter: fed by Python (what comes up) and by the
    loop (what it relays), read by the room's watch, quality and RTCP."""

    is_vp8 = False
    width = 0
    height = 0
    keyframes = 0

    def __init__(self, clock_rate: int) -> None:
        self.native = native.module().Meter(clock_rate, False)
        self.rtp = _Stats(self.native, clock_rate)
        self._window_start = time.monotonic()

    def packet(self, header: rtp.RtpHeader, packet: bytes, arrival: float) -> bool:
        self.native.packet(packet, arrival)
        return False

    def window(self, now: float | None = None) -> tuple[float, float]:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._window_start, 1e-3)
        self._window_start = now
        octets, frames = self.native.take_window()
        return octets * 8 / elapsed / 1000, frames / elapsed


def parts(browser: BrowserAudio) -> VoiceParts:
    """The bridge's rewriters and meters as native objects (PCMU only: Opus is
    transcoded, in Python)."""
    m = native.module()
    return VoiceParts(
        m.Rewriter(browser.ssrc, browser.clock_rate, True, random.getrandbits(16),
                   random.getrandbits(32)),
        m.Rewriter(random.getrandbits(32), 8000, True, random.getrandbits(16),
                   random.getrandbits(32)),
        NativeVoiceMeter(browser.clock_rate),
        NativeVoiceMeter(8000))


class NativeVoice:
    """What the native loop relays of one call's voice; `sync` after every change."""

    def __init__(self, bridge: VoiceBridge, leg: VoiceLeg) -> None:
        self.bridge = bridge
        self.leg = leg
        self._keys: SrtpKeys | None = None
        self._browser_tx: Any = None
        self._flow_loop: Any = None  # the shared socket's loop holding the browser's flow
        self._flow: int | None = None
        self._to_phone = False  # the browser -> phone route is on the flow
        self._phone_flow: int | None = None  # on the phone socket's own loop
        self._phone_from: tuple[str, int] | None = None
        self._to_browser = False
        self._relayed_closed = 0
        self._timer: asyncio.TimerHandle | None = None
        self._observed: LiteConnection | None = None
        self._stopped_why = ""
        bridge.on_change = self.sync
        bridge.native_sound = self._last_sound
        # The browser's audio stream gets its one SRTP sender before its first packet (the
        # ringback is Python's): a sender taken over later would not know whether the
        # sequence numbers had wrapped (the rollover counter) and the browser would drop
        # everything. Without keys now, this stream stays Python's.
        if self._have_keys() and leg.fast_path is not None:
            assert self._keys is not None
            self._browser_tx = native.module().Srtp(self._keys.profile, self._keys.tx, True)
            leg.fast_path.use_tx_for(bridge.browser.ssrc, self._browser_tx)

    # -- the decisions -------------------------------------------------------------------

    def sync(self, _pair: SelectedPair | None = None) -> None:
        """Make the loop relay what it can of the bridge's voice now (and no more)."""
        try:
            self._sync()
        except Exception:  # the loop said no (a bug): Python relays, the call goes on
            log.exception("channel %d: native voice stopped; Python relays it",
                          self.leg.channel)
            self._stop()

    def _sync(self) -> None:
        bridge = self.bridge
        why = ("closed" if bridge.closed else "recorded" if bridge.recorder is not None
               else "transcoded" if bridge.transcoding else "")
        pair = udp_pair(self.leg) if not why else None
        if not why and pair is None:
            why = "the browser is not on a native UDP socket"
        if not why and not self._have_keys():
            why = "no SRTP keys yet"
        if why or pair is None:
            self._stop(why)
            return
        self._observe()
        loop = pair.socket.native
        if self._flow_loop is not None and self._flow_loop is not loop:
            self._stop("the browser moved to another socket")
        self._sync_to_phone(pair, loop)
        self._sync_to_browser(pair)

    def _have_keys(self) -> bool:
        if self._keys is None:
            try:
                self._keys = srtp_keys(self.leg.pc)
            except RuntimeError:
                return False
        return True

    def _observe(self) -> None:
        conns = self.leg.lite_connections
        conn = conns[0] if conns else None
        if conn is not self._observed:
            self._unobserve()
            if conn is not None:
                conn.on_select.append(self.sync)
                self._observed = conn

    def _unobserve(self) -> None:
        if self._observed is not None and self.sync in self._observed.on_select:
            self._observed.on_select.remove(self.sync)
        self._observed = None

    def _sync_to_phone(self, pair: Any, loop: Any) -> None:
        bridge = self.bridge
        dest = bridge.phone.remote_rtp
        pt = bridge.browser.payload_type
        if not self._to_phone:
            if dest is None:
                return  # no SDP from the phone yet (or held from the start): Python stamps
            assert self._keys is not None
            if self._flow is None:
                self._flow = native_flows.acquire(self.leg, loop, *host_port(pair), self._keys)
                self._flow_loop = loop
            loop.add_route(self._flow, pt, bridge.browser_meter.native,  # type: ignore[attr-defined]
                           bridge.to_phone, PCMU_PT, None, str(dest[0]), int(dest[1]),
                           voice=True, sound_check=True, fd=bridge.phone.rtp_fileno)
            self._to_phone = True
            log.info("channel %d: the customer's voice to the phone relayed by the native "
                     "loop", self.leg.channel)
        assert self._flow is not None
        # The browser moved (ICE-lite). If another flow has that address, its packets go
        # up and Python decides.
        with contextlib.suppress(ValueError):
            loop.move_flow(self._flow, *host_port(pair))
        now = time.monotonic()
        if dest is None:
            loop.set_paused(self._flow, pt, PAUSE_STAMP)
            return
        loop.set_route_dest(self._flow, pt, str(dest[0]), int(dest[1]))
        busy_until = bridge.dtmf_busy_until
        if now < busy_until:
            loop.set_paused(self._flow, pt, PAUSE_DROP)
            self._arm(busy_until - now)
        else:
            loop.set_paused(self._flow, pt, PAUSE_NONE)

    def _phone_source(self) -> tuple[str, int] | None:
        source = self.bridge.phone_source
        if source.latching:
            return source.latched_rtp()
        return source.expected()

    def _sync_to_browser(self, pair: Any) -> None:
        bridge = self.bridge
        phone_loop = bridge.phone.native_loop
        source = self._phone_source()
        if phone_loop is None or not bridge.phone_media or source is None \
                or self._browser_tx is None:
            return
        if self._phone_flow is None:
            self._phone_flow = phone_loop.add_flow(str(source[0]), int(source[1]), None)
            self._phone_from = source
            phone_loop.add_route(self._phone_flow, PCMU_PT, bridge.phone_meter.native,  # type: ignore[attr-defined]
                                 bridge.to_browser, bridge.browser.payload_type,
                                 self._browser_tx, *host_port(pair), voice=True,
                                 fd=pair.socket.fileno)
            self._to_browser = True
            log.info("channel %d: the phone's voice to the customer relayed by the native "
                     "loop", self.leg.channel)
            return
        if source != self._phone_from:  # a re-INVITE moved the phone's media, or a latch
            phone_loop.move_flow(self._phone_flow, str(source[0]), int(source[1]))
            self._phone_from = source
        phone_loop.set_route_dest(self._phone_flow, PCMU_PT, *host_port(pair))

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay + 0.001, self.sync)

    # -- ending ----------------------------------------------------------------------------

    def _stop(self, why: str = "") -> None:
        """Python relays the voice from here (the shared rewriters and meters go on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._to_phone and self._flow_loop is not None and self._flow is not None:
            self._to_phone = False
            with contextlib.suppress(KeyError):
                self._flow_loop.remove_route(self._flow, self.bridge.browser.payload_type)
        if self._flow is not None:
            self._flow = None
            self._flow_loop = None
            native_flows.release(self.leg)
        phone_loop = self.bridge.phone.native_loop
        if self._phone_flow is not None and phone_loop is not None:
            self._relayed_closed += self._phone_relayed(phone_loop)
            phone_loop.remove_flow(self._phone_flow)
        self._phone_flow = None
        self._phone_from = None
        self._to_browser = False
        if why and why != self._stopped_why and why not in ("closed", "no SRTP keys yet"):
            log.info("channel %d: voice on the Python path: %s", self.leg.channel, why)
        self._stopped_why = why
        if why == "closed":
            self._unobserve()

    def _phone_relayed(self, phone_loop: Any) -> int:
        if self._phone_flow is None:
            return 0
        try:
            return int(phone_loop.route_stats(self._phone_flow, PCMU_PT)["relayed"])
        except KeyError:
            return 0

    # -- what the worker reads -------------------------------------------------------------

    def _last_sound(self) -> float | None:
        if not self._to_phone or self._flow is None or self._flow_loop is None:
            return None
        heard = float(self._flow_loop.route_stats(
            self._flow, self.bridge.browser.payload_type)["last_sound"])
        return heard or None

    def relayed_to_browser(self) -> int:
        """Packets the phone's loop sent the browser (the worker's packet counts)."""
        phone_loop = self.bridge.phone.native_loop
        live = self._phone_relayed(phone_loop) if phone_loop is not None else 0
        return self._relayed_closed + live

    @property
    def relaying(self) -> tuple[bool, bool]:
        """(browser -> phone, phone -> browser) on the native loop now."""
        return self._to_phone, self._to_browser
