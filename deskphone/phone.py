"""A simulated agent desk phone: what the demo calls instead of a real PBX.

An operator trying the appliance (`make run`) has no call centre at hand, so this stands
in for the agent's phone: it rings, answers with PCMU + telephone-event on a UDP port of
its own per call, and echoes every RTP packet back to where it came from (an "echo test"
phone), so the caller hears their own voice. It is built on the appliance's own SIP stack
(appliance/sip, the UAS half in uas.py), not a second SIP implementation.

    phone = await DeskPhone.start(listen=("127.0.0.1", 5080), ring_seconds=2.0)
    ...
    await phone.close()  # BYE to every call, sockets closed

or from a shell: `python -m deskphone --listen 127.0.0.1:5080 --ring 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar, cast, get_args

from appliance.sip.endpoint import SipEndpoint
from appliance.sip.events import (
    AckTimeout,
    CallCancelled,
    CallConfirmed,
    CallerHungUp,
    CallEvent,
    IncomingInvite,
    InfoDtmf,
    RemoteMediaChanged,
    Terminated,
)
from appliance.sip.message import parse_params
from appliance.sip.sdp import build_offer
from appliance.sip.transaction import DEFAULT_TIMERS, Addr, TimerConfig
from appliance.sip.uas import IncomingCall

log = logging.getLogger("appliance.deskphone")

Mode = Literal["answer", "busy", "no-answer"]
MODES: tuple[str, ...] = get_args(Mode)
USER_AGENT = "Simulated Desk Phone 1.0"
T = TypeVar("T")


def decode_user_to_user(value: str | None) -> str | None:
    """The text in a `User-to-User: <hex>;encoding=hex` header (RFC 7433): the JSON with the
    roomkey the appliance sends. Anything not hex-decodable is shown as received."""
    if not value:
        return None
    data, _, params = value.partition(";")
    try:
        encoding = (parse_params(params).get("encoding") or "hex").lower()
    except ValueError:
        encoding = "hex"
    if encoding != "hex":
        return value
    try:
        text = bytes.fromhex(data.strip()).decode("utf-8")
    except ValueError:
        return value
    with contextlib.suppress(ValueError):
        return json.dumps(json.loads(text), separators=(",", ":"))
    return text


@dataclass
class CallRecord:
    """One call as the phone saw it; `summary()` is the line it logs when the call ends."""

    call_id: str
    caller: str
    callee: str
    user_to_user: str | None
    arrived: float  # loop time
    answered: float | None = None  # loop time of the ACK
    ended: float | None = None
    outcome: str = "ringing"  # answered, busy, cancelled, declined, no ACK, ...
    ended_by: str | None = None  # "caller" or "phone"
    rtp_port: int | None = None
    echoed: int = 0  # RTP packets sent back

    @property
    def duration(self) -> float | None:
        """Talk time: from the ACK to the end."""
        if self.answered is None or self.ended is None:
            return None
        return self.ended - self.answered

    def summary(self) -> str:
        parts = [f"call {self.caller} -> {self.callee}: {self.outcome}"]
        if self.duration is not None:
            parts.append(f"talked {self.duration:.1f} s, hung up by {self.ended_by}")
        elif self.ended is not None:
            parts.append(f"after {self.ended - self.arrived:.1f} s")
        if self.rtp_port is not None:
            parts.append(f"RTP port {self.rtp_port}, {self.echoed} packets echoed")
        parts.append(f"User-to-User {self.user_to_user or '(none)'}")
        return "; ".join(parts)


class _Echo(asyncio.DatagramProtocol):
    """RTP: every packet goes straight back to its source. RTCP (echo=False): read, ignored,
    so the caller's reports do not draw ICMP port-unreachable errors."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.packets = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets += 1
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # the caller's RTP port went away: its next packet (if any) tells us where


