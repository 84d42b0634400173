"""Video relay between the customer's and the agent's browsers, packet by packet.

One `VideoPath` per direction. Packets are never decoded: new SSRC and payload type,
continuous sequence numbers, the VP8 payload untouched. The receiving browser's RTCP is
answered here: NACKs from a cache of recent packets, PLI/FIR passed to the sender as one
keyframe request per second at most, REMB passed to the sender.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.media import rtcp, rtp
from appliance.media.quality import StreamMeter

log = logging.getLogger("appliance.video")

VIDEO_CLOCK = 90000
NACK_CACHE = 512  # ~1.5 s of 640x480 VP8 at 30 fps
KEYFRAME_REQUEST_INTERVAL = 1.0


@dataclass
class VideoSink:
    """The receiving browser's leg: how to send it RTP/RTCP, and what it expects."""

    send_rtp: Callable[[bytes], None]
    ssrc: int  # our video sender's SSRC on that leg (its a=ssrc)
    payload_type: int  # VP8's payload type on that leg
    abs_send_time_id: int | None = None  # negotiated on that leg: lets it send REMB
    # The leg's one outgoing video stream, kept across its successive sources (a second
    # agent page after the first left): sequence numbers and timestamps go on, since SRTP
    # refuses to protect a sequence number it has passed (a "replay") and a jump back
    # would leave the browser's picture frozen.
    rewriter: rtp.RtpRewriter | None = None
    # The same stream's native rewriter and SRTP sender, once the native loop relays to
    # this leg (workers/native_video.py): kept for the leg's life, for the same reason.
    native_rewriter: Any = None
    native_tx: Any = None


class Offload(Protocol):
    """Someone else relaying this path's packets (workers/native_video.py: the native
    loop): while set, the path keeps its RTCP duties and hands these over."""

    def relayed(self) -> int: ...  # packets it forwarded to the sink
    def set_paused(self, paused: bool) -> None: ...
    def retransmit(self, lost: tuple[int, ...]) -> int: ...
    def source_ssrc(self) -> int | None: ...  # the sending browser's SSRC, once seen
    def awaiting_keyframe(self) -> bool: ...  # holding deltas until a keyframe


