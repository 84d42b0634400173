"""What an OutgoingCall tells its owner (aioquic-style: small dataclasses, drained with
`next_event()`; an IncomingCall's own events are at the end of this module). Every event
carries the call's Call-ID so an agent's single queue can be fanned out to the owners of
many calls.

A call emits at most one of Answered / Failed; after Answered, RemoteHangup if the peer
ends it; and Terminated last, once every transaction has finished (its retransmission
timers included), when the call object may be forgotten. A call the owner itself cancels
or hangs up ends with Terminated alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .message import Headers
from .snapshot import DialogSnapshot


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
class DialogUpdated(CallEvent):
    """The confirmed dialog as another process would need it to send BYE (snapshot.py):
    on confirmation and whenever its CSeq, target or route set changes; `snapshot` None
    once the dialog is over. The worker keeps the supervisor's copy current with it."""

    snapshot: DialogSnapshot | None


@dataclass(frozen=True)
class Terminated(CallEvent):
    """Every transaction is done: the call object can be dropped."""


# --------------------------------------------------------------------------- IncomingCall
# The UAS side (uas.py, the simulated desk phone). An incoming call emits IncomingInvite
# first; then at most one of CallCancelled and CallConfirmed; after CallConfirmed,
# CallerHungUp if the caller ends it (or AckTimeout if its ACK never came); it reuses
# RemoteMediaChanged and InfoDtmf above, and ends with Terminated like an outgoing call.


@dataclass(frozen=True)
class IncomingInvite(CallEvent):
    """A new call: we have sent 100 Trying; the owner rings, answers or rejects it.

    `caller`/`callee` are the user parts of From/To (the whole URI when there is none);
    `sdp` the offer (None: the INVITE had none, our answer() SDP becomes the offer);
    `headers` all of the INVITE's headers (User-to-User, P-Asserted-Identity, ...)."""

    caller: str
    callee: str
    sdp: str | None
    headers: Headers


@dataclass(frozen=True)
class CallConfirmed(CallEvent):
    """The ACK for our 2xx came: the call is up. `sdp` is the caller's answer when the
    INVITE had no offer (ours went in the 2xx), else None."""

    sdp: str | None = None


@dataclass(frozen=True)
class CallerHungUp(CallEvent):
    """The caller sent BYE on the answered call (already answered 200 OK)."""

    cause: int = 16
    causestring: str = "normal call clearing"


@dataclass(frozen=True)
class CallCancelled(CallEvent):
    """The caller gave up before the answer (CANCEL, or BYE on the early dialog); we have
    answered 487 to the INVITE."""

    cause: int = 16
    causestring: str = "normal call clearing"


@dataclass(frozen=True)
class AckTimeout(CallEvent):
    """Our 2xx was retransmitted for 64*T1 without an ACK: we ended the call with BYE."""