@dataclass
class _Media:
    port: int  # RTP; RTCP is port + 1 (RFC 3550 §11)
    rtp: _Echo
    rtcp: _Echo

    def close(self) -> None:
        for proto in (self.rtp, self.rtcp):
            if proto.transport is not None:
                proto.transport.close()


@dataclass
class _DeskCall:
    call: IncomingCall
    record: CallRecord
    media: _Media | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    answering: asyncio.Task[None] | None = None
    finished: bool = False


class _PhoneEndpoint(SipEndpoint):
    """A SipEndpoint that takes calls: its agent hands every INVITE to the phone.

    It uses the endpoint's own (protected) event fan-out and transmit, so that the phone's
    actions go through the one shell that does the SIP I/O, rather than a copy of it."""

    def __init__(
        self,
        phone: DeskPhone,
        proxy: Addr,
        *,
        user_agent: str,
        timers: TimerConfig,
        advertise: str | None,
    ) -> None:
        super().__init__(proxy, user_agent=user_agent, timers=timers, advertise=advertise)
        self._phone = phone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.agent.on_incoming = self._take

    def _take(self, call: IncomingCall) -> None:
        # Runs inside receive_datagram, before the IncomingInvite event is handed out.
        self._callbacks[call.call_id] = self._phone._adopt(call)

    def act(self, action: Callable[[float], T]) -> T:
        """Run a command on a call (ring, answer, ...) now, then send what it produced."""
        result = action(self._loop.time())
        self._transmit()
        return result


