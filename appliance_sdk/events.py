"""The SDK's events: what each MS frame becomes for the application, and the error of
waiting for one that can no longer come."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from appliance.core import protocol

_EVENT_NAMES: dict[type, str] = {
    protocol.Alert: "alert",
    protocol.Answer: "answer",
    protocol.Ice: "ice",
    protocol.DTLSconnect: "dtls_connect",  # the slides' APP SDK event name
    protocol.Release: "release",
    protocol.RecordStatus: "record_status",
    protocol.MyResolution: "my_resolution",
    protocol.PeerResolution: "peer_resolution",
    protocol.PeerData: "peerdata",
    protocol.Message: "message",
    protocol.DTMF: "DTMF",
    protocol.Offer: "offer",  # only from a misbehaving MS, but still worth surfacing
}


def event_name(action: protocol.Action) -> str:
    """The SDK event an MS frame becomes; peerdata Join/Leave are events of their own."""
    if isinstance(action, protocol.PeerData) and action.peerdata in ("Join", "Leave"):
        return action.peerdata
    return _EVENT_NAMES.get(type(action), type(action).__name__)


@dataclass
class Event:
    """Something that happened to a call (mostly: an MS frame arrived).

    `detail` says what the SDK made of it (e.g. an ice frame "applied", "queued",
    "duplicate", "invalid: ..."; a connection_state's new state); `raw` keeps the frame of
    an undecodable message.
    """

    name: str
    action: protocol.Action | None = None
    at: float = field(default_factory=time.monotonic)
    detail: str | None = None
    raw: str | bytes | None = None


class CallEnded(Exception):
    """wait_for() can no longer be satisfied: the call was released."""

    def __init__(self, waited_for: str, release: protocol.Release | None) -> None:
        how = (
            f"cause {release.cause} '{release.causestring}'" if release is not None else "hangup"
        )
        super().__init__(f"call ended ({how}) before '{waited_for}'")
        self.release = release
