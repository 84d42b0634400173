"""A camera's packets relayed by the native loop (appliance.native, issue 13) instead of
Python, where both browsers are on the same native UDP media socket of the worker.

`offload(path, source, sink)` is tried after a VideoPath is connected (PacketRelay.join).
It succeeds only when it can be exactly what the Python path would do: both legs' selected
pairs are UDP pairs on one socket the native loop drains, the call is not recorded (the
recorder's copy is Python's), DTLS gave SRTP keys, and the receiving leg's outgoing stream
has not been sent by Python yet (one rewriter and one SRTP sender per stream, for ever: a
sequence number or SRTP index must never be reused). Then the loop holds a flow (the
source browser's address and its inbound keys) and a route (the VP8 payload type, a meter,
a rewriter, the sink's outbound keys and address); the path keeps its RTCP duties (PLI,
REMB, reports) and hands the loop its pauses and the NACKs.

A browser that moves (a new address, ICE-lite) is followed: its flow or the route's
destination moves with it. One that leaves the socket (to ICE-TCP) ends the offload; the
Python path then takes the stream over from the native rewriter's state.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Protocol

from appliance import native
from appliance.edges.lite_transport import LiteConnection, SelectedPair, UdpPair
from appliance.edges.rtc_adapter import SrtpFastPath, srtp_keys
from appliance.media import rtp
from appliance.media.codec_choice import CodecChoice
from appliance.media.quality import StreamMeter
from appliance.media.video import VIDEO_CLOCK, VideoPath, VideoSink
from workers import native_flows

log = logging.getLogger("appliance.native_video")


class NativeLeg(Protocol):
    """What the native relay reads of a browser's leg (workers/leg.py's NativeLeg)."""

    pc: Any
    channel: int
    video: CodecChoice | None
    fast_path: SrtpFastPath | None

    @property
    def lite_connections(self) -> list[LiteConnection]: ...

    def video_sink(self) -> VideoSink: ...


class _Figures:
    """ReceiveStats' face over the Python meter (before the offload, and whatever still
    comes up) and the native one, summed."""

    def __init__(self, python: StreamMeter, native_meter: Any) -> None:
        self._python = python.rtp
        self._native = native_meter
        self.clock_rate = python.rtp.clock_rate

    @property
    def expected(self) -> int:
        return int(self._python.expected + self._native.figures()["expected"])

    @property
    def received(self) -> int:
        return int(self._python.received + self._native.figures()["received"])

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def jitter(self) -> float:
        figures = self._native.figures()
        return float(figures["jitter"]) if figures["received"] else self._python.jitter

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000 / self.clock_rate


class NativeMeter:
    """StreamMeter's face (what the room's watch and quality read) while the native loop
    meters the stream."""

    def __init__(self, python: StreamMeter, native_meter: Any) -> None:
        self._python = python
        self._native = native_meter
        self.rtp = _Figures(python, native_meter)
        self.is_vp8 = python.is_vp8
        self._window_start = time.monotonic()

    def packet(self, header: rtp.RtpHeader, packet: bytes, arrival: float) -> bool:
        return self._python.packet(header, packet, arrival)

    @property
    def keyframes(self) -> int:
        return int(self._python.keyframes + self._native.figures()["keyframes"])

    @property
    def width(self) -> int:
        figures = self._native.figures()
        return int(figures["width"]) if figures["keyframes"] else self._python.width

    @property
    def height(self) -> int:
        figures = self._native.figures()
        return int(figures["height"]) if figures["keyframes"] else self._python.height

    def window(self, now: float | None = None) -> tuple[float, float]:
        """(kbit/s, frames/s) since the previous call, of both meters."""
        now = time.monotonic() if now is None else now
        kbps, fps = self._python.window(now)
        elapsed = max(now - self._window_start, 1e-3)
        self._window_start = now
        octets, frames = self._native.take_window()
        return kbps + octets * 8 / elapsed / 1000, fps + frames / elapsed


def udp_pair(leg: NativeLeg) -> UdpPair | None:
    conns = leg.lite_connections
    if len(conns) != 1:
        return None
    pair = conns[0]._nominated.get(1)
    return pair if isinstance(pair, UdpPair) and pair.socket.native is not None else None


def host_port(pair: UdpPair) -> tuple[str, int]:
    return str(pair.dest[0]), int(pair.dest[1])


class NativeRoute:
    """One camera's packets on the native loop: what VideoPath.offload is set to."""

    def __init__(self, path: VideoPath, source: NativeLeg, sink: NativeLeg, loop: Any,
                 flow: int, payload_type: int, meter: Any, rewriter: Any) -> None:
        self.path = path
        self.source = source
        self.sink = sink
        self.loop = loop
        self.flow = flow
        self.payload_type = payload_type
        self.meter = meter
        self.rewriter = rewriter
        self.closed = False
        self._relayed_at_close = 0
        source.lite_connections[0].on_select.append(self._source_moved)
        sink.lite_connections[0].on_select.append(self._sink_moved)

    # -- what VideoPath asks (appliance.media.video.Offload) ------------------------------

    def relayed(self) -> int:
        if self.closed:
            return self._relayed_at_close
        return int(self.loop.route_stats(self.flow, self.payload_type)["relayed"])

    def set_paused(self, paused: bool) -> None:
        if not self.closed:
            self.loop.set_paused(self.flow, self.payload_type, paused)

    def retransmit(self, lost: tuple[int, ...]) -> int:
        if self.closed:
            return 0
        return int(self.loop.retransmit(self.flow, self.payload_type, list(lost)))

    def awaiting_keyframe(self) -> bool:
        if self.closed:
            return False
        return bool(self.loop.route_stats(self.flow, self.payload_type)["await_keyframe"])

    def source_ssrc(self) -> int | None:
        figures = self.meter.figures()
        return int(figures["ssrc"]) if figures["received"] else None

    # -- the browsers moving -------------------------------------------------------------

    def _source_moved(self, pair: SelectedPair | None) -> None:
        if isinstance(pair, UdpPair) and pair.socket.native is self.loop:
            self.loop.move_flow(self.flow, *host_port(pair))
            log.info("native video: channel %d's camera now comes from %s:%d",
                     self.source.channel, *host_port(pair))
        else:
            self.close("the sending browser left the native socket" if pair else None)

    def _sink_moved(self, pair: SelectedPair | None) -> None:
        if isinstance(pair, UdpPair) and pair.socket.native is self.loop:
            self.loop.set_route_dest(self.flow, self.payload_type, *host_port(pair))
        else:
            self.close("the receiving browser left the native socket" if pair else None)

    def close(self, why: str | None = None) -> None:
        """Stop relaying natively. With `why` (a browser moved off the socket, the legs
        live on), the Python path takes the stream over from the native rewriter's state;
        without it, a leg ended and nothing takes over."""
        if self.closed:
            return
        self._relayed_at_close = self.relayed()
        self.closed = True
        try:
            self.loop.remove_route(self.flow, self.payload_type)
        finally:
            native_flows.release(self.source)
        for leg, observer in ((self.source, self._source_moved), (self.sink, self._sink_moved)):
            for conn in leg.lite_connections:
                if observer in conn.on_select:
                    conn.on_select.remove(observer)
        self.path.take_back(self._relayed_at_close)
        if why is not None:
            _hand_rewriter_back(self.rewriter, self.path)
            log.info("native video: channel %d -> %d back on the Python path: %s",
                     self.source.channel, self.sink.channel, why)


