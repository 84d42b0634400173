"""The room directory: per roomkey, the User call's channel and its agent leg's channel."""

from __future__ import annotations

from supervisor.rooms import RoomDirectory

ROOMKEY = 123456789012


def directory() -> RoomDirectory:
    return RoomDirectory(lambda channel: (channel - 1) // 10)  # 10 channels per worker


def test_an_open_room_is_found_on_its_user_calls_worker() -> None:
    rooms = directory()
    assert rooms.worker(ROOMKEY) is None and not rooms.has_agent(ROOMKEY)
    rooms.open(ROOMKEY, 13)
    assert (rooms.user_channel(ROOMKEY), rooms.worker(ROOMKEY)) == (13, 1)
    assert rooms.roomkey_of(13) == ROOMKEY and rooms.roomkey_of(14) is None


def test_a_room_has_one_agent_until_the_agents_channel_is_freed() -> None:
    rooms = directory()
    rooms.open(ROOMKEY, 13)
    rooms.join(ROOMKEY, 14)
    assert rooms.has_agent(ROOMKEY)
    assert rooms.roomkey_of(14) is None  # an agent leg is not the room's User call
    rooms.free(14)
    assert not rooms.has_agent(ROOMKEY) and rooms.worker(ROOMKEY) == 1


def test_each_side_lives_as_long_as_its_channel() -> None:
    rooms = directory()
    rooms.open(ROOMKEY, 13)
    rooms.join(ROOMKEY, 14)
    rooms.free(13)  # the User call ended: no agent can find the room any more
    assert rooms.worker(ROOMKEY) is None and rooms.has_agent(ROOMKEY) and len(rooms) == 1
    rooms.free(14)
    assert not rooms.has_agent(ROOMKEY) and len(rooms) == 0


def test_freeing_another_channel_leaves_the_room_alone() -> None:
    rooms = directory()
    rooms.open(ROOMKEY, 13)
    rooms.open(ROOMKEY, 15)  # opened again: the newer User call holds it
    rooms.free(13)
    assert rooms.user_channel(ROOMKEY) == 15
    rooms.free(15)
    assert len(rooms) == 0
