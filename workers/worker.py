"""A media worker: one process, one uvloop loop, one slice of channels.

It talks to the supervisor only through the ZeroMQ bus (DEALER socket), and to AP-S over
HTTP. Each channel is a call; calls never share state, so one call's failure stays its own.

The worker is the root of its calls' tree: it holds each channel's call (`UserCall` or
`AgentCall`, each containing its legs), the registry of its rooms and the video relay
strategy, and hosts them all as their `CallHost` (workers/host.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque

import msgspec
import zmq
import zmq.asyncio

from appliance.core import config_secrets, logsafe
from appliance.core import protocol as p
from appliance.core.config import Config
from appliance.core.periodic import FailureLog, Periodic
from appliance.core.tasks import spawn
from appliance.edges import bus
from appliance.edges.aps_client import ApsClient, ApsUnavailable, VerifyResult
from appliance.edges.rtc_adapter import DECODERS, CandidatePolicy
from appliance.media.datagrams import DROPS
from appliance.sip.auth import Credentials
from appliance.sip.endpoint import SipEndpoint
from appliance.sip.orphan import DialogClosed
from appliance.sip.snapshot import DialogSnapshot
from workers import video_relay
from workers.agent_call import AgentCall
from workers.health import LoopLagProbe
from workers.host import Call, Relayed
from workers.media_port import MediaPort, PortPlan, lite_settings
from workers.rooms import RoomRegistry
from workers.user_call import UserCall

log = logging.getLogger("appliance.worker")

_PR_SET_PDEATHSIG = 1
# Seconds between WorkerStats, which are also the heartbeat: twice a second, so a worker
# whose loop runs late by up to 1.5 s is not taken for silent at heartbeat_timeout = 2.
STATS_INTERVAL = 0.5


def _die_with_parent() -> None:
    """A worker must never outlive its supervisor (it would hold ports and channels)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        log.warning("cannot ask the kernel to end this worker with its supervisor")