class DeskPhone:
    """The phone: one SIP port, any number of concurrent calls, each with its own RTP
    port pair. Create it with `await DeskPhone.start(...)`; `records` lists the calls."""

    def __init__(
        self,
        *,
        ring_seconds: float,
        mode: Mode,
        rtp_address: str,
        rtp_port_range: tuple[int, int],
        hangup_after: float | None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        low, high = rtp_port_range
        if not 0 < low < high <= 65535:
            raise ValueError(f"bad RTP port range {rtp_port_range}")
        self.ring_seconds = ring_seconds
        self.mode = mode
        self.rtp_address = rtp_address
        self.rtp_port_range = rtp_port_range
        self.hangup_after = hangup_after
        # The calls taken, in arrival order; bounded because a demo may run for days.
        self.records: deque[CallRecord] = deque(maxlen=1000)
        self._calls: dict[str, _DeskCall] = {}  # calls not yet Terminated
        self._ports: set[int] = set()  # RTP ports our calls hold
        self._loop = asyncio.get_running_loop()
        self._ep: _PhoneEndpoint | None = None

    @classmethod
    async def start(
        cls,
        listen: Addr = ("127.0.0.1", 5080),
        *,
        ring_seconds: float = 2.0,
        mode: Mode = "answer",
        rtp_address: str = "127.0.0.1",
        rtp_port_range: tuple[int, int] = (30000, 30999),
        hangup_after: float | None = None,
        user_agent: str = USER_AGENT,
        timers: TimerConfig = DEFAULT_TIMERS,
        advertise: str | None = None,
    ) -> DeskPhone:
        """Listen for SIP on UDP `listen` (port 0 picks one: see `address`)."""
        phone = cls(
            ring_seconds=ring_seconds,
            mode=mode,
            rtp_address=rtp_address,
            rtp_port_range=rtp_port_range,
            hangup_after=hangup_after,
        )
        # The endpoint wants a proxy; a phone only answers (to each request's source), so the
        # listen address itself serves, also to pick the host a wildcard bind advertises.
        host = "127.0.0.1" if listen[0] in ("0.0.0.0", "") else listen[0]
        proxy = ("::1" if host == "::" else host, listen[1] or 5060)

        def factory() -> _PhoneEndpoint:
            return _PhoneEndpoint(
                phone, proxy, user_agent=user_agent, timers=timers, advertise=advertise
            )

        _, endpoint = await phone._loop.create_datagram_endpoint(factory, local_addr=listen)
        phone._ep = endpoint
        log.info(
            "desk phone listening on %s:%d (mode %s, ring %.1f s)",
            *endpoint.local_address,
            mode,
            ring_seconds,
        )
        return phone

    @property
    def address(self) -> Addr:
        """The SIP address calls go to (the bound port when started on port 0)."""
        return self._endpoint.local_address

    @property
    def active_calls(self) -> int:
        return sum(1 for desk in self._calls.values() if not desk.finished)

    async def close(self, grace: float = 2.0) -> None:
        """End every call (BYE when up, 480 while ringing), give the BYEs up to `grace`
        seconds to be answered, then close every socket."""
        if self._ep is None:
            return
        ep = self._ep
        for desk in list(self._calls.values()):
            if not desk.finished:
                self._hang_up(desk, "phone shut down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                # No event marks a BYE answered (Terminated waits out the retransmission
                # timers, up to 32 s), so poll the calls' state for this short while.
                while any(not d.call.ended for d in self._calls.values()):
                    await asyncio.sleep(0.02)
        answering = [d.answering for d in self._calls.values() if d.answering is not None]
        await asyncio.gather(*answering, return_exceptions=True)  # each sees `finished`
        for desk in list(self._calls.values()):
            self._release(desk)
        self._calls.clear()
        self._ep = None
        ep.close()
        await ep.wait_closed()

    # ------------------------------------------------------------------ one call

    @property
    def _endpoint(self) -> _PhoneEndpoint:
        if self._ep is None:
            raise RuntimeError("desk phone closed")
        return self._ep

    def _adopt(self, call: IncomingCall) -> Callable[[CallEvent], None]:
        record = CallRecord(call.call_id, "", "", None, self._loop.time())
        desk = _DeskCall(call, record)
        self._calls[call.call_id] = desk
        self.records.append(record)
        return lambda event: self._on_event(desk, event)

    def _later(self, desk: _DeskCall, delay: float, action: Callable[[], None]) -> None:
        # Never act inside an event callback: the endpoint has already sent this round's
        # datagrams, so whatever the action produces would wait for the next one.
        desk.timers.append(self._loop.call_later(delay, action))

    def _act(self, action: Callable[[float], T]) -> T | None:
        return None if self._ep is None else self._ep.act(action)

    def _on_event(self, desk: _DeskCall, event: CallEvent) -> None:
        record, call = desk.record, desk.call
        if isinstance(event, IncomingInvite):
            record.caller, record.callee = event.caller, event.callee
            record.user_to_user = decode_user_to_user(event.headers.get("User-to-User"))
            log.info(
                "incoming call %s -> %s, User-to-User %s",
                record.caller,
                record.callee,
                record.user_to_user or "(none)",
            )
            self._later(desk, 0, lambda: self._on_invite(desk))
        elif isinstance(event, CallConfirmed):
            record.answered = self._loop.time()
            record.outcome = "answered"
            if self.hangup_after is not None:
                self._later(desk, self.hangup_after, lambda: self._hang_up(desk, "answered"))
        elif isinstance(event, CallerHungUp):
            record.ended_by = "caller"
            self._finish(desk, "answered")
        elif isinstance(event, CallCancelled):
            self._finish(desk, f"cancelled by the caller ({event.causestring})")
        elif isinstance(event, AckTimeout):
            self._finish(desk, "answered, but no ACK came")
        elif isinstance(event, InfoDtmf):
            log.info("call %s -> %s: key %s (SIP INFO)", record.caller, record.callee, event.key)
        elif isinstance(event, RemoteMediaChanged):
            log.info("call %s -> %s: the caller changed its media", record.caller, record.callee)
        elif isinstance(event, Terminated):
            self._finish(desk, record.outcome)
            self._calls.pop(call.call_id, None)

    def _on_invite(self, desk: _DeskCall) -> None:
        call = desk.call
        if self.mode == "busy":
            self._act(lambda now: call.reject(486, now))
            self._finish(desk, "busy (486)")
            return
        self._act(call.ring)
        if self.mode == "answer":
            self._later(desk, self.ring_seconds, lambda: self._start_answer(desk))

    def _start_answer(self, desk: _DeskCall) -> None:
        desk.answering = self._loop.create_task(self._answer(desk))

    async def _answer(self, desk: _DeskCall) -> None:
        call = desk.call
        try:
            media = await self._open_media()
        except OSError as exc:
            log.warning("no RTP port for call %s: %s", call.call_id, exc)
            self._act(lambda now: call.reject(503, now))
            self._finish(desk, "refused: no free RTP port (503)")
            return
        if desk.finished or self._ep is None:  # the caller gave up while we opened them
            media.close()
            self._ports.discard(media.port)
            return
        desk.media = media
        desk.record.rtp_port = media.port
        sdp = build_offer(self.rtp_address, media.port, username="deskphone")
        # None here can only mean 488: a cancelled call has been `finished` by its event.
        if self._act(lambda now: call.answer(sdp, now)) is None and not desk.finished:
            self._finish(desk, "refused: no codec in common (488)")

    def _hang_up(self, desk: _DeskCall, outcome: str) -> None:
        if desk.finished:
            return
        desk.record.ended_by = "phone"
        if desk.record.answered is None and outcome != "answered":
            outcome = f"{outcome} before the answer (480)"
        self._act(desk.call.hangup)
        self._finish(desk, outcome)

    def _finish(self, desk: _DeskCall, outcome: str) -> None:
        """The call is over for the phone: log its line once and free its media."""
        if desk.finished:
            return
        desk.finished = True
        desk.record.outcome = outcome
        desk.record.ended = self._loop.time()
        self._release(desk)
        log.info("%s", desk.record.summary())

    def _release(self, desk: _DeskCall) -> None:
        for handle in desk.timers:
            handle.cancel()
        desk.timers.clear()
        if desk.media is not None:
            desk.record.echoed = desk.media.rtp.packets
            desk.media.close()
            self._ports.discard(desk.media.port)
            desk.media = None

    async def _open_media(self) -> _Media:
        """An even RTP port from the range, with RTCP on the odd one above it."""
        low, high = self.rtp_port_range
        for port in range(low + low % 2, high, 2):
            if port in self._ports:
                continue
            rtp, rtcp = _Echo(echo=True), _Echo(echo=False)
            try:
                await self._loop.create_datagram_endpoint(
                    lambda p=rtp: p, local_addr=(self.rtp_address, port)
                )
            except OSError:
                continue  # taken by another program
            try:
                await self._loop.create_datagram_endpoint(
                    lambda p=rtcp: p, local_addr=(self.rtp_address, port + 1)
                )
            except OSError:
                _Media(port, rtp, rtcp).close()
                continue
            self._ports.add(port)
            return _Media(port, rtp, rtcp)
        raise OSError(f"no free port pair in {low}-{high}")


# --------------------------------------------------------------------------- console


def _address(text: str) -> Addr:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit():
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, not {text!r}")
    return int(low), int(high)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deskphone",
        description="A simulated agent desk phone: rings, answers and echoes the caller.",
    )
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 5080), metavar="H:P")
    parser.add_argument("--ring", type=float, default=2.0, help="seconds to ring (2)")
    parser.add_argument("--mode", choices=MODES, default="answer")
    parser.add_argument("--rtp-address", default="127.0.0.1")
    parser.add_argument("--rtp-ports", type=_port_range, default=(30000, 30999), metavar="LO-HI")
    parser.add_argument("--hangup-after", type=float, default=None, metavar="SECONDS")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    phone = await DeskPhone.start(
        args.listen,
        ring_seconds=args.ring,
        mode=args.mode,
        rtp_address=args.rtp_address,
        rtp_port_range=args.rtp_ports,
        hangup_after=args.hangup_after,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await phone.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
