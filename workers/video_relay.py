"""How video crosses a room from one browser to the other: the `VideoRelay` strategy.

The product's strategy is `PacketRelay`: every RTP packet of a leg is ours once DTLS is up,
and each camera's packets go to the other browser through a `VideoPath`, never decoded.
`media.relay = "aiortc"` selects the bench's baseline instead (bench/baseline_relay.py,
decode and re-encode through aiortc's tracks), loaded by name so that no product module
imports the bench.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Container
from typing import Any, Protocol

from appliance.edges.rtc_adapter import SilentTrack, SrtpFastPath
from appliance.media import rtcp
from appliance.media.codec_choice import CodecChoice
from appliance.media.quality import StreamMeter
from appliance.media.video import VIDEO_CLOCK, VideoPath, VideoSink
from workers import native_video

PacketSink = Callable[[bytes], None]
FeedbackSink = Callable[[rtcp.Feedback], None]

# media.relay values other than the product's: the module and class of each strategy.
_ELSEWHERE = {"aiortc": ("bench.baseline_relay", "BaselineRelay")}


class RelayedLeg(Protocol):
    """What a relay strategy may use of a browser's WebRTC leg (`WebRtcLeg`)."""

    pc: Any  # the aiortc peer connection, for strategies that relay through its tracks
    channel: int
    video: CodecChoice | None  # None: the browser sends no video

    @property
    def lite_connections(self) -> list[Any]: ...  # on the worker's media port (else none)

    @property
    def relaying(self) -> bool: ...  # its fast path is attached (DTLS came up)

    def send_rtcp(self, packet: bytes) -> None: ...
    def our_ssrc(self, kind: str) -> int: ...
    def video_sink(self) -> VideoSink: ...
    def silent_track(self, kind: str) -> SilentTrack | None: ...
    def route_rtp(self, payload_type: int, sink: PacketSink) -> None: ...
    def route_feedback(self, ssrc: int, sink: FeedbackSink) -> None: ...
    def clear_feedback(self) -> None: ...


class VideoRelay(Protocol):
    def attach(self, pc: Any, on_rtp: PacketSink, on_rtcp: PacketSink,
               consumed: Container[int]) -> SrtpFastPath:
        """The short path for a leg whose DTLS is up; `consumed` is a live view of the
        payload types someone takes from it."""
        ...

    def receive(self, leg: RelayedLeg) -> VideoPath | None:
        """Where this connected browser's camera goes in its room (None: not as packets)."""
        ...

    def join(self, customer: RelayedLeg, customer_video: VideoPath | None, agent: RelayedLeg,
             agent_video: VideoPath | None) -> None:
        """The agent's page connected: each camera to the other browser."""
        ...

    def part(self, customer: RelayedLeg, customer_video: VideoPath | None) -> None:
        """The agent's page left: the customer's camera goes nowhere for now."""
        ...


class PacketRelay:
    """The product: video relayed as packets, RTCP feedback answered or passed on here."""

    def attach(self, pc: Any, on_rtp: PacketSink, on_rtcp: PacketSink,
               consumed: Container[int]) -> SrtpFastPath:
        # Every RTP packet is ours: those nobody consumes yet are dropped, never decoded.
        return SrtpFastPath(pc, on_rtp, on_rtcp)

    def receive(self, leg: RelayedLeg) -> VideoPath | None:
        if leg.video is None:
            return None
        path = VideoPath(StreamMeter(VIDEO_CLOCK, is_vp8=True), leg.send_rtcp,
                         leg.our_ssrc("video"))
        leg.route_rtp(leg.video.payload_type, path.from_source)
        return path

    def join(self, customer: RelayedLeg, customer_video: VideoPath | None, agent: RelayedLeg,
             agent_video: VideoPath | None) -> None:
        if agent_video is not None and customer.video is not None and customer.relaying:
            # Agent's camera to the customer; the customer's RTCP about it comes back here.
            agent_video.connect(customer.video_sink())
            customer.route_feedback(customer.our_ssrc("video"), agent_video.from_sink_feedback)
            self._offload(agent_video, agent, customer)
        if customer_video is not None and agent.video is not None:
            customer_video.connect(agent.video_sink())
            agent.route_feedback(agent.our_ssrc("video"), customer_video.from_sink_feedback)
            self._offload(customer_video, customer, agent)

    @staticmethod
    def _offload(path: VideoPath, source: RelayedLeg, sink: RelayedLeg) -> None:
        # The native loop relays it where it can be exactly this relay (else we do).
        native_video.offload(path, source, sink, recorded=path.tap is not None)

    def part(self, customer: RelayedLeg, customer_video: VideoPath | None) -> None:
        if customer_video is not None:
            native_video.withdraw(customer_video)
            customer_video.disconnect()
        customer.clear_feedback()


def load(name: str) -> VideoRelay:
    """The strategy `media.relay` names ("packet" or, for the bench, "aiortc")."""
    if name == "packet":
        return PacketRelay()
    module, cls = _ELSEWHERE[name]
    relay: VideoRelay = getattr(importlib.import_module(module), cls)()
    return relay
