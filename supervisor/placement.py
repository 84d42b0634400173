"""Channel numbers and call placement across workers (pure bookkeeping, no I/O).

Worker i owns channels i*C+1 .. (i+1)*C (channel 0 means "none" on the wire). A new User
call goes to the ready worker with the most free channels; an Agent leg goes to the worker
that holds its roomkey (`supervisor.rooms`), so both legs of a room share one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkerSlot:
    index: int
    channels: range
    free: set[int] = field(default_factory=set)
    ready: bool = False
    degraded: bool = False

    def __post_init__(self) -> None:
        self.free = set(self.channels)

    @property
    def accepting(self) -> bool:
        return self.ready and not self.degraded


class Placement:
    def __init__(self, workers: int, channels_per_worker: int) -> None:
        self.channels_per_worker = channels_per_worker
        self.slots = [
            WorkerSlot(i, range(i * channels_per_worker + 1, (i + 1) * channels_per_worker + 1))
            for i in range(workers)
        ]

    def worker_of(self, channel: int) -> int | None:
        if channel <= 0 or self.channels_per_worker == 0:
            return None
        index = (channel - 1) // self.channels_per_worker
        return index if index < len(self.slots) else None

    def allocate(self, worker: int | None = None) -> int | None:
        """Take a free channel (on `worker`, or on the least loaded ready one)."""
        if worker is None:
            candidates = [s for s in self.slots if s.accepting and s.free]
            if not candidates:
                return None
            # Most free channels first; the lower index breaks ties so placement is stable.
            slot = max(candidates, key=lambda s: (len(s.free), -s.index))
        else:
            slot = self.slots[worker]
            if not slot.ready or not slot.free:
                return None
        channel = min(slot.free)
        slot.free.discard(channel)
        return channel

    def release(self, channel: int) -> None:
        index = self.worker_of(channel)
        if index is None:
            return
        slot = self.slots[index]
        if channel in slot.channels:
            slot.free.add(channel)

    def busy_channels(self, worker: int) -> list[int]:
        slot = self.slots[worker]
        return sorted(set(slot.channels) - slot.free)

    def set_ready(self, worker: int, ready: bool) -> None:
        self.slots[worker].ready = ready

    def set_degraded(self, worker: int, degraded: bool) -> None:
        self.slots[worker].degraded = degraded

    def free_count(self, worker: int) -> int:
        return len(self.slots[worker].free)
