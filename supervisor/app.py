"""The supervisor: ZeroMQ router, call placement, worker restarts, orderly shutdown.

Browser connections arrive through `supervisor.front` and are handed here as `ClientConn`s;
everything a call needs beyond validation happens in the worker that owns its channel.
What a call holds here is kept by its owners: its channel by `Placement`, its record, key
and suid by `CallRegistry`, its room by `RoomDirectory`, its share by `Admission`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from msgspec import UNSET

from appliance.core import agent_token
from appliance.core import protocol as p
from appliance.core.config import Config
from appliance.core.config_secrets import encode_line, split
from appliance.core.periodic import FailureLog, Periodic, call_later_safe
from appliance.core.tasks import spawn
from appliance.core.throttle import BudgetedLogger
from appliance.core.token_file import TokenFileError, read_token
from appliance.edges import bus
from appliance.edges.aps_client import ApsClient
from supervisor.admission import (
    CAUSE_CONGESTION,
    TOO_MANY_ROOMKEYS,
    Admission,
    AdmissionCounters,
    Limits,
    RoomkeyGuard,
)
from supervisor.calls import CallKey, CallRecord, CallRegistry, ClientConn, FrameSink
from supervisor.dialogs import DialogKeeper
from supervisor.health import HealthBook, LagLimits
from supervisor.liveness import Liveness, Verdict
from supervisor.peers import DELIVERED, UNKNOWN_ROOMKEY, Peers
from supervisor.placement import Placement
from supervisor.pool import WorkerPool
from supervisor.recordings import RecordingManager
from supervisor.rooms import RoomDirectory

log = logging.getLogger("appliance.supervisor")

LIVENESS_CHECK_INTERVAL = 0.25  # s: a silent worker is seen within heartbeat_timeout + this
SHUTTING_DOWN = "appliance shutting down"
WORKER_FAILED = "media worker failed"


class Supervisor:
    def __init__(self, config: Config, effective_config_path: str) -> None:
        self.config = config
        # First: a start refused for want of it must leave no ZeroMQ socket to hang the exit.
        self.agent_secret = _agent_secret(config)
        self.appliance_id = config.appliance.id
        count = config.worker_count()
        self.placement = Placement(count, config.workers.channels_per_worker)
        self.pool = WorkerPool(
            count,
            effective_config_path,
            config.bus_endpoint(),
            config.workers.restart_delay,
            self._on_worker_exit,
            # The effective config file holds no secret: workers get them on stdin.
            secrets=encode_line(split(config)[1]),
        )
        # The supervisor closes AP-S call records that a dead worker can no longer close.
        self.aps = ApsClient.from_config(config)  # with its API token, if one is configured
        self.recordings = RecordingManager(config, self.aps)
        self.calls = CallRegistry()  # the browser connections and the calls they placed
        self.rooms = RoomDirectory(self.placement.worker_of)
        self.worker_ready: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(count)}
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._receiver: asyncio.Task[None] | None = None
        self._shutdown_done: set[int] = set()
        # Every worker's confirmed desk-phone dialogs, for BYE if the worker dies.
        self.dialogs = DialogKeeper(config, self._send_worker)
        # Duplicate-login notices to and from other appliances (Flow 3).
        self.peers = Peers(config, self._deliver_duplicate_login)
        # The bus heartbeat: who has not spoken for heartbeat_timeout is silent, then hung.
        self.liveness = Liveness(config.admin.heartbeat_timeout, config.admin.hung_restart_after)
        self.health = HealthBook(
            self.appliance_id, LagLimits(config.admin.degraded_lag_ms, config.admin.degraded_after),
            self.placement, self.pool, self.liveness, self.calls, self.peers,
            periodic_failures=self.periodic_failures, admission_status=self.admission_status)
        # Periodic jobs re-arm before they run and log their errors: /status never freezes.
        self._health_timer = Periodic(1.0, self.health.sample, "health sampling")
        self._liveness_timer = Periodic(LIVENESS_CHECK_INTERVAL, self._check_liveness,
                                        "worker heartbeat check")
        self._identities = {bus.worker_identity(i): i for i in range(count)}
        self._dispatching = False  # _receive is waiting on a dispatch, not reading the bus
        self._shutdown_event = asyncio.Event()
        self.stopping = False
        # Admission control: each client's share of the channels and of the setups in flight.
        adm = config.admission
        self.admission = Admission(Limits(
            setup_per_connection=adm.max_setup_per_connection,
            setup_per_address=adm.max_setup_per_address, setup_total=adm.max_setup_total,
            calls_per_connection=adm.max_calls_per_connection,
            calls_per_address=adm.max_calls_per_address))
        self.roomkey_guard = RoomkeyGuard(adm.wrong_roomkeys_per_minute,
                                          adm.wrong_roomkey_cooldown)
        self.counters = AdmissionCounters()
        # What a client can trigger at will is logged within a budget, the rest counted.
        self._refusal_log = BudgetedLogger(log, 20, 10.0,
                                           note=" [%d refusals since not logged]")
        self._error_log = BudgetedLogger(log, 5, 10.0, note=" (%d more not logged)",
                                         note_every_line=True)

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
        self._health_timer.start()
        self._liveness_timer.start()

    def periodic_failures(self) -> dict[str, int]:
        """How often each periodic job failed (shown in /status and /metrics)."""
        return {t.errors.name: t.errors.failures
                for t in (self._health_timer, self._liveness_timer)}

    def _check_liveness(self) -> None:
        now = asyncio.get_running_loop().time()
        for index, verdict in self.liveness.check(now, listening=not self._dispatching):
            self._apply_liveness(index, verdict)

    def _apply_liveness(self, index: int, verdict: Verdict) -> None:
        quiet = self.liveness.quiet_for(index)
        if verdict is Verdict.SILENT:
            # Not ready: no new call (nor agent leg) is placed there while it is silent.
            self.placement.set_ready(index, False)
            log.warning("worker %d silent for %.1f s (pid %s): it gets no new calls; "
                        "restarted if still silent after %.0f s", index, quiet,
                        self.pool.pid(index), self.config.admin.hung_restart_after)
        elif verdict is Verdict.BACK:
            if not self.stopping:
                self.placement.set_ready(index, True)
            log.info("worker %d speaks again: it takes calls again", index)
        elif verdict is Verdict.HUNG and not self.stopping:
            log.error("worker %d hung: silent for %.1f s; killing pid %s to restart it", index,
                      quiet, self.pool.pid(index))
            self.pool.kill(index)  # its watcher releases its calls (41) and restarts it

    def _set_degraded(self, index: int, degraded: bool, lag_ms: float) -> None:
        """HealthBook's verdict on a worker's loop lag: a degraded worker gets no new calls."""
        self.placement.set_degraded(index, degraded)
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
        self._health_timer.stop()
        self._liveness_timer.stop()
        log.info("shutting down: releasing %d call(s)", len(self.calls))
        ready = {i for i, s in enumerate(self.placement.slots) if s.ready}
        shutdown = bus.Shutdown(p.CAUSE_TEMPORARY_FAILURE, SHUTTING_DOWN)
        for index in sorted(ready):
            self._send_worker(index, shutdown)
        for index in range(len(self.placement.slots)):
            if self.liveness.is_silent(index):
                # It would not answer Shutdown; waiting for it would only delay the stop.
                log.warning("worker %d is silent: killing it instead of waiting", index)
                self.pool.kill(index)
        if ready:
            try:
                await asyncio.wait_for(self._wait_shutdown_done(ready), timeout)
            except TimeoutError:
                log.warning("workers %s did not confirm shutdown", ready - self._shutdown_done)
        # Anything a worker could not release is released here, so no browser is left hanging.
        for record in self.calls.records():
            await self._release_record(record, p.CAUSE_TEMPORARY_FAILURE, SHUTTING_DOWN)
        await self.pool.stop(timeout=5)
        if self._receiver is not None:
            self._receiver.cancel()
        self._router.close(linger=0)
        self._ctx.term()
        self.peers.close()
        self.dialogs.close()
        await self.aps.close()

    async def _wait_shutdown_done(self, expected: set[int]) -> None:
        while not expected <= self._shutdown_done:
            self._shutdown_event.clear()
            await self._shutdown_event.wait()

    # -- browser side --------------------------------------------------------------------

    def open_conn(self, sink: FrameSink, peer: str = "") -> ClientConn:
        return self.calls.open_conn(sink, peer)

    def close_conn(self, conn: ClientConn) -> None:
        # Its workers end its calls (ConnectionClosed), then free their channels as usual.
        for worker, channels in self.calls.close_conn(conn).items():
            self._send_worker(worker, bus.ConnectionClosed(conn.id, channels))
        self.roomkey_guard.forget(conn.guard_keys[0])  # the address's count outlives it

    async def handle_frame(self, conn: ClientConn, data: bytes | str) -> None:
        """One frame from a browser. Whatever goes wrong here ends in a `release` to it,
        never in an exception to the front: that would kill the WebSocket with a traceback
        (and, before this guard, could leave a booked channel behind)."""
        action: p.Action | None = None
        try:
            try:
                action = p.decode(data)
            except p.ProtocolError as err:
                log.info("conn %d: refused frame: %s", conn.id, err.causestring)
                await self._reply(conn, p.release_for(err))
                return
            await self._handle_action(conn, action)
        except Exception:
            self.counters.internal_errors += 1
            self._error_log.log(logging.ERROR, "conn %d: internal error on a %s frame", conn.id,
                                "malformed" if action is None else _action_name(action),
                                exc_info=True)
            reply = (p.Release(cause=p.CAUSE_INVALID_MESSAGE, causestring="malformed frame")
                     if action is None else
                     self._release(action, 0, p.CAUSE_TEMPORARY_FAILURE, "internal error"))
            with contextlib.suppress(Exception):  # the client may be gone; we are done
                await self._reply(conn, reply)

    async def _handle_action(self, conn: ClientConn, action: p.Action) -> None:
        assert action.dialogid is not UNSET and action.ref is not UNSET
        key = (action.dialogid, action.ref)
        if self.stopping:
            await self._reply(conn, self._release(action, 0, p.CAUSE_TEMPORARY_FAILURE,
                                                  SHUTTING_DOWN))
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
            conn.forget_call(key)
            # Only the fact travels: the browser's cause and causestring are not the worker's
            # business, and a value the bus cannot carry must not orphan the call.
            action = p.Release(dialogid=action.dialogid, ref=action.ref, channel=channel)
        data = self._encode_for_worker(bus.ClientAction(conn.id, channel, action))
        if data is None:
            await self._reply(conn, self._release(action, 0, p.CAUSE_INVALID_IE_CONTENTS,
                                                  f"{_action_name(action)}: value out of range"))
            return
        self._send_bytes(record.worker, "ClientAction", data)

    async def _offer(self, conn: ClientConn, key: CallKey, offer: p.Offer) -> None:
        if key in conn.calls:
            await self._reply(
                conn,
                self._release(offer, conn.calls[key], p.CAUSE_MESSAGE_NOT_COMPATIBLE_WITH_STATE,
                              "second offer for the same dialogid+ref"),
            )
            return
        suid = None if offer.suid is UNSET else offer.suid
        if suid is not None and self.calls.suid_live(suid):
            await self._refuse(conn, offer, p.CAUSE_CALL_REJECTED, "invalid suid")
            return
        room_worker: int | None = None
        if offer.module == "Agent":
            room_worker = await self._admit_agent(conn, offer)
            if room_worker is None:
                return
        refusal = self.admission.refusal(conn.id, conn.address, offer.module)
        if refusal is not None:
            await self._refuse(conn, offer, CAUSE_CONGESTION, refusal)
            return
        channel = self.placement.allocate(room_worker)
        if channel is None:
            await self._refuse(conn, offer, p.CAUSE_NO_CIRCUIT, "no circuit available")
            return
        worker = self.placement.worker_of(channel)
        assert worker is not None
        record = CallRecord(conn.id, channel, worker, key[0], key[1], suid, offer.module)
        self._book(conn, record, offer)
        # From here to the hand-off, any failure un-books everything just booked.
        try:
            data = bus.encode(bus.StartCall(conn.id, channel, offer))
        except Exception as exc:  # a value the bus cannot carry (an integer beyond 64 bits)
            self._free(channel)
            await self._refuse(conn, offer, p.CAUSE_INVALID_IE_CONTENTS,
                               "offer: value out of range", detail=str(exc))
            return
        try:
            sent = self._send_bytes(worker, "StartCall", data)
        except BaseException:  # a bug: handle_frame answers it, the booking must not stay
            self._free(channel)
            raise
        if not sent:
            self._free(channel)
            await self._refuse(conn, offer, p.CAUSE_TEMPORARY_FAILURE,
                               "media worker unavailable")
            return
        log.info("conn %d: %s offer %d/%d placed on channel %d (worker %d)", conn.id,
                 offer.module, key[0], key[1], channel, worker)

    def _book(self, conn: ClientConn, record: CallRecord, offer: p.Offer) -> None:
        """Everything a placed call holds besides its channel (taken by
        `Placement.allocate`); `_free` gives all of it back, the channel too."""
        self.calls.book(conn, record)
        if offer.module == "Agent" and offer.roomkey is not UNSET:
            self.rooms.join(offer.roomkey, record.channel)
        self.admission.booked(record.channel, conn.id, conn.address, offer.module)

    async def _admit_agent(self, conn: ClientConn, offer: p.Offer) -> int | None:
        """The worker holding the offer's room, or None once the offer is refused.

        The roomkey is the agent leg's only credential unless tokens are on, so wrong
        roomkeys are throttled per connection and address, and while a client is in the
        cool-down its agent offers are refused before any roomkey is looked at."""
        assert offer.roomkey is not UNSET
        now = time.monotonic()
        if self.roomkey_guard.blocked(conn.guard_keys, now):
            # Counted, not logged: the line that started the cool-down said it all.
            await self._refuse(conn, offer, p.CAUSE_CALL_REJECTED, TOO_MANY_ROOMKEYS,
                               level=logging.DEBUG)
            return None
        token = "" if offer.token is UNSET else offer.token
        if self.agent_secret is not None and (token or self.config.aps.require_agent_token):
            try:
                agent_token.check(self.agent_secret, offer.roomkey, token, time.time())
            except agent_token.TokenRefused as exc:
                self.counters.tokens_refused += 1
                await self._wrong_roomkey(conn, offer, str(exc), now)
                return None
        worker = self.rooms.worker(offer.roomkey)
        if worker is None:
            self.counters.wrong_roomkeys += 1
            await self._wrong_roomkey(conn, offer, "invalid roomkey", now)
            return None
        if self.rooms.has_agent(offer.roomkey):
            await self._refuse(conn, offer, p.CAUSE_CALL_REJECTED, "room already has an agent")
            return None
        return worker

    async def _wrong_roomkey(self, conn: ClientConn, offer: p.Offer, why: str,
                             now: float) -> None:
        blocked = self.roomkey_guard.wrong(conn.guard_keys, now)
        if blocked:
            self.counters.roomkey_blocks += 1
        detail = f"roomkey {offer.roomkey}" + (
            f"; agent offers from conn {conn.id} and {conn.address or '?'} refused for "
            f"{self.roomkey_guard.cooldown:.0f} s" if blocked else "")
        await self._refuse(conn, offer, p.CAUSE_CALL_REJECTED,
                           TOO_MANY_ROOMKEYS if blocked else why, detail=detail,
                           level=logging.WARNING)

    async def _refuse(self, conn: ClientConn, offer: p.Offer, cause: int, causestring: str,
                      detail: str = "", level: int = logging.INFO) -> None:
        """Answer an offer with a release (channel 0), count it, and log it within budget:
        every refusal here is something a client can provoke as fast as it can send."""
        self.counters.refused[causestring] += 1
        self._refusal_log.log(level, "conn %d from %s: %s offer %d/%d refused: %d %s%s", conn.id,
                              conn.peer or "?", offer.module, offer.dialogid, offer.ref, cause,
                              causestring, f" ({detail})" if detail else "")
        await self._reply(conn, self._release(offer, 0, cause, causestring))

    @staticmethod
    def _release(action: p.Action, channel: int, cause: int, causestring: str) -> p.Release:
        return p.Release(dialogid=action.dialogid, ref=action.ref, channel=channel, cause=cause,
                         causestring=causestring)

    async def _reply(self, conn: ClientConn, action: p.Action) -> None:
        if not conn.closed:
            await conn.sink.send_frame(p.encode(action))

    def admission_status(self) -> dict[str, Any]:
        """What /status and /metrics show of admission control."""
        c = self.counters
        return {"calls_in_setup": self.admission.in_setup,
                "offers_refused": dict(c.refused), "wrong_roomkeys": c.wrong_roomkeys,
                "agent_tokens_refused": c.tokens_refused, "roomkey_blocks": c.roomkey_blocks,
                "roomkey_suspects": len(self.roomkey_guard),
                "frame_errors": c.internal_errors,
                "agent_token_required": self.config.aps.require_agent_token}

    # -- worker side ---------------------------------------------------------------------

    def _send_worker(self, index: int, msg: bus._Msg) -> bool:
        """Whether `msg` went out; never raises (callers hold bookkeeping to keep straight)."""
        data = self._encode_for_worker(msg)
        return data is not None and self._send_bytes(index, type(msg).__name__, data)

    def _encode_for_worker(self, msg: bus._Msg) -> bytes | None:
        try:
            return bus.encode(msg)
        except Exception as exc:  # OverflowError & co.: a browser's value the bus cannot carry
            self._error_log.log(logging.WARNING, "%s not encodable for the bus: %s",
                                type(msg).__name__, exc)
            return None

    def _send_bytes(self, index: int, what: str, data: bytes) -> bool:
        try:
            # zmq.asyncio does not raise here: the error (EHOSTUNREACH under ROUTER_MANDATORY)
            # is set on the returned future, at once for a send that cannot be queued.
            sent = self._router.send_multipart([bus.worker_identity(index), data])
            exc = sent.exception() if sent.done() else None
        except zmq.ZMQError as error:
            exc = error
        if exc is not None:
            # ROUTER_MANDATORY: the worker is gone (restarting); its calls get released.
            log.warning("worker %d unreachable for %s: %s", index, what, exc)
            return False
        sent.add_done_callback(_retrieve_send_error)
        return True

    async def _receive(self) -> None:
        errors = FailureLog("bus receive", log_interval=10.0, logger=log)
        loop = asyncio.get_running_loop()
        while True:
            try:
                frames = await self._router.recv_multipart()
            except zmq.ZMQError as exc:
                if self._router.closed:
                    return
                # One error must not leave the supervisor deaf (and every worker "silent").
                errors.failed(exc, loop.time())
                await asyncio.sleep(0.1)
                continue
            if len(frames) != 2:
                errors.failed(ValueError(f"bus message of {len(frames)} frames"), loop.time())
                continue
            identity, data = frames
            index = self._identities.get(identity)
            if index is not None:
                self._heard(index)
            try:
                msg = bus.decode_to_supervisor(data)
            except msgspec.DecodeError:
                log.error("undecodable bus message from %r", identity)
                continue
            # While a dispatch waits (a browser slow to take a frame), the bus is not being
            # read: the heartbeat check must not count that against the workers.
            self._dispatching = True
            try:
                await self._dispatch(msg)
            except Exception:
                log.exception("error handling %s from %r", type(msg).__name__, identity)
            finally:
                self._dispatching = False

    def _heard(self, index: int) -> None:
        if self.liveness.heard(index) is Verdict.BACK:
            self._apply_liveness(index, Verdict.BACK)

    async def _dispatch(self, msg: bus.ToSupervisor) -> None:
        if isinstance(msg, bus.ToClient):
            conn = self.calls.conn(msg.conn)
            if conn is None:
                return
            if isinstance(msg.action, p.Release) and msg.action.dialogid is not UNSET:
                # Over for the browser; the channel frees when the worker says so.
                conn.forget_call((msg.action.dialogid, msg.action.ref))  # type: ignore[arg-type]
            await self._reply(conn, msg.action)
        elif isinstance(msg, bus.NotifyPeer):
            # Its own task: a slow or dead peer must not hold up the bus.
            spawn(self.peers.notify(msg.ms, msg.roomkey, msg.message), "notify-peer")
        elif isinstance(msg, bus.ChannelFreed):
            self._free(msg.channel)
        elif isinstance(msg, bus.CallConnected):
            self.admission.connected(msg.channel)  # its setup is over
        elif isinstance(msg, bus.RoomOpened):
            if msg.channel in self.calls:
                self.rooms.open(msg.roomkey, msg.channel)
        elif isinstance(msg, bus.Hello):
            log.info("worker %d is up (pid %d)", msg.index, msg.pid)
            if self.stopping:
                self._send_worker(msg.index, bus.Shutdown(p.CAUSE_TEMPORARY_FAILURE,
                                                          SHUTTING_DOWN))
                return
            self.placement.set_ready(msg.index, True)
            self.worker_ready[msg.index].set()
            self.liveness.started(msg.index)
            self.dialogs.worker_hello(msg.index)  # its dead predecessor's dialogs: BYE
        elif isinstance(msg, bus.DialogUp):
            self.dialogs.up(msg)
        elif isinstance(msg, bus.DialogDown):
            self.dialogs.down(msg)
        elif isinstance(msg, bus.RecordingEnded):
            self.recordings.submit(Path(msg.job_path))
        elif isinstance(msg, bus.WorkerStats):
            degraded = self.health.record(msg)
            if degraded is not None:
                self._set_degraded(msg.index, degraded, msg.loop_lag_p99_ms)
        elif isinstance(msg, bus.ShutdownDone):
            self._shutdown_done.add(msg.index)
            self._shutdown_event.set()

    def _deliver_duplicate_login(self, roomkey: int, message: str, from_ms: str) -> str:
        """A peer (or AP-S about this appliance) says the customer of room `roomkey` logged
        in again elsewhere: the worker holding the room shows `message` to both parties."""
        channel = self.rooms.user_channel(roomkey)
        worker = self.rooms.worker(roomkey)
        if worker is None:
            log.info("duplicate-login notice from %s for roomkey %d: no such live call here",
                     from_ms, roomkey)
            return UNKNOWN_ROOMKEY
        log.info("duplicate-login notice from %s for roomkey %d: telling channel %d's room "
                 "(worker %d)", from_ms, roomkey, channel, worker)
        self._send_worker(worker, bus.DuplicateLogin(roomkey, message))
        return DELIVERED

    def _free(self, channel: int) -> None:
        """Give back everything `_book` booked for the call on `channel`, and the channel."""
        self.calls.free(channel)
        self._free_channel(channel)
        self.admission.freed(channel)

    def _free_channel(self, channel: int) -> None:
        """The channel is free for a new call, and its room (if any) is left."""
        self.placement.release(channel)
        self.rooms.free(channel)

    def _on_worker_exit(self, index: int, code: int | None) -> None:
        """A worker died: release its calls (nobody else's) and free its channels."""
        self.placement.set_ready(index, False)
        self.worker_ready[index] = asyncio.Event()
        self.liveness.forget(index)  # its successor is judged once it says Hello
        self.dialogs.worker_died(index)  # its desk-phone dialogs get BYE (supervisor/dialogs.py)
        for record in self.calls.on_worker(index):
            roomkey = self.rooms.roomkey_of(record.channel)
            spawn(self._release_record(record, p.CAUSE_TEMPORARY_FAILURE, WORKER_FAILED))
            if roomkey is not None:
                spawn(self._report_released(roomkey, p.CAUSE_TEMPORARY_FAILURE, WORKER_FAILED))
        # Its channels are free at once (no new call goes there before its successor's
        # Hello); the records and keys go when each release above runs.
        for channel in self.placement.busy_channels(index):
            self._free_channel(channel)
        # Its recordings stopped mid-call: the captures are unlocked now; finish them.
        call_later_safe(0.5, self.recordings.pick_up_leftovers, "recording leftovers pickup")

    async def _report_released(self, roomkey: int, cause: int, causestring: str) -> None:
        # A recorded call's EndCall waits for the Convertor (it names the file).
        await self.aps.report_released(roomkey, cause, causestring,
                                       end_call=not self.recordings.has_job(roomkey))

    async def _release_record(self, record: CallRecord, cause: int, causestring: str) -> None:
        self._free(record.channel)
        conn = self.calls.conn(record.conn)
        if conn is None:
            return
        await self._reply(
            conn,
            p.Release(dialogid=record.dialogid, ref=record.ref, channel=record.channel,
                      cause=cause, causestring=causestring),
        )


def _retrieve_send_error(sent: asyncio.Future[Any]) -> None:
    """A bus send that failed later (the socket closed under it): logged, not left for the
    garbage collector's "Future exception was never retrieved"."""
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("bus send failed: %s", sent.exception())


def _action_name(action: p.Action) -> str:
    return type(action).__struct_config__.tag  # type: ignore[return-value]


def _agent_secret(config: Config) -> bytes | None:
    """The secret agent tokens are checked with (the same file AP-S signs them with)."""
    path = config.aps.agent_token_secret_file
    if not path:
        return None
    try:
        return read_token(Path(path)).encode()
    except TokenFileError as exc:
        # Refuse to start: running unlocked when the operator asked for a lock is worse.
        raise SystemExit(f"appliance: aps.agent_token_secret_file: {exc}") from None
