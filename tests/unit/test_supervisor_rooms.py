"""Room state and degraded marks as the supervisor applies them from bus messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.edges import bus
from tests.unit.test_supervisor_booking import connect, frame, make_supervisor


def stats(index: int, lag_ms: float) -> bus.WorkerStats:
    return bus.WorkerStats(index, 1000 + index, 0, 0, 0, lag_ms, lag_ms, 0, 0, 0)


async def test_a_room_ends_with_its_user_calls_channel(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path)
    user, _ = connect(sup, "192.0.2.1")
    await sup.handle_frame(user, frame(1, suid="customer"))
    (start,) = router.starts()
    await sup._dispatch(bus.RoomOpened(start.channel, 555))
    agent, agent_sink = connect(sup, "192.0.2.2")
    await sup.handle_frame(agent, frame(2, module="Agent", roomkey=555))
    assert agent_sink.releases() == [] and sup.rooms.has_agent(555)
    second, second_sink = connect(sup, "192.0.2.3")
    await sup.handle_frame(second, frame(3, module="Agent", roomkey=555))
    assert second_sink.releases() == [(21, "room already has an agent")]
    await sup._dispatch(bus.ChannelFreed(start.channel))
    assert sup.rooms.worker(555) is None and sup.rooms.has_agent(555)
    await sup._dispatch(bus.ChannelFreed(router.starts()[1].channel))
    assert len(sup.rooms) == 0


async def test_a_dead_workers_rooms_are_reported_and_left(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path)
    reported: list[tuple[int, int, str]] = []

    async def report_released(roomkey: int, cause: int, causestring: str) -> None:
        reported.append((roomkey, cause, causestring))

    sup._report_released = report_released  # type: ignore[method-assign]
    user, sink = connect(sup)
    await sup.handle_frame(user, frame(1, suid="customer"))
    (start,) = router.starts()
    await sup._dispatch(bus.RoomOpened(start.channel, 555))
    worker = sup.placement.worker_of(start.channel)
    assert worker is not None
    sup._on_worker_exit(worker, -9)
    assert len(sup.rooms) == 0 and sup.placement.busy_channels(worker) == []
    await asyncio.sleep(0)  # the releases run
    assert reported == [(555, 41, "media worker failed")]
    assert sink.releases() == [(41, "media worker failed")]
    assert not sup.calls and not user.calls and not sup.calls.suids


async def test_a_lagging_worker_is_marked_degraded_then_recovers(tmp_path: Path) -> None:
    sup, _ = make_supervisor(tmp_path, admin={"degraded_lag_ms": 50.0, "degraded_after": 0.0})
    await sup._dispatch(stats(1, 80.0))
    assert sup.placement.slots[1].degraded and not sup.placement.slots[0].degraded
    assert sup.health.status()["workers"][1]["degraded"] is True
    await sup._dispatch(stats(1, 10.0))
    assert not sup.placement.slots[1].degraded
