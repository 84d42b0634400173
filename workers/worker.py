"""A media worker: one process, one uvloop loop, one slice of channels.

It talks to the supervisor only through the ZeroMQ bus (DEALER socket), and to AP-S over
HTTP. Each channel is a call; calls never share state, so one call's failure stays its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from collections import deque

import msgspec
import zmq
import zmq.asyncio

from appliance import bus
from appliance import logsafe
from appliance import protocol as p
from appliance.aps_client import ApsClient, ApsUnavailable
from appliance.config import Config
from appliance.rtc_adapter import DECODERS, CandidatePolicy
from appliance.sip.endpoint import SipEndpoint
from appliance.tasks import spawn
from workers.agent_call import AgentCall
from workers.health import LoopLagProbe
from workers.leg import WebRtcLeg
from workers.room import Room
from workers.user_call import UserCall

log = logging.getLogger("appliance.worker")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A worker must never outlive its supervisor (it would hold ports and channels)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        log.warning("cannot ask the kernel to end this worker with its supervisor")


class Worker:
    def __init__(self, index: int, config: Config, bus_endpoint: str) -> None:
        self.index = index
        self.config = config
        self.bus_endpoint = bus_endpoint
        self.calls: dict[int, WebRtcLeg] = {}
        self.rooms: dict[int, Room] = {}  # roomkey -> the room of a customer call here
        self.candidate_policy = CandidatePolicy.from_strings(
            config.media.addresses, config.media.port_min, config.media.port_max
        )
        self.aps = ApsClient(
            config.aps.url,
            config.appliance.id,
            timeout=config.aps.timeout,
            attempts=config.aps.attempts,
        )
        self.metrics_setup_ms: deque[float] = deque(maxlen=1000)
        self.sip_endpoint: SipEndpoint | None = None
        self.lag = LoopLagProbe()
        self.calls_placed = 0
        self.calls_failed = 0
        # Relayed packets of legs already gone (live legs are added at report time).
        self._packets_received_closed = 0
        self._packets_sent_closed = 0
        self._stats_timer: asyncio.TimerHandle | None = None
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._stopping = asyncio.Event()

    # -- bus -----------------------------------------------------------------------------

    def send(self, msg: bus._Msg) -> None:
        # DEALER sends never block at this volume; ordering per peer is preserved.
        self._sock.send(bus.encode(msg))

    async def run(self) -> None:
        self._sock.setsockopt(zmq.IDENTITY, bus.worker_identity(self.index))
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(self.bus_endpoint)
        await self.aps.start()
        await self._open_sip()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        # The supervisor decides when workers stop; an interactive Ctrl-C is its to handle.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        DECODERS.install()
        self.lag.start()
        self.send(bus.Hello(self.index, os.getpid()))
        self._report_stats()
        log.info("worker %d ready (pid %d)", self.index, os.getpid())
        receiver = asyncio.create_task(self._receive())
        await self._stopping.wait()
        receiver.cancel()
        await self.aps.close()
        self._sock.close(linger=2000)
        self._ctx.term()

    async def _open_sip(self) -> None:
        sip = self.config.sip
        host, _, port = sip.proxy.rpartition(":")
        local = (sip.listen, sip.base_port + self.index)
        try:
            self.sip_endpoint = await SipEndpoint.create(
                local, (host, int(port)), user_agent=sip.user_agent
            )
        except OSError as exc:
            # Calls will be refused with a clear cause; the worker itself stays up.
            log.error("worker %d: cannot listen for SIP on %s:%d: %s", self.index, *local, exc)
            return
        log.info("worker %d: SIP on %s:%d, proxy %s", self.index, *local, sip.proxy)

    async def _receive(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                msg = bus.decode_to_worker(data)
            except msgspec.DecodeError:
                log.error("dropped an undecodable bus message (%d bytes)", len(data))
                continue
            try:
                await self._dispatch(msg)
            except Exception:
                log.exception("error handling %s", type(msg).__name__)

    async def _dispatch(self, msg: bus.ToWorker) -> None:
        if isinstance(msg, bus.StartCall):
            self._start_call(msg)
        elif isinstance(msg, bus.ClientAction):
            call = self.calls.get(msg.channel)
            if call is not None and call.conn == msg.conn:
                call.client_action(msg.action)
        elif isinstance(msg, bus.ConnectionClosed):
            for channel in msg.channels:
                call = self.calls.get(channel)
                if call is not None and call.conn == msg.conn:
                    call.connection_closed()
        elif isinstance(msg, bus.DuplicateLogin):
            room = self.rooms.get(msg.roomkey)
            if room is None or room.closed:  # ended since the supervisor looked it up
                log.info("duplicate login for roomkey %d: the call has ended", msg.roomkey)
            else:
                room.duplicate_login(msg.message)
        elif isinstance(msg, bus.Shutdown):
            await self._shutdown()

    def _start_call(self, msg: bus.StartCall) -> None:
        offer = msg.offer
        if msg.channel in self.calls:  # the supervisor's bookkeeping and ours disagree
            log.error("channel %d already busy; refusing the new call", msg.channel)
            self.send(
                bus.ToClient(
                    msg.conn,
                    p.Release(
                        dialogid=offer.dialogid,
                        ref=offer.ref,
                        channel=msg.channel,
                        cause=p.CAUSE_TEMPORARY_FAILURE,
                        causestring="channel busy",
                    ),
                )
            )
            return
        kind = AgentCall if offer.module == "Agent" else UserCall
        call = kind(self, msg.conn, msg.channel, offer)
        self.calls[msg.channel] = call
        self.calls_placed += 1
        call.start()

    # -- health ----------------------------------------------------------------------------

    def _report_stats(self) -> None:
        received = self._packets_received_closed
        sent = self._packets_sent_closed
        for leg in self.calls.values():
            if leg.fast_path is not None:
                received += leg.fast_path.received
                sent += leg.fast_path.sent
        p50, p99 = self.lag.percentiles()
        self.send(bus.WorkerStats(
            index=self.index, pid=os.getpid(), calls=len(self.calls),
            calls_placed=self.calls_placed, calls_failed=self.calls_failed,
            loop_lag_p50_ms=round(p50, 2), loop_lag_p99_ms=round(p99, 2),
            packets_received=received, packets_sent=sent,
            decoders_created=DECODERS.created,
        ))
        self._stats_timer = asyncio.get_running_loop().call_later(1.0, self._report_stats)

    def leg_released(self, leg: WebRtcLeg, cause: int, normal: bool) -> None:
        if not normal:
            self.calls_failed += 1
        if leg.fast_path is not None:
            self._packets_received_closed += leg.fast_path.received
            self._packets_sent_closed += leg.fast_path.sent

    def call_ended(self, call: WebRtcLeg) -> None:
        if self.calls.get(call.channel) is call:
            del self.calls[call.channel]
            self.send(bus.ChannelFreed(call.channel))

    async def report_record_file(self, roomkey: int, record_file: str) -> None:
        try:
            await self.aps.record_file(roomkey, record_file)
        except ApsUnavailable as exc:
            log.warning("AP-S did not take RecordFile for call %d: %s", roomkey, exc)

    async def report_answered(self, roomkey: int) -> None:
        try:
            await self.aps.call_event(roomkey, "answered", time.time())
        except ApsUnavailable as exc:
            log.warning("AP-S did not take the answer of call %d: %s", roomkey, exc)

    async def report_released(self, roomkey: int, cause: int, causestring: str,
                              recorded: bool = False) -> None:
        """Tell AP-S the call ended (its CDR). Never blocks the call's teardown. A recorded
        call's EndCall comes from the supervisor, once its recording is encrypted."""
        try:
            await self.aps.call_event(roomkey, "released", time.time(), cause, causestring)
            if not recorded:
                await self.aps.end_call(roomkey, "")
        except ApsUnavailable as exc:
            log.warning("AP-S did not take the end of call %d: %s", roomkey, exc)

    # -- shutdown ------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        calls = list(self.calls.values())
        for call in calls:
            call.shutdown()
        if calls:
            await asyncio.wait(
                [asyncio.create_task(c.wait_closed()) for c in calls], timeout=8
            )
        if self.sip_endpoint is not None:
            await asyncio.sleep(0.05)  # let the BYEs leave before the socket closes
            self.sip_endpoint.close()
        if self._stats_timer is not None:
            self._stats_timer.cancel()
        self.lag.stop()
        self.send(bus.ShutdownDone(self.index))
        log.info("worker %d: released %d call(s), stopping", self.index, len(calls))
        self._stopping.set()

    def _on_sigterm(self) -> None:
        # A SIGTERM straight to a worker (not via the supervisor) still releases its calls.
        spawn(self._shutdown())


def main(index: int, config_path: str, bus_endpoint: str) -> None:
    _die_with_parent()
    with open(config_path, "rb") as f:
        config = msgspec.json.decode(f.read(), type=Config)
    logging.basicConfig(
        level=config.appliance.log_level,
        format=f"%(asctime)s %(levelname)s worker[{index}] %(name)s: %(message)s",
    )
    logsafe.install()  # client and SIP text in log lines cannot forge lines
    # aioice logs every candidate pair check at INFO: far too chatty for an operator's log.
    logging.getLogger("aioice").setLevel(logging.WARNING)
    import uvloop

    uvloop.run(Worker(index, config, bus_endpoint).run())
