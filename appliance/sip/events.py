"""What an OutgoingCall tells its owner (aioquic-style: small dataclasses, drained with
`next_event()`). Every event carries the call's Call-ID so an agent's single queue can be
fanned out to the owners of many calls.

A call emits at most one of Answered / Failed; after Answered, RemoteHangup if the peer
ends it; and Terminated last, once every transaction has finished (its retransmission
timers included), when the call object may be forgotten. A call the owner itself cancels
or hangs up ends with Terminated alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CallEvent:
    call_id: str = ""


@dataclass(frozen=True)
class Trying(CallEvent):
    """100 Trying: the next hop has the INVITE; it stops retransmitting."""


@dataclass(frozen=True)
class Ringing(CallEvent):
    """180/183. With an SDP it is early media (ringback or announcements from the PBX)."""

    sdp: str | None = None
    status: int = 180


@dataclass(frozen=True)
class Answered(CallEvent):
    sdp: str


@dataclass(frozen=True)
class Failed(CallEvent):
    """The call did not connect: the final status (or a local stand-in: 408 for no response
    at all, 480 for our ring timeout) with its Q.850 cause for the browser's `release`."""

    status: int
    reason: str
    cause: int
    causestring: str


@dataclass(frozen=True)
class RemoteHangup(CallEvent):
    """The peer sent BYE (already answered 200 OK)."""

    cause: int = 16
    causestring: str = "normal call clearing"


@dataclass(frozen=True)
class RemoteMediaChanged(CallEvent):
    """The peer re-offered (re-INVITE or UPDATE, or an ACK answering our offer): hold,
    resume, or a new address. Its SDP; we have already answered."""

    sdp: str


@dataclass(frozen=True)
class InfoDtmf(CallEvent):
    """A key the peer sent as SIP INFO (application/dtmf-relay or application/dtmf)."""

    key: str
    duration_ms: int | None = None


@dataclass(frozen=True)
class Terminated(CallEvent):
    """Every transaction is done: the call object can be dropped."""
