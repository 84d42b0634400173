"""The desk-phone dialogs of every worker, so that none outlives the worker that carried it.

Each worker reports its confirmed SIP dialogs over the bus (DialogUp with a snapshot,
DialogDown when over: appliance/sip/snapshot.py). When a worker dies (kill -9, a crash, a
hung worker restarted), its calls are released towards the browsers at once, and its
dialogs become orphans here: its replacement, which binds the same SIP port, gets them in
ByeDialogs right after its Hello and sends each a BYE from that port (what the PBX expects:
the address in our Contact). If no replacement is up after `workers.dialog_bye_fallback`
seconds (a worker that cannot start, a long restart_delay), the supervisor sends the BYEs
itself from an ephemeral UDP port, with the same sans-IO code (appliance/sip/orphan.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from appliance.core import protocol as p
from appliance.core.config import Config
from appliance.core.tasks import spawn
from appliance.edges import bus
from appliance.sip.auth import Credentials
from appliance.sip.endpoint import SipEndpoint
from appliance.sip.orphan import DialogClosed
from appliance.sip.snapshot import DialogSnapshot

log = logging.getLogger("appliance.supervisor")

# A worker carries at most its channels' dialogs; this bounds what a confused or hostile
# bus peer could make us hold.
MAX_DIALOGS_PER_WORKER = 10_000


class DialogKeeper:
    def __init__(self, config: Config, send_worker: Callable[[int, bus._Msg], None]) -> None:
        self.config = config
        self._send_worker = send_worker
        self.live: dict[int, dict[str, DialogSnapshot]] = {}  # worker -> Call-ID -> dialog
        self.orphans: dict[int, dict[str, DialogSnapshot]] = {}  # of dead workers
        self._fallbacks: dict[int, asyncio.TimerHandle] = {}
        self._endpoint: SipEndpoint | None = None
        self.byes_sent_here = 0  # BYEs the supervisor sent itself (fallback)

    # -- what the workers say ----------------------------------------------------------------

    def up(self, msg: bus.DialogUp) -> None:
        dialogs = self.live.setdefault(msg.index, {})
        if msg.snapshot.call_id in dialogs or len(dialogs) < MAX_DIALOGS_PER_WORKER:
            dialogs[msg.snapshot.call_id] = msg.snapshot
        else:
            log.error("worker %d reports more than %d dialogs; not keeping dialog %s",
                      msg.index, MAX_DIALOGS_PER_WORKER, msg.snapshot.call_id)

    def down(self, msg: bus.DialogDown) -> None:
        self.live.get(msg.index, {}).pop(msg.call_id, None)

    def worker_died(self, index: int) -> None:
        dead = self.live.pop(index, {})
        if not dead:
            return
        self.orphans.setdefault(index, {}).update(dead)
        log.warning("worker %d died with %d desk-phone dialog(s) up; they get BYE from its "
                    "replacement (or from here in %.1f s)", index, len(dead),
                    self.config.workers.dialog_bye_fallback)
        if index not in self._fallbacks:
            self._fallbacks[index] = asyncio.get_running_loop().call_later(
                self.config.workers.dialog_bye_fallback, self._fallback, index)

    def worker_hello(self, index: int) -> None:
        """The replacement is up on the same SIP port: it sends the BYEs."""
        orphans = self.orphans.pop(index, None)
        timer = self._fallbacks.pop(index, None)
        if timer is not None:
            timer.cancel()
        if orphans:
            log.info("worker %d: asking it to BYE %d dialog(s) of its dead predecessor",
                     index, len(orphans))
            self._send_worker(index, bus.ByeDialogs(list(orphans.values())))

    # -- the fallback ------------------------------------------------------------------------

    def _fallback(self, index: int) -> None:
        self._fallbacks.pop(index, None)
        orphans = self.orphans.pop(index, None)
        if orphans:
            spawn(self._bye_here(index, list(orphans.values())), "dialog-bye-fallback")

    async def _bye_here(self, index: int, dialogs: list[DialogSnapshot]) -> None:
        endpoint = await self._open_endpoint()
        if endpoint is None:
            log.error("no SIP socket for the BYEs of worker %d's %d dialog(s): they stay up "
                      "at the PBX", index, len(dialogs))
            return
        sip = self.config.sip
        credentials = Credentials(sip.username, sip.password) if sip.username else None
        count = endpoint.close_dialogs(dialogs, self._closed, cause=p.CAUSE_TEMPORARY_FAILURE,
                                       credentials=credentials)
        self.byes_sent_here += count
        log.warning("worker %d is not back: the supervisor sent BYE for its %d dialog(s) from "
                    "%s:%d", index, count, *endpoint.local_address)

    async def _open_endpoint(self) -> SipEndpoint | None:
        if self._endpoint is None:
            sip = self.config.sip
            host, _, port = sip.proxy.rpartition(":")
            try:
                self._endpoint = await SipEndpoint.create(
                    (sip.listen, 0), (host, int(port)), user_agent=sip.user_agent,
                    allowed_sources=sip.allowed_sources,
                    strict_source_port=sip.strict_source_port)
            except OSError as exc:
                log.error("cannot open a SIP socket on %s: %s", sip.listen, exc)
                return None
        return self._endpoint

    @staticmethod
    def _closed(closed: DialogClosed) -> None:
        level = logging.INFO if closed.status < 300 or closed.status == 481 else logging.WARNING
        log.log(level, "dialog %s of a dead worker: BYE answered %d %s", closed.call_id,
                closed.status, closed.reason)

    def close(self) -> None:
        for timer in self._fallbacks.values():
            timer.cancel()
        self._fallbacks.clear()
        if self._endpoint is not None:
            self._endpoint.close()
