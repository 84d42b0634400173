"""Admission rules, sans-IO: shares of the box per client, the wrong-roomkey throttle, the
log budget (the clock is a number passed in)."""

from __future__ import annotations

from appliance.core.throttle import LogBudget
from supervisor.admission import (
    CALLS_PER_ADDRESS,
    CALLS_PER_CONNECTION,
    SETUP_PER_ADDRESS,
    SETUP_PER_CONNECTION,
    SETUP_TOTAL,
    Admission,
    Limits,
    RoomkeyGuard,
    address_key,
)


def book_until_refused(adm: Admission, conn: int, address: str, first_channel: int,
                       module: str = "User", tries: int = 200) -> tuple[list[int], str | None]:
    booked: list[int] = []
    for channel in range(first_channel, first_channel + tries):
        refusal = adm.refusal(conn, address, module)
        if refusal is not None:
            return booked, refusal
        adm.booked(channel, conn, address, module)
        booked.append(channel)
    return booked, None


def test_a_burst_from_one_connection_takes_only_its_setup_share() -> None:
    adm = Admission(Limits(setup_per_connection=4, setup_per_address=6, setup_total=10))
    booked, refusal = book_until_refused(adm, conn=1, address="198.51.100.7", first_channel=1)
    assert (len(booked), refusal) == (4, SETUP_PER_CONNECTION)
    # A second connection from the same address gets what is left of the address's share.
    booked2, refusal2 = book_until_refused(adm, conn=2, address="198.51.100.7",
                                           first_channel=100)
    assert (len(booked2), refusal2) == (2, SETUP_PER_ADDRESS)
    # Another caller is not starved by either.
    assert adm.refusal(3, "203.0.113.9", "User") is None


def test_setup_ends_at_connect_or_free_and_the_share_comes_back() -> None:
    adm = Admission(Limits(setup_per_connection=2, setup_per_address=0, setup_total=0,
                           calls_per_connection=3, calls_per_address=0))
    booked, _ = book_until_refused(adm, 1, "a", 1)
    assert booked == [1, 2] and adm.in_setup == 2
    adm.connected(1)
    adm.connected(1)  # twice is once
    assert adm.setup_of(1) == 1 and adm.refusal(1, "a", "User") is None
    adm.booked(3, 1, "a", "User")
    adm.connected(2)
    adm.connected(3)
    # Three connected calls: the connection's total share is used up, not its setup share.
    assert adm.in_setup == 0
    assert adm.refusal(1, "a", "User") == CALLS_PER_CONNECTION
    adm.freed(2)
    adm.freed(2)
    assert adm.refusal(1, "a", "User") is None
    for channel in (1, 3):
        adm.freed(channel)
    assert adm.in_setup == 0 and adm.refusal(1, "a", "User") is None


def test_the_box_wide_setup_bound_holds_across_clients() -> None:
    adm = Admission(Limits(setup_per_connection=0, setup_per_address=0, setup_total=3))
    for channel, conn in enumerate((1, 2, 3), start=1):
        assert adm.refusal(conn, f"10.0.0.{conn}", "User") is None
        adm.booked(channel, conn, f"10.0.0.{conn}", "User")
    assert adm.refusal(4, "10.0.0.4", "User") == SETUP_TOTAL
    adm.freed(2)  # a verify refused, a call released before DTLS: the slot is back
    assert adm.refusal(4, "10.0.0.4", "User") is None


def test_agent_legs_count_in_setup_but_not_in_the_call_share() -> None:
    adm = Admission(Limits(setup_per_connection=0, setup_per_address=0, setup_total=0,
                           calls_per_connection=0, calls_per_address=2))
    for channel in (1, 2):
        adm.booked(channel, channel, "call-centre-nat", "User")
        adm.connected(channel)
    assert adm.refusal(9, "call-centre-nat", "User") == CALLS_PER_ADDRESS
    # Each agent leg needs a live room, so agents behind one NAT address are not refused.
    assert adm.refusal(9, "call-centre-nat", "Agent") is None
    adm.booked(3, 9, "call-centre-nat", "Agent")
    adm.connected(3)
    adm.freed(1)
    assert adm.refusal(9, "call-centre-nat", "User") is None


def test_zero_means_no_limit() -> None:
    adm = Admission(Limits(0, 0, 0, 0, 0))
    booked, refusal = book_until_refused(adm, 1, "a", 1, tries=500)
    assert (len(booked), refusal) == (500, None)


def test_ipv6_clients_are_counted_per_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("") == ""


def test_wrong_roomkeys_are_throttled_then_refused_for_the_cooldown() -> None:
    guard = RoomkeyGuard(per_minute=5, cooldown=60.0)
    keys = ("conn 1", "address 198.51.100.7")
    now = 1000.0
    results = [guard.wrong(keys, now + i * 0.01) for i in range(6)]
    assert results == [False] * 5 + [True]  # the sixth wrong key in a burst blocks
    assert guard.blocked(keys, now + 1)
    # A new connection from the same address is still blocked; another address is not.
    assert guard.blocked(("conn 2", "address 198.51.100.7"), now + 1)
    assert not guard.blocked(("conn 3", "address 203.0.113.9"), now + 1)
    assert guard.blocked(keys, now + 59)
    assert not guard.blocked(keys, now + 61)


def test_a_few_wrong_roomkeys_a_minute_are_never_blocked() -> None:
    guard = RoomkeyGuard(per_minute=5, cooldown=60.0)
    keys = ("conn 1", "address a")
    # A typo every 15 s (4 a minute) for an hour: refill keeps up, no cool-down.
    assert not any(guard.wrong(keys, 15.0 * i) for i in range(240))
    assert not guard.blocked(keys, 3600.0)


def test_the_guard_forgets_clean_keys_first_and_stays_bounded() -> None:
    guard = RoomkeyGuard(per_minute=1, cooldown=3600.0, max_tracked=10)
    guard.wrong(("address blocked",), 0.0)
    guard.wrong(("address blocked",), 0.0)
    assert guard.blocked(("address blocked",), 1.0)
    for i in range(1000):  # a spray from many addresses, one wrong key each
        guard.wrong((f"address {i}",), 100.0 + i)
    assert len(guard) <= 10
    # The blocked key survived every address that was merely seen once.
    assert guard.blocked(("address blocked",), 1100.0)
    guard.forget("address blocked")
    assert not guard.blocked(("address blocked",), 1100.0)


def test_log_budget_counts_what_it_does_not_log() -> None:
    budget = LogBudget(lines=3, interval=10.0)
    allowed = [budget.allow(float(i) / 100) for i in range(50)]
    assert [a for a, _ in allowed].count(True) == 3
    assert budget.allow(10.5) == (True, 47)  # the next window says how many were dropped
    assert budget.allow(10.6) == (True, 0)