def _hand_rewriter_back(native_rewriter: Any, path: VideoPath) -> None:
    """The sink's Python rewriter continues the stream where the native one stopped; its
    packets are protected by the native sender (SrtpFastPath.use_tx_for), whose rollover
    counter has followed the stream."""
    sink = path.sink
    if sink is None or sink.rewriter is None:
        return
    state = native_rewriter.state()
    py = sink.rewriter
    py._seq = int(state["seq"])
    py.packets = int(state["packets"])
    py.octets = int(state["octets"])
    if state["have_last"]:
        py._source = int(state["source"])
        py._ts_offset = int(state["ts_offset"])
        py._last_out_ts = int(state["last_out_ts"])
        py._last_wall = float(state["last_wall"])
    sink.native_rewriter = None


def offload(path: VideoPath, source: NativeLeg, sink: NativeLeg, recorded: bool) -> bool:
    """Relay `path` (source's camera, connected to sink) on the native loop if it can be
    exactly the Python relay; True if it now is."""
    video = sink.video
    if recorded or path.sink is None or source.video is None or video is None:
        return False
    src_pair, dst_pair = udp_pair(source), udp_pair(sink)
    if src_pair is None or dst_pair is None or src_pair.socket is not dst_pair.socket:
        return False
    video_sink = path.sink
    python_rewriter = video_sink.rewriter
    if video_sink.native_rewriter is None and python_rewriter is not None \
            and python_rewriter.packets:
        return False  # Python has sent this stream: it keeps it (one sender per stream)
    try:
        source_keys, sink_keys = srtp_keys(source.pc), srtp_keys(sink.pc)
    except RuntimeError:
        return False
    m = native.module()
    loop = src_pair.socket.native
    try:
        flow = native_flows.acquire(source, loop, *host_port(src_pair), source_keys)
    except ValueError:  # another flow has the address: Python relays
        return False
    if video_sink.native_rewriter is None:
        seq = python_rewriter._seq if python_rewriter is not None else random.getrandbits(16)
        video_sink.native_rewriter = m.Rewriter(video_sink.ssrc, VIDEO_CLOCK, False, seq,
                                                random.getrandbits(32))
    if video_sink.native_tx is None:
        # One SRTP sender for this stream for the leg's life: a second agent's camera
        # continues its sequence numbers, and the rollover counter with them.
        video_sink.native_tx = m.Srtp(sink_keys.profile, sink_keys.tx, True)
        if sink.fast_path is not None:  # and Python's, if it takes the stream back
            sink.fast_path.use_tx_for(video_sink.ssrc, video_sink.native_tx)
    meter = m.Meter(VIDEO_CLOCK, True)
    try:
        loop.add_route(flow, source.video.payload_type, meter, video_sink.native_rewriter,
                       video_sink.payload_type, video_sink.native_tx,
                       *host_port(dst_pair),
                       abs_send_time_id=video_sink.abs_send_time_id or -1)
    except (ValueError, KeyError):  # that camera is routed already (a second agent)
        native_flows.release(source)
        return False
    route = NativeRoute(path, source, sink, loop, flow, source.video.payload_type, meter,
                        video_sink.native_rewriter)
    path.meter = NativeMeter(path.meter, meter)  # type: ignore[assignment]
    path.offload = route
    if path.paused:
        route.set_paused(True)
    log.info("native video: channel %d -> channel %d relayed by the native loop",
             source.channel, sink.channel)
    return True


def withdraw(path: VideoPath | None) -> None:
    """The path's sink left (the agent's page closed): the native route ends with it."""
    if path is not None and isinstance(path.offload, NativeRoute):
        path.offload.close()
