"""Which channels hold each room (sans-IO bookkeeping, no I/O).

A room is a customer's User call, opened under its roomkey once AP-S verified it
(`bus.RoomOpened`), and at most one agent leg joined to it. Everything the supervisor
decides about rooms reads here: the worker an Agent offer goes to, "room already has an
agent", the worker a duplicate-login notice goes to, and which of a dead worker's calls
are reported to AP-S as ended.

Each side of a room lives as long as its channel. When the User call's channel is freed,
no agent can find the room any more; when the agent's channel is freed, the room may take
another agent. The entry goes when neither side is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Room:
    user: int | None = None  # channel of the User call holding the room
    agent: int | None = None  # channel of the agent leg joined to it


class RoomDirectory:
    """Per roomkey, the User call's channel and the agent leg's channel."""

    def __init__(self, worker_of: Callable[[int], int | None]) -> None:
        self._worker_of = worker_of  # channel -> the worker that owns it (Placement)
        self._rooms: dict[int, _Room] = {}

    def open(self, roomkey: int, channel: int) -> None:
        """The User call on `channel` holds room `roomkey` from now on."""
        self._rooms.setdefault(roomkey, _Room()).user = channel

    def join(self, roomkey: int, channel: int) -> None:
        """The agent leg booked on `channel` is the room's agent."""
        self._rooms.setdefault(roomkey, _Room()).agent = channel

    def user_channel(self, roomkey: int) -> int | None:
        room = self._rooms.get(roomkey)
        return None if room is None else room.user

    def worker(self, roomkey: int) -> int | None:
        """The worker holding the room's User call: where its agent leg must go."""
        channel = self.user_channel(roomkey)
        return None if channel is None else self._worker_of(channel)

    def has_agent(self, roomkey: int) -> bool:
        room = self._rooms.get(roomkey)
        return room is not None and room.agent is not None

    def roomkey_of(self, user_channel: int) -> int | None:
        """The room the User call on `user_channel` holds, if it holds one."""
        return next((k for k, room in self._rooms.items() if room.user == user_channel), None)

    def free(self, channel: int) -> None:
        """`channel` was freed (its call ended, or its worker died): it leaves its room."""
        for roomkey, room in list(self._rooms.items()):
            if room.user == channel:
                room.user = None
            if room.agent == channel:
                room.agent = None
            if room.user is None and room.agent is None:
                del self._rooms[roomkey]

    def __len__(self) -> int:
        return len(self._rooms)
