"""The agent's video leg (AgentVideo.html?roomkey=...): joins the room of a customer call
on this worker; its camera goes to the customer, the customer's camera comes to it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from msgspec import UNSET

from appliance.core import protocol as p
from workers.call_state import Event, Release
from workers.leg import WebRtcLeg

if TYPE_CHECKING:
    from workers.room import Room

log = logging.getLogger("appliance.call")


class AgentCall(WebRtcLeg):
    module = "Agent"
    # The agent talks on the desk phone: its page gets video only from us.
    send_kinds = ("video",)

    room: Room | None = None

    async def _before_answer(self) -> None:
        roomkey = self.offer.roomkey
        room = None if roomkey is UNSET else self.worker.rooms.get(roomkey)
        refusal = "invalid roomkey" if room is None else room.admit(self)
        if refusal is not None:
            log.info("channel %d: agent refused: %s", self.channel, refusal)
            self._apply(Event.ROOM_REFUSED, release=Release(p.CAUSE_CALL_REJECTED, refusal))
            return
        self.room = room
        self._apply(Event.VERIFY_OK)
        self.send(p.Alert(dialogid=self.dialogid, ref=self.ref, channel=self.channel))

    def _after_connected(self) -> None:
        if self.room is not None:
            self.room.agent_connected(self)

    def _other_action(self, action: p.Action) -> None:
        if isinstance(action, p.PeerData) and self.room is not None:
            self.room.command(self, action)
        else:
            super()._other_action(action)

    def _on_released(self, release: Release) -> None:
        if self.room is not None:
            self.room.agent_left(self)
