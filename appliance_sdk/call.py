"""One call leg of the APP SDK: its RTCPeerConnection and the MS frames routed to it.

Frames for a call are handled one at a time, in arrival order, by the call's own worker
task: an `ice` must not overtake the `answer` it follows, and a slow handler of one call
must not hold up the connection's reader (and so every other call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from aiortc import RTCIceCandidate, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import candidate_from_sdp
from av.frame import Frame
from msgspec import UNSET

from appliance.core import protocol

from .events import CallEnded, Event, event_name
from .media import FrameCounter
from .routing import CallInbox, CallRouter

MEDIA_CLOSE_TIMEOUT = 5.0  # seconds for aiortc to close a call's peer connection

log = logging.getLogger("appliance.client")

# Events that can still legitimately arrive once the call has ended.
_AFTER_END_EVENTS = frozenset({"release", "connection_state", "disconnected"})
_CANDIDATE_PREFIX = "candidate:"


def _candidate_key(c: RTCIceCandidate) -> tuple[str, int, str, int]:
    return (c.ip, c.port, c.protocol.lower(), c.component)


def _sdp_candidate_keys(sdp: str) -> Iterable[tuple[str, int, str, int]]:
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            try:
                yield _candidate_key(candidate_from_sdp(line[len("a=candidate:") :]))
            except (AssertionError, ValueError, IndexError):
                continue


class CallConnection(Protocol):
    """What a call needs of the connection that carries it (a MediaServerClient)."""

    @property
    def closed(self) -> bool: ...

    async def send(self, action: protocol.Action) -> None: ...


class Call:
    """A call leg towards the MS. Created by MediaServerClient.make_video_call/join_room."""

    def __init__(
        self,
        connection: CallConnection,
        router: CallRouter[Call],
        pc: RTCPeerConnection,
        *,
        dialogid: int,
        ref: int,
        medium: int,
        roomkey: int | None = None,
        owned_tracks: Iterable[MediaStreamTrack] = (),
    ) -> None:
        self.dialogid = dialogid
        self.ref = ref
        self.medium = medium
        self.roomkey = roomkey
        self.channel: int | None = None
        self.pc = pc
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.history: list[Event] = []
        # What ended the call: the MS's release, or the one we sent on hangup.
        self.release: protocol.Release | None = None
        self.ended = False
        self.counters: list[FrameCounter] = []
        # kind -> callbacks for every decoded frame of the remote track of that kind
        self.frame_observers: dict[str, list[Callable[[Frame], None]]] = {
            "audio": [], "video": []
        }
        self._connection = connection
        self._router = router
        self._owned_tracks = list(owned_tracks)
        self._backlog: list[Event] = []  # taken off `events` by wait_for, not yet matched
        self._inbox: asyncio.Queue[protocol.Action] = asyncio.Queue()
        self._pending_ice: list[RTCIceCandidate] = []
        self._known_candidates: set[tuple[str, int, str, int]] = set()
        self._media_closed = False
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._worker = asyncio.ensure_future(self._work())
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("track", self._on_track)
        # Registered before the offer goes out: the MS may answer at once.
        router.register(
            (dialogid, ref),
            self,
            CallInbox(self._deliver, self._deliver_invalid, self._connection_lost),
        )

    def __repr__(self) -> str:
        return f"<Call dialogid={self.dialogid} ref={self.ref} channel={self.channel}>"

    @property
    def frames_received(self) -> dict[str, int]:
        """Decoded frames received per kind ("audio", "video") so far."""
        totals: dict[str, int] = {}
        for counter in self.counters:
            totals[counter.kind] = totals.get(counter.kind, 0) + counter.frames
        return totals

    # -- events ------------------------------------------------------------------------

    def _emit(
        self,
        name: str,
        action: protocol.Action | None = None,
        detail: str | None = None,
        raw: str | bytes | None = None,
    ) -> None:
        event = Event(name, action, detail=detail, raw=raw)
        self.history.append(event)
        self.events.put_nowait(event)
        self._wake()

    def _wake(self) -> None:
        """Wake every wait_for(): each one re-checks the shared backlog."""
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def wait_for(self, name: str, timeout: float = 10) -> Event:
        """The next event called `name`; other events stay available to later calls.

        Raises TimeoutError, CallEnded when the call was released first (the MS handles a
        call's frames in order, so nothing else will come), or ConnectionError when the
        WebSocket to the MS closed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Several wait_for() may run at once: they share one backlog, so an event one
            # of them took off the queue is still seen by the others.
            while not self.events.empty():
                self._backlog.append(self.events.get_nowait())
            for index, event in enumerate(self._backlog):
                if event.name == name:
                    return self._backlog.pop(index)
            if self.ended and name not in _AFTER_END_EVENTS and self._inbox.empty():
                raise CallEnded(name, self.release)
            if self._connection.closed and name != "disconnected":
                raise ConnectionError(f"connection to the MS closed before '{name}'")
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = ", ".join(e.name for e in self.history) or "nothing"
                raise TimeoutError(f"no '{name}' within {timeout} s on {self!r}; saw: {seen}")
            changed = self._changed
            # shield: a timeout must not cancel the future the other waiters share.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(changed), remaining)

    # -- frames from the MS ------------------------------------------------------------

    def _deliver(self, action: protocol.Action) -> None:
        """The router's hand-over from the connection's reader: queue it for the worker."""
        self._inbox.put_nowait(action)

    def _deliver_invalid(self, raw: str | bytes, error: str) -> None:
        self._emit("invalid", detail=error, raw=raw)

    async def _work(self) -> None:
        while True:
            action = await self._inbox.get()
            try:
                await self._handle(action)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad frame must not stop the call's later frames
                log.exception("%r: handling %s failed", self, type(action).__name__)
                self._emit(event_name(action), action, detail="error")

    async def _handle(self, action: protocol.Action) -> None:
        name = event_name(action)
        if isinstance(action, protocol.Alert | protocol.Answer) and action.channel:
            self.channel = action.channel
        if isinstance(action, protocol.Answer):
            self._emit(name, action, await self._on_answer(action))
        elif isinstance(action, protocol.Ice):
            self._emit(name, action, await self._on_ice(action))
        elif isinstance(action, protocol.Release):
            self.ended = True
            self.release = action
            self._emit(name, action)
            await self._close_media()
        else:
            self._emit(name, action)

    async def _on_answer(self, action: protocol.Answer) -> str:
        if self.ended:
            return "ignored: call ended"
        if action.answer is UNSET:
            return "invalid: no answer sdp"
        sdp = action.answer.sdp
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        # The MS repeats its SDP's candidates as ice frames: remember them to skip those.
        self._known_candidates.update(_sdp_candidate_keys(sdp))
        pending, self._pending_ice = self._pending_ice, []
        for candidate in pending:
            await self._add_candidate(candidate)
        return "applied"

    async def _on_ice(self, action: protocol.Ice) -> str:
        if self.ended:
            return "ignored: call ended"
        if action.ice is UNSET:
            return "invalid: no ice object"
        text = action.ice.candidate.strip()
        if text.startswith(_CANDIDATE_PREFIX):
            text = text[len(_CANDIDATE_PREFIX) :]
        if not text:
            # An empty candidate is the browsers' end-of-candidates marker; aiortc learns
            # the same from a=end-of-candidates in the answer, so there is nothing to do.
            return "end-of-candidates"
        try:
            candidate = candidate_from_sdp(text)
        except (AssertionError, ValueError, IndexError) as exc:
            log.warning("%r: unparsable ice candidate %r: %r", self, action.ice.candidate, exc)
            return f"invalid: {exc!r}"
        mid = action.ice.sdpMid
        index = action.ice.sdpMLineIndex
        if mid is UNSET and index is UNSET:
            index = 0  # the first m-line: with BUNDLE, the transport in use
        candidate.sdpMid = None if mid is UNSET else mid
        candidate.sdpMLineIndex = None if index is UNSET else index
        if self.pc.remoteDescription is None:
            self._pending_ice.append(candidate)  # applied right after the answer
            return "queued"
        return await self._add_candidate(candidate)

    async def _add_candidate(self, candidate: RTCIceCandidate) -> str:
        key = _candidate_key(candidate)
        if key in self._known_candidates:
            return "duplicate"
        self._known_candidates.add(key)
        await self.pc.addIceCandidate(candidate)
        return "applied"

    # -- peer connection callbacks -------------------------------------------------------

    def _on_connection_state(self) -> None:
        self._emit("connection_state", detail=self.pc.connectionState)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self.counters.append(
            FrameCounter(track, self.frame_observers.setdefault(track.kind, []))
        )
        self._emit("track", detail=track.kind)

    def _connection_lost(self) -> None:
        if self.ended:
            self._wake()  # a wait_for() still pending must see the closed connection
        else:
            self._emit("disconnected")

    # -- actions towards the MS ----------------------------------------------------------

    async def send_dtmf(self, key: str) -> None:
        if len(key) != 1 or key not in protocol.DTMF_KEYS:
            raise ValueError(f"DTMF key must be one of 0-9 * #, not {key!r}")
        dtmf = protocol.DTMF(
            dialogid=self.dialogid, ref=self.ref, channel=self.channel or 0, value=key
        )
        await self._connection.send(dtmf)

    async def send_peerdata(self, data: str, value: str = "") -> None:
        await self._connection.send(
            protocol.PeerData(
                dialogid=self.dialogid,
                ref=self.ref,
                channel=self.channel or 0,
                type="command",
                medium=protocol.medium_name(self.medium),
                peerdata=data,
                value=value,
            )
        )

    async def hangup(self, cause: int = 16, causestring: str = "normal release") -> None:
        """Send release (once) and close the peer connection."""
        if not self.ended:
            self.ended = True
            self.release = protocol.Release(
                dialogid=self.dialogid,
                ref=self.ref,
                channel=self.channel or 0,
                cause=cause,
                causestring=causestring,
            )
            try:
                if not self._connection.closed:
                    await self._connection.send(self.release)
            finally:
                # Even when the release could not go out, the media must stop.
                await self._close_media()
        else:
            await self._close_media()

    async def close(self) -> None:
        """Hang up if still up, then stop routing this call's frames (they go to unrouted)."""
        try:
            await self.hangup()
        finally:
            self._router.withdraw((self.dialogid, self.ref), self)
            await self._stop_worker()

    async def _stop_worker(self) -> None:
        """Stop the frame worker. aiortc's close can swallow the cancellation meant for the
        worker (it was closing the media when cancelled), which would leave it waiting on
        the inbox for ever: so cancel again until it is really done, within bounds."""
        for _ in range(10):
            if self._worker.done():
                break
            self._worker.cancel()
            await asyncio.wait({self._worker}, timeout=MEDIA_CLOSE_TIMEOUT / 10)
        if not self._worker.done():
            log.warning("%r: the frame worker did not stop; left behind", self)
        elif not self._worker.cancelled() and self._worker.exception() is not None:
            log.warning("%r: the frame worker failed: %s", self, self._worker.exception())

    async def _close_media(self) -> None:
        if self._media_closed:
            return
        self._media_closed = True
        try:
            # Bounded: an aiortc transport that never finishes stopping (a DTLS or ICE
            # task caught mid-start) must not hang the application's hang-up for ever.
            async with asyncio.timeout(MEDIA_CLOSE_TIMEOUT):
                await self.pc.close()
        except TimeoutError:
            log.warning("%r: the peer connection did not close within %.0f s; left behind",
                        self, MEDIA_CLOSE_TIMEOUT)
        except Exception:  # the tracks below must stop all the same
            log.exception("%r: closing the peer connection failed", self)
        for track in self._owned_tracks:
            track.stop()
        for counter in self.counters:
            await counter.stop()
