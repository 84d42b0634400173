"""The call registry: a call booked under its channel, its connection's key and its suid is
forgotten under all three at once."""

from __future__ import annotations

from supervisor.calls import CallRecord, CallRegistry


class Sink:
    async def send_frame(self, data: bytes) -> None:
        pass


def test_booking_and_freeing_cover_channel_key_and_suid() -> None:
    calls = CallRegistry()
    conn = calls.open_conn(Sink(), "192.0.2.10")
    calls.book(conn, CallRecord(conn.id, 7, 0, 1, 1, "suid-1"))
    assert 7 in calls and conn.calls == {(1, 1): 7} and calls.suid_live("suid-1")
    record = calls.free(7)
    assert record is not None and record.channel == 7
    assert len(calls) == 0 and not conn.calls and not calls.suids
    assert calls.free(7) is None  # a second ChannelFreed finds nothing


def test_an_old_channel_does_not_take_a_newer_call_of_the_same_key() -> None:
    calls = CallRegistry()
    conn = calls.open_conn(Sink(), "192.0.2.10")
    calls.book(conn, CallRecord(conn.id, 7, 0, 1, 1, None))
    conn.forget_call((1, 1))  # the browser released it; the worker frees 7 later
    calls.book(conn, CallRecord(conn.id, 8, 0, 1, 1, None))  # same dialogid+ref again
    calls.free(7)
    assert conn.calls == {(1, 1): 8}


def test_a_closed_connection_hands_its_channels_by_worker() -> None:
    calls = CallRegistry()
    conn = calls.open_conn(Sink(), "192.0.2.10")
    for channel, worker in ((3, 0), (12, 1), (4, 0)):
        calls.book(conn, CallRecord(conn.id, channel, worker, channel, 1, None))
    assert calls.close_conn(conn) == {0: [3, 4], 1: [12]}
    assert conn.closed and not conn.calls and calls.conn(conn.id) is None
    assert len(calls) == 3  # the calls live on until their workers free the channels
    assert [r.channel for r in calls.on_worker(0)] == [3, 4]
