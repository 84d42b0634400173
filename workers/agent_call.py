"""The agent's video leg (AgentVideo.html?roomkey=...): joins the room of a customer call
on this worker; its camera goes to the customer, the customer's camera comes to it.

It contains the agent's `WebRtcLeg` and its membership of that room; the leg reports to it
(`LegOwner`), it reports to the worker through `CallHost`.
"""

from __future__ import annotations

import asyncio
import logging

from msgspec import UNSET

from appliance.core import protocol as p
from workers.call_state import Event, Release
from workers.host import CallHost, Relayed
from workers.leg import WebRtcLeg
from workers.room import Room
from workers.rooms import RoomRegistry
from workers.video_relay import VideoRelay

log = logging.getLogger("appliance.call")


class AgentCall:
    module = "Agent"

    def __init__(self, host: CallHost, rooms: RoomRegistry, relay: VideoRelay, conn: int,
                 channel: int, offer: p.Offer) -> None:
        self._host = host
        self._rooms = rooms
        self._relay = relay
        self.conn = conn
        self.channel = channel
        self.offer = offer
        # The agent talks on the desk phone: its page gets video only from us.
        self.leg = WebRtcLeg(host, relay, self, conn, channel, offer, module=self.module,
                             send_kinds=("video",))
        self.room: Room | None = None
        self._closed = asyncio.Event()

    # -- Call: what the worker drives -------------------------------------------------------

    def start(self) -> None:
        self.leg.start()

    def client_action(self, action: p.Action) -> None:
        if isinstance(action, p.PeerData) and self.room is not None:
            self.room.command(self.leg, action)
        else:
            self.leg.client_action(action)

    def connection_closed(self) -> None:
        self.leg.connection_closed()

    def shutdown(self) -> None:
        self.leg.shutdown()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def relayed(self) -> Relayed:
        return self.leg.relayed()

    # -- LegOwner ---------------------------------------------------------------------------

    async def admit(self) -> None:
        roomkey = self.offer.roomkey
        room = None if roomkey is UNSET else self._rooms.find_open(roomkey)
        refusal = "invalid roomkey" if room is None else room.admit(self.leg)
        if refusal is not None:
            log.info("channel %d: agent refused: %s", self.channel, refusal)
            self.leg.apply(Event.ROOM_REFUSED, release=Release(p.CAUSE_CALL_REJECTED, refusal))
            return
        self.room = room
        self.leg.apply(Event.VERIFY_OK)
        self.leg.send(p.Alert(dialogid=self.offer.dialogid, ref=self.offer.ref,
                              channel=self.channel))

    def connected(self) -> None:
        if self.room is not None:
            self.room.agent_connected(self.leg, self._relay.receive(self.leg))

    def released(self, release: Release) -> None:
        if self.room is not None:
            self.room.agent_left(self.leg)

    async def teardown(self, release: Release) -> None:
        await self.leg.close()
        self._host.call_ended(self)
        self._closed.set()
