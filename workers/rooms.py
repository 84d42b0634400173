"""The worker's registry of its own rooms, by roomkey: the one owner of that map.

A customer's call opens its room here once AP-S has verified it and closes it at its
teardown; an agent's leg and a duplicate-login notice find it here. The supervisor keeps
its own directory of every worker's rooms (for placing the agent's leg and refusing a
second agent); this one holds only this worker's, so a dead worker takes only its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.room import Room


class RoomRegistry:
    def __init__(self) -> None:
        self._rooms: dict[int, Room] = {}

    def open(self, room: Room) -> None:
        self._rooms[room.roomkey] = room

    def close(self, room: Room) -> None:
        """Forget `room`, unless its roomkey already names a newer one."""
        if self._rooms.get(room.roomkey) is room:
            del self._rooms[room.roomkey]

    def find_open(self, roomkey: int) -> Room | None:
        """The room of `roomkey` if its customer's call still goes on."""
        room = self._rooms.get(roomkey)
        return None if room is None or room.closed else room
