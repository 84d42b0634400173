"""The browser connections and the calls they placed (bookkeeping, no I/O).

A placed call is known three ways: by its channel (the bus speaks channels), by its
connection's (dialogid, ref) (the browser speaks those), and by its suid (one live call per
suid). `CallRegistry.book` records all three and `CallRegistry.free` forgets all three, so
none can outlive the others.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Protocol

from supervisor.admission import address_key

CallKey = tuple[int, int]  # (dialogid, ref)


class FrameSink(Protocol):
    async def send_frame(self, data: bytes) -> None: ...


@dataclass
class ClientConn:
    """One browser/app WebSocket and the calls it placed."""

    id: int
    sink: FrameSink
    calls: dict[CallKey, int] = field(default_factory=dict)  # -> channel
    closed: bool = False
    peer: str = ""  # the client's address as the front saw it
    address: str = ""  # what per-address limits count (admission.address_key)

    @property
    def guard_keys(self) -> tuple[str, str]:
        """What wrong roomkeys are counted against: this connection and its address."""
        return (f"conn {self.id}", f"address {self.address}")

    def add_call(self, key: CallKey, channel: int) -> None:
        self.calls[key] = channel

    def forget_call(self, key: CallKey, channel: int | None = None) -> None:
        """The call `key` is over for this client. With `channel`, only if `key` is still
        the call on that channel: once the browser released a call it may place a new one
        under the same key, which the old channel's freeing must not take with it."""
        if channel is None or self.calls.get(key) == channel:
            self.calls.pop(key, None)


@dataclass
class CallRecord:
    conn: int
    channel: int
    worker: int
    dialogid: int
    ref: int
    suid: str | None
    module: str = "User"
    started: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> CallKey:
        return (self.dialogid, self.ref)


class CallRegistry:
    """Every open connection, every placed call by channel, and the suids those hold."""

    def __init__(self) -> None:
        self._conns: dict[int, ClientConn] = {}
        self.suids: dict[str, int] = {}  # suid -> channel
        self._records: dict[int, CallRecord] = {}  # channel -> record
        self._conn_ids = itertools.count(1)

    # -- connections ---------------------------------------------------------------------

    def open_conn(self, sink: FrameSink, peer: str) -> ClientConn:
        conn = ClientConn(next(self._conn_ids), sink, peer=peer, address=address_key(peer))
        self._conns[conn.id] = conn
        return conn

    def close_conn(self, conn: ClientConn) -> dict[int, list[int]]:
        """Forget `conn` and its calls' keys. Returns its live channels by worker: those
        calls go on until their workers end them and free the channels."""
        conn.closed = True
        self._conns.pop(conn.id, None)
        by_worker: dict[int, list[int]] = {}
        for channel in conn.calls.values():
            record = self._records.get(channel)
            if record is not None:
                by_worker.setdefault(record.worker, []).append(channel)
        conn.calls.clear()
        return by_worker

    def conn(self, conn_id: int) -> ClientConn | None:
        """The open connection `conn_id`: None once it closed (its calls may live on)."""
        return self._conns.get(conn_id)

    # -- calls ---------------------------------------------------------------------------

    def book(self, conn: ClientConn, record: CallRecord) -> None:
        self._records[record.channel] = record
        conn.add_call(record.key, record.channel)
        if record.suid is not None:
            self.suids[record.suid] = record.channel

    def free(self, channel: int) -> CallRecord | None:
        """Forget the call on `channel` everywhere it is known; its record, if it had one."""
        record = self._records.pop(channel, None)
        if record is None:
            return None
        if record.suid is not None and self.suids.get(record.suid) == channel:
            del self.suids[record.suid]
        conn = self._conns.get(record.conn)
        if conn is not None:
            conn.forget_call(record.key, channel)
        return record

    def get(self, channel: int) -> CallRecord | None:
        return self._records.get(channel)

    def suid_live(self, suid: str) -> bool:
        return suid in self.suids

    def on_worker(self, index: int) -> list[CallRecord]:
        return [r for r in self._records.values() if r.worker == index]

    def records(self) -> list[CallRecord]:
        return list(self._records.values())

    def __contains__(self, channel: object) -> bool:
        return channel in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"CallRegistry({self._records!r}, suids={self.suids!r})"
