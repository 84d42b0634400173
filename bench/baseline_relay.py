"""The bench's baseline video relay (`media.relay = "aiortc"`): aiortc decodes each camera
and re-encodes it for the other browser (MediaRelay), the way an aiortc application relays
without our packet path. The capacity run measures the product's packet relay against it.

A media worker loads this by name (workers/video_relay.py); it implements that module's
`VideoRelay` structurally, since the product must not import the bench nor the bench the
worker's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, Protocol

from aiortc.contrib.media import MediaRelay

from appliance.edges.rtc_adapter import SilentTrack, SrtpFastPath
from appliance.media.video import VideoPath


class TrackLeg(Protocol):
    """What the baseline uses of a browser's WebRTC leg: its tracks."""

    pc: Any

    def silent_track(self, kind: str) -> SilentTrack | None: ...


class BaselineRelay:
    def attach(self, pc: Any, on_rtp: Callable[[bytes], None], on_rtcp: Callable[[bytes], None],
               consumed: Container[int]) -> SrtpFastPath:
        # Video and RTCP stay aiortc's (decode + re-encode through tracks): the fast path
        # takes only the payload types a consumer asked for (the voice bridge's).
        return SrtpFastPath(pc, on_rtp, None, handled_pts=consumed)

    def receive(self, leg: TrackLeg) -> VideoPath | None:
        return None  # no packet path: the camera reaches the room through aiortc's track

    def join(self, customer: TrackLeg, customer_video: VideoPath | None, agent: TrackLeg,
             agent_video: VideoPath | None) -> None:
        connect_through_tracks(customer, agent)

    def part(self, customer: TrackLeg, customer_video: VideoPath | None) -> None:
        pass  # the agent's track ends with its peer connection


def connect_through_tracks(user: TrackLeg, agent: TrackLeg) -> None:
    """Each browser's incoming camera track, decoded, becomes the other's outgoing one."""
    relay = MediaRelay()
    assert user.pc is not None and agent.pc is not None
    for source, destination in ((user, agent), (agent, user)):
        assert source.pc is not None
        incoming = next((t.receiver.track for t in source.pc.getTransceivers()
                         if t.kind == "video"), None)
        outgoing = destination.silent_track("video")
        if incoming is not None and outgoing is not None:
            outgoing.attach(relay.subscribe(incoming, buffered=False))
