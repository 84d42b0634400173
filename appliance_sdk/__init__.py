"""The APP SDK of the slides, for Python on aiortc: connect to an MS, make and take calls.

    async with await connect_media_server("wss://host:4433") as client:
        call = await client.make_video_call(5678, 9333, userdata)
        await call.wait_for("dtls_connect")
"""

from .call import Call
from .connection import UA_FAMILY, MediaServerClient, connect_media_server
from .events import CallEnded, Event, event_name
from .media import ColorBarsVideoTrack, FrameCounter, ToneAudioTrack

__all__ = [
    "UA_FAMILY",
    "Call",
    "CallEnded",
    "ColorBarsVideoTrack",
    "Event",
    "FrameCounter",
    "MediaServerClient",
    "ToneAudioTrack",
    "connect_media_server",
    "event_name",
]
