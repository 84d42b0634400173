"""Admission control for browser offers (sans-IO: no sockets, the clock is passed in).

The appliance sits on a public address, so one client must not be able to take every
channel, hold every AP-S verify slot, or guess roomkeys at line rate:

- `Admission` counts the calls each connection and each source address holds, in setup
  (booked, DTLS not yet up: this is also what bounds AP-S verifies in flight) and in total,
  and says why an offer is refused before a channel is booked.
- `RoomkeyGuard` throttles wrong roomkeys (and refused agent tokens) per connection and
  per address with a token bucket; a client that runs its bucket dry is refused every
  Agent offer for a cool-down, so the roomkey space cannot be searched.

The supervisor does the I/O: it asks before booking and tells `Admission` when a call's
setup ends (`bus.CallConnected`) and when its channel is freed.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from appliance.core.netaddr import normal_ip
from appliance.core.throttle import TokenBucket

# Q.850 42 "switching equipment congestion": the box has room, this client is over its share.
CAUSE_CONGESTION = 42

SETUP_PER_CONNECTION = "too many calls in setup from this connection"
SETUP_PER_ADDRESS = "too many calls in setup from your address"
SETUP_TOTAL = "too many calls in setup, try again shortly"
CALLS_PER_CONNECTION = "too many calls from this connection"
CALLS_PER_ADDRESS = "too many calls from your address"
TOO_MANY_ROOMKEYS = "too many invalid roomkeys, try later"


def address_key(peer: str) -> str:
    """The unit a per-address limit counts: the IPv4 address, or the IPv6 /64 (one host
    gets a whole /64, so counting single IPv6 addresses would limit nothing)."""
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer  # not an address (a Unix socket, a test): counted as given
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return normal_ip(str(ip))


@dataclass(frozen=True)
class Limits:
    """0 means no limit (an operator's choice, e.g. every agent behind one NAT address)."""

    setup_per_connection: int = 8
    setup_per_address: int = 16
    setup_total: int = 32
    calls_per_connection: int = 50
    calls_per_address: int = 50


@dataclass(frozen=True)
class _Booking:
    conn: int
    address: str
    counts_in_total: bool  # User calls; an Agent leg needs a live room, one per room


@dataclass
class Admission:
    limits: Limits
    _bookings: dict[int, _Booking] = field(default_factory=dict)  # channel -> booking
    _in_setup: set[int] = field(default_factory=set)  # channels whose DTLS is not up yet
    _setup_conn: Counter[int] = field(default_factory=Counter)
    _setup_addr: Counter[str] = field(default_factory=Counter)
    _calls_conn: Counter[int] = field(default_factory=Counter)
    _calls_addr: Counter[str] = field(default_factory=Counter)

    def refusal(self, conn: int, address: str, module: str) -> str | None:
        """None if an offer from `conn` at `address` may book a channel, else the
        causestring of its release (cause `CAUSE_CONGESTION`)."""
        lim = self.limits
        if _over(self._setup_conn[conn], lim.setup_per_connection):
            return SETUP_PER_CONNECTION
        if _over(self._setup_addr[address], lim.setup_per_address):
            return SETUP_PER_ADDRESS
        if _over(len(self._in_setup), lim.setup_total):
            return SETUP_TOTAL
        if module != "Agent":
            if _over(self._calls_conn[conn], lim.calls_per_connection):
                return CALLS_PER_CONNECTION
            if _over(self._calls_addr[address], lim.calls_per_address):
                return CALLS_PER_ADDRESS
        return None

    def booked(self, channel: int, conn: int, address: str, module: str) -> None:
        self.freed(channel)  # a channel is booked once; stale state must not double-count
        booking = _Booking(conn, address, module != "Agent")
        self._bookings[channel] = booking
        self._in_setup.add(channel)
        self._setup_conn[conn] += 1
        self._setup_addr[address] += 1
        if booking.counts_in_total:
            self._calls_conn[conn] += 1
            self._calls_addr[address] += 1

    def connected(self, channel: int) -> None:
        """The call's setup is over (DTLS up): it no longer counts as in setup."""
        booking = self._bookings.get(channel)
        if booking is None or channel not in self._in_setup:
            return
        self._in_setup.discard(channel)
        _decrement(self._setup_conn, booking.conn)
        _decrement(self._setup_addr, booking.address)

    def freed(self, channel: int) -> None:
        self.connected(channel)
        booking = self._bookings.pop(channel, None)
        if booking is not None and booking.counts_in_total:
            _decrement(self._calls_conn, booking.conn)
            _decrement(self._calls_addr, booking.address)

    @property
    def in_setup(self) -> int:
        return len(self._in_setup)

    def setup_of(self, conn: int) -> int:
        return self._setup_conn[conn]


def _over(count: int, limit: int) -> bool:
    return limit > 0 and count >= limit


def _decrement(counter: Counter[int] | Counter[str], key: int | str) -> None:
    counter[key] -= 1  # type: ignore[index]
    if counter[key] <= 0:  # type: ignore[index]
        del counter[key]  # type: ignore[arg-type]


@dataclass
class _Suspect:
    bucket: TokenBucket
    last_wrong: float
    blocked_until: float = 0.0


class RoomkeyGuard:
    """Wrong roomkeys (and refused agent tokens), counted per key: a connection and an
    address. `per_minute` wrong attempts are allowed (as a burst, refilled evenly); the
    attempt that finds the bucket empty blocks the key for `cooldown` seconds, during which
    every Agent offer from it is refused unseen. At most `max_tracked` keys are remembered:
    clean ones are forgotten first, so many addresses cannot grow memory without bound."""

    def __init__(self, per_minute: int, cooldown: float, max_tracked: int = 10000) -> None:
        self.per_minute = per_minute
        self.cooldown = cooldown
        self.max_tracked = max_tracked
        self._suspects: dict[str, _Suspect] = {}

    def blocked(self, keys: Iterable[str], now: float) -> bool:
        return any((s := self._suspects.get(k)) is not None and s.blocked_until > now
                   for k in keys)

    def wrong(self, keys: Iterable[str], now: float) -> bool:
        """Count one wrong attempt against each key; True if that blocked any of them."""
        blocked = False
        for key in keys:
            suspect = self._suspects.get(key)
            if suspect is None:
                self._make_room(now)
                suspect = _Suspect(TokenBucket(self.per_minute / 60.0, self.per_minute), now)
                self._suspects[key] = suspect
            suspect.last_wrong = now
            if not suspect.bucket.take(now):
                suspect.blocked_until = now + self.cooldown
                blocked = True
        return blocked

    def forget(self, key: str) -> None:
        self._suspects.pop(key, None)

    def _make_room(self, now: float) -> None:
        if len(self._suspects) < self.max_tracked:
            return
        # A bucket refills completely within a minute of its last wrong attempt.
        for key in [k for k, s in self._suspects.items()
                    if s.blocked_until <= now and now - s.last_wrong >= 60.0]:
            del self._suspects[key]
        # Still full: drop the oldest keys not in a cool-down, and blocked ones only last.
        unblocked = (k for k, s in list(self._suspects.items()) if s.blocked_until <= now)
        for key in unblocked:
            if len(self._suspects) < self.max_tracked:
                return
            del self._suspects[key]
        while len(self._suspects) >= self.max_tracked:
            del self._suspects[next(iter(self._suspects))]

    def __len__(self) -> int:
        return len(self._suspects)


@dataclass
class AdmissionCounters:
    """What /status and /metrics show of refused offers (cumulative)."""

    refused: Counter[str] = field(default_factory=Counter)  # by causestring
    wrong_roomkeys: int = 0
    tokens_refused: int = 0
    roomkey_blocks: int = 0  # times a connection or address was put in the cool-down
    internal_errors: int = 0  # frames that hit a bug: answered with a release, logged
