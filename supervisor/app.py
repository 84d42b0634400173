"""The supervisor: ZeroMQ router, call placement, worker restarts, orderly shutdown.

Browser connections arrive through `supervisor.front` and are handed here as `ClientConn`s;
everything a call needs beyond validation happens in the worker that owns its channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio
from msgspec import UNSET

from appliance import bus
from appliance import protocol as p
from appliance.aps_client import ApsClient, ApsUnavailable
from appliance.config import Config
from appliance.tasks import spawn
from supervisor.health import HealthBook
from supervisor.peers import DELIVERED, UNKNOWN_ROOMKEY, Peers
from supervisor.placement import Placement
from supervisor.pool import WorkerPool
from supervisor.recordings import RecordingManager

log = logging.getLogger("appliance.supervisor")

CallKey = tuple[int, int]  # (dialogid, ref)


class FrameSink(Protocol):
    async def send_frame(self, data: bytes) -> None: ...


@dataclass
class ClientConn:
    """One browser/app WebSocket and the calls it placed."""

    id: int
    sink: FrameSink
    calls: dict[CallKey, int] = field(default_factory=dict)  # -> channel
    closed: bool = False


@dataclass
class CallRecord:
    conn: int
    channel: int
    worker: int
    dialogid: int
    ref: int
    suid: str | None
    module: str = "User"
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, config: Config, effective_config_path: str) -> None:
        self.config = config
        self.appliance_id = config.appliance.id
        count = config.worker_count()
        self.placement = Placement(count, config.workers.channels_per_worker)
        self.pool = WorkerPool(
            count,
            effective_config_path,
            config.bus_endpoint(),
            config.workers.restart_delay,
            self._on_worker_exit,
        )
        # The supervisor closes AP-S call records that a dead worker can no longer close.
        self.aps = ApsClient(config.aps.url, config.appliance.id, timeout=config.aps.timeout,
                             attempts=config.aps.attempts)
        self.recordings = RecordingManager(config, self.aps)
        self.conns: dict[int, ClientConn] = {}
        self.calls: dict[int, CallRecord] = {}  # channel -> record
        self.live_suids: dict[str, int] = {}  # suid -> channel
        self.agent_rooms: dict[int, int] = {}  # roomkey -> channel of its agent leg
        self.worker_ready: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(count)}
        self._conn_ids = itertools.count(1)
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._receiver: asyncio.Task[None] | None = None
        self._shutdown_done: set[int] = set()
        self.health = HealthBook(self)
        # Duplicate-login notices to and from other appliances (Flow 3).
        self.peers = Peers(config, self._deliver_duplicate_login)
        self._health_timer: asyncio.TimerHandle | None = None
        self._shutdown_event = asyncio.Event()
        self.stopping = False

    # -- start / stop --------------------------------------------------------------------

    async def start(self) -> None:
        endpoint = self.config.bus_endpoint()
        self._router.setsockopt(zmq.LINGER, 0)
        # Tell us when a worker identity is unknown instead of dropping the frame silently.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.bind(endpoint)
        await self.aps.start()
        self.peers.start()
        self.recordings.prepare()
        self.recordings.pick_up_leftovers()
        self._receiver = asyncio.create_task(self._receive())
        await self.pool.start()
        self._sample_health()

    def _sample_health(self) -> None:
        self.health.sample()
        self._health_timer = asyncio.get_running_loop().call_later(1.0, self._sample_health)

    def log_degraded(self, index: int, degraded: bool, lag_ms: float) -> None:
        if degraded:
            log.warning("worker %d degraded: event-loop lag p99 %.0f ms; it gets no new calls",
                        index, lag_ms)
        else:
            log.info("worker %d recovered (loop lag p99 %.0f ms); it takes calls again", index,
                     lag_ms)

    async def wait_ready(self, timeout: float = 30) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(e.wait() for e in self.worker_ready.values())), timeout
        )

    async def shutdown(self, timeout: float = 10) -> None:
        """Release every call with a cause, let workers finish, then stop."""
        if self.stopping:
            return
        self.stopping = True
        self.pool.stopping = True  # a worker dying now is not restarted
        if self._health_timer is not None:
            self._health_timer.cancel()
        log.info("shutting down: releasing %d call(s)", len(self.calls))
        shutdown = bus.Shutdown(p.CAUSE_TEMPORARY_FAILURE, "appliance shutting down")
        for index in range(len(self.placement.slots)):
            if self.placement.slots[index].ready:
                self._send_worker(index, shutdown)
        ready = {i for i, s in enumerate(self.placement.slots) if s.ready}
        if ready:
            try:
                await asyncio.wait_for(self._wait_shutdown_done(ready), timeout)
            except TimeoutError:
                log.warning("workers %s did not confirm shutdown", ready - self._shutdown_done)
        # Anything a worker could not release is released here, so no browser is left hanging.
        for record in list(self.calls.values()):
            await self._release_record(record, p.CAUSE_TEMPORARY_FAILURE, "appliance shutting down")
        await self.pool.stop(timeout=5)
        if self._receiver is not None:
            self._receiver.cancel()
        self._router.close(linger=0)
        self._ctx.term()
        self.peers.close()
        await self.aps.close()

    async def _wait_shutdown_done(self, expected: set[int]) -> None:
        while not expected <= self._shutdown_done:
            self._shutdown_event.clear()
            await self._shutdown_event.wait()

    # -- browser side --------------------------------------------------------------------

    def open_conn(self, sink: FrameSink) -> ClientConn:
        conn = ClientConn(next(self._conn_ids), sink)
        self.conns[conn.id] = conn
        return conn

    def close_conn(self, conn: ClientConn) -> None:
        conn.closed = True
        self.conns.pop(conn.id, None)
        by_worker: dict[int, list[int]] = {}
        for channel in conn.calls.values():
            record = self.calls.get(channel)
            if record is not None:
                by_worker.setdefault(record.worker, []).append(channel)
        for worker, channels in by_worker.items():
            self._send_worker(worker, bus.ConnectionClosed(conn.id, channels))
        conn.calls.clear()

    async def handle_frame(self, conn: ClientConn, data: bytes | str) -> None:
        try:
            action = p.decode(data)
        except p.ProtocolError as err:
            log.info("conn %d: refused frame: %s", conn.id, err.causestring)
            await self._reply(conn, p.release_for(err))
            return
        assert action.dialogid is not UNSET and action.ref is not UNSET
        key = (action.dialogid, action.ref)
        if self.stopping:
            await self._reply(conn, self._release(action, 0, p.CAUSE_TEMPORARY_FAILURE,
                                                  "appliance shutting down"))
            return
        if isinstance(action, p.Offer):
            await self._offer(conn, key, action)
            return
        channel = conn.calls.get(key)
        if channel is None:
            await self._reply(
                conn,
                self._release(action, 0, p.CAUSE_MESSAGE_NOT_COMPATIBLE_WITH_STATE,
                              f"{_action_name(action)} before offer for this dialogid+ref"),
            )
            return
        record = self.calls.get(channel)
        if record is None:
            return
        if isinstance(action, p.Release):
            # The call is over for this browser now; the channel frees when the worker says so.
            del conn.calls[key]
        self._send_worker(record.worker, bus.ClientAction(conn.id, channel, action))

    async def _offer(self, conn: ClientConn, key: CallKey, offer: p.Offer) -> None:
        if key in conn.calls:
            await self._reply(
                conn,
                self._release(offer, conn.calls[key], p.CAUSE_MESSAGE_NOT_COMPATIBLE_WITH_STATE,
                              "second offer for the same dialogid+ref"),
            )
            return
        suid = None if offer.suid is UNSET else offer.suid
        if suid is not None and suid in self.live_suids:
            await self._reply(conn, self._release(offer, 0, p.CAUSE_CALL_REJECTED, "invalid suid"))
            return
        if offer.module == "Agent":
            assert offer.roomkey is not UNSET
            worker = self.placement.room_worker(offer.roomkey)
            if worker is None:
                await self._reply(
                    conn, self._release(offer, 0, p.CAUSE_CALL_REJECTED, "invalid roomkey")
                )
                return
            if offer.roomkey in self.agent_rooms:
                await self._reply(conn, self._release(
                    offer, 0, p.CAUSE_CALL_REJECTED, "room already has an agent"))
                return
            channel = self.placement.allocate(worker)
        else:
            channel = self.placement.allocate()
        if channel is None:
            await self._reply(
                conn, self._release(offer, 0, p.CAUSE_NO_CIRCUIT, "no circuit available")
            )
            return
        worker = self.placement.worker_of(channel)
        assert worker is not None
        record = CallRecord(conn.id, channel, worker, key[0], key[1], suid, offer.module)
        self.calls[channel] = record
        conn.calls[key] = channel
        if suid is not None:
            self.live_suids[suid] = channel
        if offer.module == "Agent" and offer.roomkey is not UNSET:
            self.agent_rooms[offer.roomkey] = channel
        log.info("conn %d: %s offer %d/%d placed on channel %d (worker %d)", conn.id,
                 offer.module, key[0], key[1], channel, worker)
        self._send_worker(worker, bus.StartCall(conn.id, channel, offer))

    @staticmethod
    def _release(action: p.Action, channel: int, cause: int, causestring: str) -> p.Release:
        return p.Release(dialogid=action.dialogid, ref=action.ref, channel=channel, cause=cause,
                         causestring=causestring)

    async def _reply(self, conn: ClientConn, action: p.Action) -> None:
        if not conn.closed:
            await conn.sink.send_frame(p.encode(action))

    # -- worker side ---------------------------------------------------------------------

    def _send_worker(self, index: int, msg: bus._Msg) -> None:
        try:
            self._router.send_multipart([bus.worker_identity(index), bus.encode(msg)])
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY: the worker is gone (restarting); its calls get released.
            log.warning("worker %d unreachable for %s: %s", index, type(msg).__name__, exc)

    async def _receive(self) -> None:
        while True:
            identity, data = await self._router.recv_multipart()
            try:
                msg = bus.decode_to_supervisor(data)
            except msgspec.DecodeError:
                log.error("undecodable bus message from %r", identity)
                continue
            try:
                await self._dispatch(msg)
            except Exception:
                log.exception("error handling %s from %r", type(msg).__name__, identity)

    async def _dispatch(self, msg: bus.ToSupervisor) -> None:
        if isinstance(msg, bus.ToClient):
            conn = self.conns.get(msg.conn)
            if conn is None:
                return
            if isinstance(msg.action, p.Release) and msg.action.dialogid is not UNSET:
                conn.calls.pop((msg.action.dialogid, msg.action.ref), None)  # type: ignore[arg-type]
            await self._reply(conn, msg.action)
        elif isinstance(msg, bus.NotifyPeer):
            # Its own task: a slow or dead peer must not hold up the bus.
            spawn(self.peers.notify(msg.ms, msg.roomkey, msg.message), "notify-peer")
        elif isinstance(msg, bus.ChannelFreed):
            self._free(msg.channel)
        elif isinstance(msg, bus.RoomOpened):
            if msg.channel in self.calls:
                self.placement.open_room(msg.roomkey, msg.channel)
        elif isinstance(msg, bus.Hello):
            log.info("worker %d is up (pid %d)", msg.index, msg.pid)
            if self.stopping:
                self._send_worker(msg.index, bus.Shutdown(p.CAUSE_TEMPORARY_FAILURE,
                                                          "appliance shutting down"))
                return
            self.placement.set_ready(msg.index, True)
            self.worker_ready[msg.index].set()
        elif isinstance(msg, bus.RecordingEnded):
            self.recordings.submit(Path(msg.job_path))
        elif isinstance(msg, bus.WorkerStats):
            self.health.record(msg)
        elif isinstance(msg, bus.ShutdownDone):
            self._shutdown_done.add(msg.index)
            self._shutdown_event.set()

    def _deliver_duplicate_login(self, roomkey: int, message: str, from_ms: str) -> str:
        """A peer (or AP-S about this appliance) says the customer of room `roomkey` logged
        in again elsewhere: the worker holding the room shows `message` to both parties."""
        channel = self.placement.rooms.get(roomkey)
        worker = None if channel is None else self.placement.worker_of(channel)
        if worker is None:
            log.info("duplicate-login notice from %s for roomkey %d: no such live call here",
                     from_ms, roomkey)
            return UNKNOWN_ROOMKEY
        log.info("duplicate-login notice from %s for roomkey %d: telling channel %d's room "
                 "(worker %d)", from_ms, roomkey, channel, worker)
        self._send_worker(worker, bus.DuplicateLogin(roomkey, message))
        return DELIVERED

    def _free(self, channel: int) -> None:
        record = self.calls.pop(channel, None)
        self.placement.release(channel)
        if record is None:
            return
        if record.suid is not None and self.live_suids.get(record.suid) == channel:
            del self.live_suids[record.suid]
        for roomkey in [k for k, c in self.agent_rooms.items() if c == channel]:
            del self.agent_rooms[roomkey]
        conn = self.conns.get(record.conn)
        if conn is not None and conn.calls.get((record.dialogid, record.ref)) == channel:
            del conn.calls[(record.dialogid, record.ref)]

    def _on_worker_exit(self, index: int, code: int | None) -> None:
        """A worker died: release its calls (nobody else's) and free its channels."""
        self.placement.set_ready(index, False)
        self.worker_ready[index] = asyncio.Event()
        records = [r for r in self.calls.values() if r.worker == index]
        rooms = {c: k for k, c in self.placement.rooms.items()}
        for record in records:
            roomkey = rooms.get(record.channel)
            spawn(self._release_record(record, p.CAUSE_TEMPORARY_FAILURE, "media worker failed"))
            if roomkey is not None:
                spawn(self._report_released(roomkey, p.CAUSE_TEMPORARY_FAILURE,
                                            "media worker failed"))
        for channel in self.placement.busy_channels(index):
            self.placement.release(channel)
        # Its recordings stopped mid-call: the captures are unlocked now; finish them.
        asyncio.get_running_loop().call_later(0.5, self.recordings.pick_up_leftovers)

    async def _report_released(self, roomkey: int, cause: int, causestring: str) -> None:
        try:
            await self.aps.call_event(roomkey, "released", time.time(), cause, causestring)
            if not self.recordings.has_job(roomkey):  # else EndCall waits for the Convertor
                await self.aps.end_call(roomkey, "")
        except ApsUnavailable as exc:
            log.warning("AP-S did not take the end of call %d: %s", roomkey, exc)

    async def _release_record(self, record: CallRecord, cause: int, causestring: str) -> None:
        self._free(record.channel)
        conn = self.conns.get(record.conn)
        if conn is None:
            return
        await self._reply(
            conn,
            p.Release(dialogid=record.dialogid, ref=record.ref, channel=record.channel,
                      cause=cause, causestring=causestring),
        )


def _action_name(action: p.Action) -> str:
    return type(action).__struct_config__.tag  # type: ignore[return-value]
