from supervisor.placement import Placement
from supervisor.rooms import RoomDirectory


def ready(workers: int, channels: int) -> Placement:
    placement = Placement(workers, channels)
    for i in range(workers):
        placement.set_ready(i, True)
    return placement


def test_slices_are_disjoint_and_start_at_one() -> None:
    placement = Placement(3, 4)
    assert [list(s.channels) for s in placement.slots] == [
        [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    ]
    assert placement.worker_of(0) is None
    assert [placement.worker_of(c) for c in (1, 4, 5, 12)] == [0, 0, 1, 2]
    assert placement.worker_of(13) is None


def test_new_calls_go_to_the_worker_with_most_free_channels() -> None:
    placement = ready(2, 3)
    got = [placement.allocate() for _ in range(6)]
    assert got == [1, 4, 2, 5, 3, 6]
    assert placement.allocate() is None
    placement.release(5)
    assert placement.allocate() == 5


def test_a_worker_that_is_not_ready_gets_no_calls() -> None:
    placement = ready(2, 2)
    placement.set_ready(0, False)
    assert [placement.allocate(), placement.allocate(), placement.allocate()] == [3, 4, None]


def test_a_degraded_worker_gets_no_new_calls() -> None:
    placement = ready(2, 2)
    placement.slots[1].degraded = True
    assert [placement.allocate(), placement.allocate(), placement.allocate()] == [1, 2, None]


def test_zero_channels_means_no_calls() -> None:
    placement = ready(2, 0)
    assert placement.allocate() is None
    assert placement.worker_of(1) is None


def test_rooms_follow_their_channel() -> None:
    placement = ready(2, 2)
    rooms = RoomDirectory(placement.worker_of)
    channel = placement.allocate()
    channel2 = placement.allocate()
    assert channel is not None and channel2 is not None
    rooms.open(123456789012, channel2)
    assert rooms.worker(123456789012) == 1
    assert placement.allocate(worker=1) == 4
    placement.release(channel2)
    rooms.free(channel2)
    assert rooms.worker(123456789012) is None
    assert placement.busy_channels(1) == [4]