def _release_stdin() -> None:
    """Point fd 0 at /dev/null: the pipe is done, and no child should inherit it."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


class Worker:
    def __init__(self, index: int, config: Config, bus_endpoint: str) -> None:
        self.index = index
        self.config = config
        self.bus_endpoint = bus_endpoint
        self.calls: dict[int, Call] = {}
        self.rooms = RoomRegistry()  # the rooms of the customer calls here
        # How video crosses a room: the product's packet relay, or the bench's baseline.
        self.video_relay = video_relay.load(config.media.relay)
        self.candidate_policy = CandidatePolicy.from_strings(
            config.media.addresses, config.media.port_min, config.media.port_max
        )
        self.aps = ApsClient.from_config(config)  # with its API token, if one is configured
        self.metrics_setup_ms: deque[float] = deque(maxlen=1000)
        self.sip_endpoint: SipEndpoint | None = None
        # The worker's one WebRTC media port, when media.udp_port is set (else each call
        # binds its own sockets); opened in run(), closed once the calls are released.
        self.media_port: MediaPort | None = None
        self.lag = LoopLagProbe()
        self.calls_placed = 0
        self.calls_failed = 0
        # Relayed packets of legs already gone (live legs are added at report time).
        self._packets_received_closed = 0
        self._packets_sent_closed = 0
        # Stats twice a second: also the heartbeat the supervisor judges this worker alive by.
        self._stats = Periodic(STATS_INTERVAL, self._report_stats, "worker stats report")
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._stopping = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._bus_closed = False
        self._send_errors = FailureLog("bus send", log_interval=10.0, logger=log)
        self._parent = os.getppid()

    # -- bus -----------------------------------------------------------------------------

    def send(self, msg: bus._Msg) -> None:
        # DEALER sends never block at this volume; ordering per peer is preserved.
        if self._bus_closed:
            return  # stopping: nobody reads these any more
        try:
            sent = self._sock.send(bus.encode(msg))
        except zmq.ZMQError as exc:
            self._send_errors.failed(exc, time.monotonic())
            return
        # zmq.asyncio returns a future; a failure on it must be seen, not left "never
        # retrieved" for the garbage collector to complain about.
        sent.add_done_callback(self._sent)

    def _sent(self, future: asyncio.Future[object]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._send_errors.failed(future.exception(), time.monotonic())  # type: ignore[arg-type]

    async def run(self) -> None:
        self._sock.setsockopt(zmq.IDENTITY, bus.worker_identity(self.index))
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(self.bus_endpoint)
        await self.aps.start()
        await self._open_sip()
        await self._open_media_port()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        # The supervisor decides when workers stop; an interactive Ctrl-C is its to handle.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        DECODERS.install()
        self.lag.start()
        self.send(bus.Hello(self.index, os.getpid()))
        self._stats.start()
        log.info("worker %d ready (pid %d)", self.index, os.getpid())
        receiver = asyncio.create_task(self._receive())
        await self._stopping.wait()
        receiver.cancel()
        await self.aps.close()
        self._bus_closed = True
        # Let the last releases and ShutdownDone reach a live supervisor; a dead one reads
        # nothing, and waiting for it would only delay the exit.
        self._sock.close(linger=0 if self._orphaned() else 2000)
        self._ctx.term()

    def _orphaned(self) -> bool:
        """Whether the supervisor that started us is gone (we were re-parented)."""
        return os.getppid() != self._parent

    async def _open_sip(self) -> None:
        sip = self.config.sip
        host, _, port = sip.proxy.rpartition(":")
        local = (sip.listen, sip.base_port + self.index)
        try:
            self.sip_endpoint = await SipEndpoint.create(
                local, (host, int(port)), user_agent=sip.user_agent,
                allowed_sources=sip.allowed_sources, strict_source_port=sip.strict_source_port,
            )
        except OSError as exc:
            # Calls will be refused with a clear cause; the worker itself stays up.
            log.error("worker %d: cannot listen for SIP on %s:%d: %s", self.index, *local, exc)
            return
        log.info("worker %d: SIP on %s:%d, proxy %s", self.index, *local, sip.proxy)
        # The supervisor keeps a copy of every confirmed dialog, to BYE it if we die.
        self.sip_endpoint.on_dialog = self._dialog_changed

    async def _open_media_port(self) -> None:
        plan = PortPlan.for_worker(self.config.media, self.index)
        if plan is None:
            return
        # Not opening is logged and answered per call ("media port unavailable"): the
        # worker stays up, so the supervisor does not restart it in a loop.
        self.media_port = await MediaPort.open(plan, self.candidate_policy.addresses,
                                               lite_settings(self.config.media), self.index)

    def _dialog_changed(self, call_id: str, snapshot: DialogSnapshot | None) -> None:
        if snapshot is None:
            self.send(bus.DialogDown(self.index, call_id))
        else:
            self.send(bus.DialogUp(self.index, snapshot))

    def _bye_dialogs(self, msg: bus.ByeDialogs) -> None:
        """A dead predecessor's dialogs: BYE each from our (the same) SIP port."""
        if self.sip_endpoint is None:
            log.error("worker %d: no SIP port: %d dialog(s) of the dead worker get no BYE",
                      self.index, len(msg.dialogs))
            return
        sip = self.config.sip
        credentials = Credentials(sip.username, sip.password) if sip.username else None
        count = self.sip_endpoint.close_dialogs(
            msg.dialogs, self._dialog_closed, cause=p.CAUSE_TEMPORARY_FAILURE,
            credentials=credentials)
        log.info("worker %d: sent BYE for %d dialog(s) its dead predecessor left up",
                 self.index, count)

    def _dialog_closed(self, closed: DialogClosed) -> None:
        level = logging.INFO if closed.status < 300 or closed.status == 481 else logging.WARNING
        log.log(level, "dialog %s of the dead worker: BYE answered %d %s", closed.call_id,
                closed.status, closed.reason)

    async def _receive(self) -> None:
        receive_errors = FailureLog("bus receive", log_interval=10.0, logger=log)
        while True:
            try:
                data = await self._sock.recv()
            except zmq.ZMQError as exc:
                if self._bus_closed or self._sock.closed:
                    return
                # Never leave the worker deaf to the supervisor over one error.
                receive_errors.failed(exc, time.monotonic())
                await asyncio.sleep(0.1)
                continue
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
            room = self.rooms.find_open(msg.roomkey)
            if room is None:  # ended since the supervisor looked it up
                log.info("duplicate login for roomkey %d: the call has ended", msg.roomkey)
            else:
                room.duplicate_login(msg.message)
        elif isinstance(msg, bus.Shutdown):
            await self._shutdown()
        elif isinstance(msg, bus.ByeDialogs):
            self._bye_dialogs(msg)

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
        call = kind(self, self.rooms, self.video_relay, msg.conn, msg.channel, offer)
        self.calls[msg.channel] = call
        self.calls_placed += 1
        call.start()

    # -- health ----------------------------------------------------------------------------

    def _report_stats(self) -> None:
        received = self._packets_received_closed
        sent = self._packets_sent_closed
        for call in self.calls.values():
            live = call.relayed()
            received += live.received
            sent += live.sent
        if self.media_port is not None:  # what the native loop relayed without Python
            native_received, native_sent = self.media_port.native_packets()
            received += native_received
            sent += native_sent
        p50, p99 = self.lag.percentiles()
        self.send(bus.WorkerStats(
            index=self.index, pid=os.getpid(), calls=len(self.calls),
            calls_placed=self.calls_placed, calls_failed=self.calls_failed,
            loop_lag_p50_ms=round(p50, 2), loop_lag_p99_ms=round(p99, 2),
            packets_received=received, packets_sent=sent,
            decoders_created=DECODERS.created,
            **(self.sip_endpoint.stats if self.sip_endpoint is not None else {}),
            **DROPS.stats(),
            **(self.media_port.stats() if self.media_port is not None else {}),
        ))

    # -- CallHost: what the calls ask of their worker ---------------------------------------

    def to_client(self, conn: int, action: p.Action) -> None:
        self.send(bus.ToClient(conn, action))

    def call_connected(self, channel: int, setup_ms: float) -> None:
        self.metrics_setup_ms.append(setup_ms)
        self.send(bus.CallConnected(channel))  # setup over: admission counts it

    def leg_released(self, normal: bool, relayed: Relayed) -> None:
        if not normal:
            self.calls_failed += 1
        self._packets_received_closed += relayed.received
        self._packets_sent_closed += relayed.sent

    def call_ended(self, call: Call) -> None:
        if self.calls.get(call.channel) is call:
            del self.calls[call.channel]
            self.send(bus.ChannelFreed(call.channel))

    async def verify(self, *, channel: int, dialogid: int, ref: int, caller: int | None,
                     callee: int | None, userdata: str, suid: str | None,
                     module: str) -> VerifyResult:
        return await self.aps.verify(channel=channel, dialogid=dialogid, ref=ref, caller=caller,
                                     callee=callee, userdata=userdata, suid=suid, module=module)

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
        """Tell AP-S the call ended (its CDR). A recorded call's EndCall comes from the
        supervisor, once its recording is encrypted."""
        await self.aps.report_released(roomkey, cause, causestring, end_call=not recorded)

    # -- shutdown ------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Release every call, then stop. Runs once: Shutdown from the supervisor, SIGTERM
        (the kernel's parent-death signal when the supervisor dies, or an operator's) and
        any repeat of either all join the same shutdown."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown_once())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown_once(self) -> None:
        calls = list(self.calls.values())
        try:
            for call in calls:
                call.shutdown()
            if calls:
                await asyncio.wait(
                    [asyncio.create_task(c.wait_closed()) for c in calls], timeout=8
                )
            if self.sip_endpoint is not None:
                await asyncio.sleep(0.05)  # let the BYEs leave before the socket closes
                self.sip_endpoint.close()
            if self.media_port is not None:
                self.media_port.close()
            self._stats.stop()
            self.lag.stop()
            self.send(bus.ShutdownDone(self.index))
            # Told now, not at the signal: the kernel re-parents us only after the SIGTERM.
            gone = " (supervisor gone)" if self._orphaned() else ""
            log.info("worker %d: released %d call(s), stopping%s", self.index, len(calls), gone)
        finally:
            self._stopping.set()  # whatever failed above, the process still ends

    def _on_sigterm(self) -> None:
        # A SIGTERM straight to a worker (not via the supervisor) still releases its calls.
        if self._shutdown_task is not None:
            log.info("worker %d: SIGTERM while already stopping; ignored", self.index)
            return
        log.info("worker %d: SIGTERM: releasing calls and stopping", self.index)
        spawn(self._shutdown(), "worker-shutdown")


def main(index: int, config_path: str, bus_endpoint: str) -> None:
    _die_with_parent()
    # First the secrets the supervisor writes on our stdin (never on disk), then the rest
    # of the config from its effective-config file; stdin is not used after this.
    secrets = config_secrets.read_line(sys.stdin.buffer)
    _release_stdin()
    with open(config_path, "rb") as f:
        config = config_secrets.merge(msgspec.json.decode(f.read()), secrets)
    logging.basicConfig(
        level=config.appliance.log_level,
        format=f"%(asctime)s %(levelname)s worker[{index}] %(name)s: %(message)s",
    )
    logsafe.install()  # client and SIP text in log lines cannot forge lines
    # aioice logs every candidate pair check at INFO: far too chatty for an operator's log.
    logging.getLogger("aioice").setLevel(logging.WARNING)
    import uvloop

    uvloop.run(Worker(index, config, bus_endpoint).run())