class VideoPath:
    def __init__(self, meter: StreamMeter, send_to_source: Callable[[bytes], None],
                 feedback_ssrc: int) -> None:
        self.meter = meter
        self._send_to_source = send_to_source  # RTCP towards the sending browser
        self._feedback_ssrc = feedback_ssrc  # our SSRC on the sending browser's leg
        self._source_ssrc: int | None = None
        # The recorder's tap: (payload, marker, timestamp, sequence) of every packet received.
        self.tap: Callable[[bytes, bool, int, int], None] | None = None
        self.sink: VideoSink | None = None
        self.rewriter: rtp.RtpRewriter | None = None
        self._cache: list[bytes | None] = [None] * NACK_CACHE
        self._last_keyframe_request = -KEYFRAME_REQUEST_INTERVAL
        self.pause_reasons: set[str] = set()  # conditions holding this direction's video
        # After (re)connecting, deltas are useless to the receiver until a keyframe.
        self.awaiting_keyframe = True
        self._forwarded = 0
        self.offload: Offload | None = None
        self.retransmitted = 0
        self.nacked = 0  # sequence numbers the receiver reported lost (before any repair)
        self.keyframe_requests = 0
        self.receiver_remb_bps = 0
        self.receiver_report: rtcp.ReportBlock | None = None

    def connect(self, sink: VideoSink) -> None:
        """The other party joined: start forwarding, from a keyframe."""
        self.sink = sink
        if sink.rewriter is None:
            sink.rewriter = rtp.RtpRewriter(sink.ssrc, VIDEO_CLOCK, mark_switches=False)
        self.rewriter = sink.rewriter
        self._cache = [None] * NACK_CACHE
        self.awaiting_keyframe = True
        self.request_keyframe(force=True)

    def disconnect(self) -> None:
        self.sink = None
        self.rewriter = None

    # -- media from the sending browser --------------------------------------------------

    def from_source(self, packet: bytes) -> None:
        header = rtp.parse_header(packet)
        if header is None:
            return
        keyframe = self.meter.packet(header, packet, time.monotonic())
        self._source_ssrc = header.ssrc
        payload = rtp.payload_of(packet, header)
        if self.tap is not None:
            self.tap(payload, header.marker, header.timestamp, header.sequence)
        sink, rewriter = self.sink, self.rewriter
        if sink is None or rewriter is None or self.pause_reasons or self.offload is not None:
            return  # (offloaded: what still comes this way raced a move; the offload relays)
        if self.awaiting_keyframe:
            if not keyframe:
                # Deltas are useless to the receiver until a keyframe: ask (at most once a
                # second) - at connect the sender's SSRC may not have been known yet, or its
                # first keyframe went by before this path was connected.
                self.request_keyframe()
                return
            self.awaiting_keyframe = False
        extension = (rtp.abs_send_time_extension(sink.abs_send_time_id)
                     if sink.abs_send_time_id is not None else b"")
        out = rewriter.rewrite(header.ssrc, sink.payload_type, header.marker, header.timestamp,
                               payload, extension=extension)
        self._cache[(out[2] << 8 | out[3]) % NACK_CACHE] = out  # bytes 2-3: sequence
        sink.send_rtp(out)
        self._forwarded += 1

    @property
    def source_ssrc(self) -> int | None:
        """The sending browser's SSRC (what PLI and REMB name), once a packet came."""
        if self._source_ssrc is None and self.offload is not None:
            return self.offload.source_ssrc()
        return self._source_ssrc

    @property
    def forwarded(self) -> int:
        """Packets sent on to the sink, by us or by the offload."""
        offload = self.offload
        return self._forwarded + (offload.relayed() if offload is not None else 0)

    def take_back(self, forwarded: int) -> None:
        """The offload ended having forwarded `forwarded` packets: the count goes on."""
        self.offload = None
        self._forwarded += forwarded

    # -- RTCP from the receiving browser -------------------------------------------------

    def from_sink_feedback(self, item: rtcp.Feedback) -> None:
        if isinstance(item, rtcp.Nack):
            self.nacked += len(item.lost)
            self._retransmit(item.lost)
        elif isinstance(item, rtcp.Pli | rtcp.Fir):
            self.request_keyframe()
        elif isinstance(item, rtcp.Remb):
            self.receiver_remb_bps = item.bitrate
            if self.source_ssrc is not None:
                self._send_to_source(
                    rtcp.remb(self._feedback_ssrc, item.bitrate, [self.source_ssrc]))
        elif isinstance(item, rtcp.ReportBlock):
            self.receiver_report = item

    def _retransmit(self, lost: tuple[int, ...]) -> None:
        sink = self.sink
        if sink is None:
            return
        if self.offload is not None:  # it sent those packets: it keeps them
            self.retransmitted += self.offload.retransmit(lost)
            return
        for seq in lost:
            cached = self._cache[seq % NACK_CACHE]
            # The slot may hold a newer packet by now: check its sequence number.
            if cached is not None and (cached[2] << 8 | cached[3]) == seq:
                sink.send_rtp(cached)
                self.retransmitted += 1

    @property
    def paused(self) -> bool:
        return bool(self.pause_reasons)

    def pause(self, reason: str) -> None:
        self.pause_reasons.add(reason)
        if self.offload is not None:
            self.offload.set_paused(True)

    def resume(self, reason: str) -> None:
        """Lift one reason; when none is left, forward again from a fresh keyframe."""
        if reason not in self.pause_reasons:
            return
        self.pause_reasons.discard(reason)
        if not self.pause_reasons:
            self.awaiting_keyframe = True
            if self.offload is not None:
                self.offload.set_paused(False)  # it waits for the keyframe asked for here
            self.request_keyframe(force=True)

    def keyframe_check(self) -> None:
        """Once a second (the room's watch): a connected path still waiting for a keyframe
        asks the sender again. The offloaded path's packets never pass here to ask."""
        if self.sink is None or self.pause_reasons:
            return
        waiting = self.offload.awaiting_keyframe() if self.offload is not None \
            else self.awaiting_keyframe
        if waiting:
            self.request_keyframe()

    def request_keyframe(self, force: bool = False) -> bool:
        """Ask the sending browser for a keyframe, at most once a second."""
        now = time.monotonic()
        if self.source_ssrc is None:
            return False
        if not force and now - self._last_keyframe_request < KEYFRAME_REQUEST_INTERVAL:
            return False
        self._last_keyframe_request = now
        self.keyframe_requests += 1
        self._send_to_source(rtcp.pli(self._feedback_ssrc, self.source_ssrc))
        return True
