"""The ICE-lite agent of one worker, sans-IO: it answers every call's connectivity checks on
the worker's one UDP and one TCP media port and says whose each datagram is.

A lite agent (RFC 8445 sections 2.5 and 6.1.1) sends no checks of its own: the browser,
a full agent, is controlling; we answer its Binding requests, learn its address from them
(peer-reflexive), take the pair it nominates, and watch that it keeps checking (consent
freshness, RFC 7675). `LiteAgent` owns that for every call ("session", keyed by our ufrag)
of a worker and demultiplexes what arrives: STUN by the USERNAME's ufrag, anything else
(DTLS, SRTP/SRTCP) by the path a session has validated. The edge (sockets, RFC 4571
deframing) passes in each datagram with its `Path` and `now`, sends the `reply` back on
the same path, hands `media` to the session's DTLS/SRTP, and asks `route()` where to send.
What a first byte says a datagram holds (RFC 7983) is `demux`'s, for UDP datagrams and
TCP frames alike.

Answers, in the order RFC 8489 sections 6.3 and 9.1.3 and RFC 8445 section 7.3 check:
- not STUN, a STUN response, a method other than Binding: dropped (counted). Binding
  indications (keepalives, RFC 8445 section 11) are ignored.
- no FINGERPRINT or a wrong one: silently discarded, not answered (RFC 8489 section 6.3:
  the ICE usage requires FINGERPRINT, RFC 8445 section 7; a message failing it is not STUN
  for us).
- no USERNAME or no MESSAGE-INTEGRITY: 400. A USERNAME that is not "<our ufrag>:<theirs>"
  for a live session (their ufrag checked once known), or a MESSAGE-INTEGRITY that our
  password does not verify: 401, unsigned (RFC 8489 section 9.1.3: the server MUST reject
  with 401; RFC 8445 section 7.3 adds no exception, so we do not drop silently). These
  unauthenticated answers go to whatever source address a datagram claims, so they share
  one token bucket: over its rate they are dropped and counted, never sent.
- authenticated but with an unknown comprehension-required attribute: 420 with
  UNKNOWN-ATTRIBUTES, signed (RFC 8489 section 6.3.1, after authentication as 6.3 orders).
- ICE-CONTROLLED: a role conflict. RFC 8445 section 7.3.1.1 lets a controlled agent either
  take the controlling role or answer 487; a lite agent cannot be controlling (it has no
  check list to nominate from, section 6.1.1), so it always answers 487, signed, and the
  full agent switches to controlling and checks again. ICE-CONTROLLING: no conflict.
- no PRIORITY (RFC 8445 section 7.1.1 makes it mandatory): 400, signed.
- otherwise a Binding success: XOR-MAPPED-ADDRESS = the source, MESSAGE-INTEGRITY with our
  password, FINGERPRINT; the path is validated for the session.

Routing: the first validated path is where `route()` sends until the browser nominates
(USE-CANDIDATE with ICE-CONTROLLING); from then on the latest nominated path. RFC 8445
section 8.1.1 has a controlling agent nominate once, but a browser that switches networks
nominates the new pair (Chrome's renomination, draft-thatcher-ice-renomination): a valid,
nominating check from a new address is the browser having moved, and we follow it, as
mediasoup's ICE-lite server does. A valid check that does not nominate never moves the
route.

Consent: the route's path must see a valid check at least every `consent_timeout` (30 s,
RFC 7675 section 5.1; browsers check about every 5 s); otherwise the session gets
`ConsentLost`, `route()` returns None, and the session answers and delivers nothing more
until the owner removes it. `next_deadline()` / `timer(now)` drive it.

Bounds: `max_sessions`; the checks per session we verify (`check_rate`/`check_burst`: the
ufrag is plaintext on the wire, so anyone on the path can name a live session and make us
compute its HMAC; over the rate they are dropped before the HMAC, unanswered and counted);
`max_paths` per session (a new path over it displaces only one with
no valid check for a whole consent window, else it is ignored and its checks unanswered); a
path belongs to one session (a valid check for another session from it is dropped: with a
spoofed UDP source, one caller's credentials must not take another caller's path); the
rate of unauthenticated answers. `counters` feed /metrics.
"""

from __future__ import annotations

import heapq
import itertools
import re
import secrets
import string
from dataclasses import dataclass, field, fields

from appliance.core.throttle import TokenBucket
from appliance.ice import stun
from appliance.ice.demux import GARBAGE, STUN, classify

# ("udp", remote ip, remote port) or ("tcp", remote ip, remote port, connection id): where
# a datagram came from, and where its session's packets go. The edge makes them; the agent
# reads the ip and port (for XOR-MAPPED-ADDRESS) and otherwise only compares them.
Path = tuple[str, str, int] | tuple[str, str, int, int]

CONSENT_TIMEOUT = 30.0  # RFC 7675 section 5.1
DEFAULT_MAX_SESSIONS = 1024
DEFAULT_MAX_PATHS = 8  # a browser's host, srflx and relay candidates, UDP and TCP, v4 and v6
# 400/401 answers per second (and burst): a browser whose session we removed learns it in
# one answer; a spoofed flood gets at most this many reflected.
UNAUTHENTICATED_RATE = 20.0
UNAUTHENTICATED_BURST = 40.0
# Checks per session per second whose MESSAGE-INTEGRITY we compute (and burst). A browser
# checks each candidate pair every 50 ms or so while connecting and then every few seconds;
# a few pairs at once stay far under this.
CHECK_RATE = 50.0
CHECK_BURST = 100.0

# RFC 8839 section 5.4: ice-char is ALPHA / DIGIT / "+" / "/"; ufrag 4..256, pwd 22..256.
_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")
_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")
# Ours use only letters and digits (a subset of ice-char that no SDP or log handling can
# trip on): 16 for the ufrag, ~95 bits (RFC 8445 section 5.3 asks >= 24), 32 for the pwd,
# ~190 bits (>= 128 asked).
_OUR_CHARS = string.ascii_letters + string.digits
UFRAG_LENGTH = 16
PWD_LENGTH = 32


class LiteError(ValueError):
    """A session the agent will not take: bad credentials, a duplicate ufrag, or full."""


@dataclass(frozen=True, slots=True)
class Credentials:
    ufrag: str
    pwd: str = field(repr=False)  # never in a log line


def new_credentials() -> Credentials:
    """Fresh random local credentials for one session (an answer's ice-ufrag/ice-pwd)."""
    def pick(n: int) -> str:
        return "".join(secrets.choice(_OUR_CHARS) for _ in range(n))
    return Credentials(pick(UFRAG_LENGTH), pick(PWD_LENGTH))


def valid_credentials(creds: Credentials) -> bool:
    """Whether both fit RFC 8839's ice-ufrag and ice-pwd grammar."""
    return bool(_UFRAG.fullmatch(creds.ufrag) and _PWD.fullmatch(creds.pwd))


def udp_path(ip: str, port: int) -> Path:
    return ("udp", ip, port)


def tcp_path(ip: str, port: int, connection: int) -> Path:
    return ("tcp", ip, port, connection)


@dataclass(frozen=True, slots=True)
class PathValidated:
    """The session's first valid check: `route()` returns this path from now."""
    session: str
    path: Path


@dataclass(frozen=True, slots=True)
class Nominated:
    """The browser's first nomination: `route()` returns this path from now (it may differ
    from the first validated one)."""
    session: str
    path: Path


@dataclass(frozen=True, slots=True)
class SelectedPathChanged:
    """`route()` moved after that: a nomination from another path (the browser moved), or,
    after the route's TCP connection closed (`forget_path`), the next valid check."""
    session: str
    path: Path
    previous: Path | None


@dataclass(frozen=True, slots=True)
class ConsentLost:
    """No valid check on the route for `consent_timeout`: release the call."""
    session: str
    path: Path | None


Event = PathValidated | Nominated | SelectedPathChanged | ConsentLost


@dataclass(frozen=True, slots=True)
class Received:
    """What to do with one datagram: `reply` goes back on the path it came from; `media`
    (DTLS or SRTP/SRTCP bytes) and `events` belong to `session`."""
    reply: bytes | None = None
    session: str | None = None
    media: bytes | None = None
    events: tuple[Event, ...] = ()


_NOTHING = Received()


@dataclass
class LiteCounters:
    checks: int = 0  # Binding requests that parsed
    valid_checks: int = 0  # answered with a success
    bad_integrity: int = 0  # MESSAGE-INTEGRITY our password does not verify (401)
    unknown_ufrag: int = 0  # no live session for the USERNAME, or their ufrag wrong (401)
    unknown_path_drops: int = 0  # DTLS/SRTP from a path no session validated
    consent_lost: int = 0
    malformed: int = 0  # STUN-range bytes that do not parse, or fail FINGERPRINT / 400s
    not_media: int = 0  # first byte neither STUN, DTLS nor RTP/RTCP (RFC 7983: dropped)
    other_stun: int = 0  # responses, and methods other than Binding
    indications: int = 0
    role_conflicts: int = 0  # 487 sent
    unknown_attributes: int = 0  # 420 sent
    answers_suppressed: int = 0  # 400/401 not sent: over the rate
    paths_ignored: int = 0  # a new path over max_paths
    path_conflicts: int = 0  # a valid check for one session from another's path
    late_checks: int = 0  # valid checks for a session whose consent was lost
    checks_over_rate: int = 0  # naming a live session, over its check_rate: not verified

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _Session:
    local: Credentials
    key: bytes  # the short-term key: our password (RFC 8489 section 9.1.1)
    remote: Credentials | None
    serial: int  # tells this session's deadline entries from a removed namesake's
    bucket: TokenBucket  # the checks of this session we verify
    paths: dict[Path, float] = field(default_factory=dict)  # -> time of its last valid check
    route: Path | None = None
    validated: bool = False
    nominated: bool = False
    consent_at: float = 0.0  # the last valid check on the route
    lost: bool = False


class LiteAgent:
    """ICE-lite for every call of one worker; see the module docstring."""

    def __init__(
        self, *, max_sessions: int = DEFAULT_MAX_SESSIONS, max_paths: int = DEFAULT_MAX_PATHS,
        consent_timeout: float = CONSENT_TIMEOUT,
        unauthenticated_rate: float = UNAUTHENTICATED_RATE,
        unauthenticated_burst: float = UNAUTHENTICATED_BURST,
        check_rate: float = CHECK_RATE, check_burst: float = CHECK_BURST,
    ) -> None:
        if max_sessions < 1 or max_paths < 1 or consent_timeout <= 0:
            raise ValueError("need max_sessions >= 1, max_paths >= 1, consent_timeout > 0")
        TokenBucket(check_rate, check_burst)  # refuses a bad rate now, not at a session
        self.check_rate = check_rate
        self.check_burst = check_burst
        self.max_sessions = max_sessions
        self.max_paths = max_paths
        self.consent_timeout = consent_timeout
        self.counters = LiteCounters()
        self._unauthenticated = TokenBucket(unauthenticated_rate, unauthenticated_burst)
        self._sessions: dict[str, _Session] = {}
        self._by_path: dict[Path, str] = {}
        # Consent deadlines: (when, serial, ufrag), at most one live entry per session, never
        # later than its real deadline (consent_at only grows); fixed up when it comes due.
        self._deadlines: list[tuple[float, int, str]] = []
        self._serials = itertools.count()

    # -- sessions -------------------------------------------------------------------------

    def register(self, local: Credentials, remote: Credentials | None = None) -> str:
        """Take a session's checks from now; returns its key, our ufrag."""
        if not valid_credentials(local):
            raise LiteError("local credentials are not ice-ufrag/ice-pwd")
        if remote is not None and not valid_credentials(remote):
            raise LiteError("the offer's ice-ufrag/ice-pwd are malformed")
        if local.ufrag in self._sessions:
            raise LiteError("a session with this ufrag exists")
        if len(self._sessions) >= self.max_sessions:
            raise LiteError(f"already {self.max_sessions} sessions")
        self._sessions[local.ufrag] = _Session(
            local, local.pwd.encode("ascii"), remote, next(self._serials),
            TokenBucket(self.check_rate, self.check_burst))
        return local.ufrag

    def set_remote(self, session: str, remote: Credentials) -> None:
        """The offer's credentials, when they come after `register`. A lite agent sends no
        checks, so their pwd signs nothing; their ufrag is checked in every USERNAME."""
        if not valid_credentials(remote):
            raise LiteError("the offer's ice-ufrag/ice-pwd are malformed")
        s = self._sessions.get(session)
        if s is not None:
            s.remote = remote

    def remove(self, session: str) -> None:
        """Forget a session and its paths (idempotent)."""
        s = self._sessions.pop(session, None)
        if s is None:
            return
        self._unbind_all(s)
        if len(self._deadlines) > 2 * len(self._sessions) + 64:
            # Removed sessions leave their entries behind; drop them before they pile up.
            self._deadlines = [e for e in self._deadlines if self._live(e)]
            heapq.heapify(self._deadlines)

    def route(self, session: str) -> Path | None:
        """Where the session's outgoing packets go now; None before a valid check, after
        consent is lost, and while its route's TCP connection is gone."""
        s = self._sessions.get(session)
        return None if s is None else s.route

    def forget_path(self, path: Path) -> None:
        """A TCP connection closed: its path carries nothing more. If it was a route, the
        session has none until its next valid check (and consent keeps counting)."""
        ufrag = self._by_path.pop(path, None)
        s = self._sessions.get(ufrag) if ufrag is not None else None
        if s is None:
            return
        s.paths.pop(path, None)
        if s.route == path:
            s.route = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    # -- datagrams ------------------------------------------------------------------------

    def receive(self, path: Path, data: bytes, now: float) -> Received:
        """One datagram (or one RFC 4571 frame) from `path`."""
        # demux's module constants, not FrameKind.X: on Python 3.11 each enum attribute
        # lookup costs ~80 ns, per datagram.
        kind = classify(data)
        if kind is STUN:
            return self._stun(path, data, now)
        if kind is GARBAGE:  # empty, or a range we do not speak
            self.counters.not_media += 1
            return _NOTHING
        ufrag = self._by_path.get(path)  # DTLS, SRTP/SRTCP
        if ufrag is None:
            self.counters.unknown_path_drops += 1
            return _NOTHING
        return Received(session=ufrag, media=data)

    def _stun(self, path: Path, data: bytes, now: float) -> Received:
        c = self.counters
        try:
            msg = stun.parse(data)
        except stun.StunError:
            c.malformed += 1
            return _NOTHING
        if msg.method != stun.BINDING:
            c.other_stun += 1
            return _NOTHING
        if msg.cls == stun.StunClass.INDICATION:
            c.indications += 1
            return _NOTHING
        if msg.cls != stun.StunClass.REQUEST:
            c.other_stun += 1  # we ask nothing, so no response is ours
            return _NOTHING
        c.checks += 1
        if not msg.check_fingerprint():
            c.malformed += 1
            return _NOTHING
        if msg.username is None or msg.integrity_offset is None:
            c.malformed += 1
            return self._unauthenticated_answer(msg, 400, "Bad Request", now)
        ours, colon, theirs = msg.username.partition(":")
        s = self._sessions.get(ours) if colon else None
        if s is None or (s.remote is not None and theirs != s.remote.ufrag):
            c.unknown_ufrag += 1
            return self._unauthenticated_answer(msg, 401, "Unauthenticated", now)
        if not s.bucket.take(now):
            # Before the HMAC: that is the cost a stranger who read the ufrag can make us pay.
            c.checks_over_rate += 1
            return _NOTHING
        if not msg.check_integrity(s.key):
            c.bad_integrity += 1
            return self._unauthenticated_answer(msg, 401, "Unauthenticated", now)
        # Authenticated from here: answers are signed with our password.
        if s.lost:
            c.late_checks += 1
            return _NOTHING
        if msg.unknown_required:
            c.unknown_attributes += 1
            return Received(reply=_error(msg, 420, "Unknown Attribute", s.key, [(
                stun.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes(msg.unknown_required))]))
        if msg.ice_controlled is not None:
            c.role_conflicts += 1
            return Received(reply=_error(msg, 487, "Role Conflict", s.key))
        if msg.priority is None:
            c.malformed += 1
            return Received(reply=_error(msg, 400, "Bad Request", s.key))
        owner = self._by_path.get(path)
        if owner is not None and owner != s.local.ufrag:
            c.path_conflicts += 1
            return _NOTHING
        if path not in s.paths and not self._admit(s, path, now):
            c.paths_ignored += 1
            return _NOTHING
        s.paths[path] = now
        self._by_path[path] = s.local.ufrag
        # USE-CANDIDATE counts only from the controlling side (RFC 8445 section 7.3.1.5).
        nominates = msg.use_candidate and msg.ice_controlling is not None
        events = self._validated(s, path, now, nominates)
        c.valid_checks += 1
        reply = stun.build(
            stun.BINDING, stun.StunClass.SUCCESS, msg.transaction_id,
            [(stun.XOR_MAPPED_ADDRESS, stun.encode_address(path[1], path[2], msg.transaction_id))],
            integrity_key=s.key)
        return Received(reply=reply, session=s.local.ufrag, events=events)

    def _unauthenticated_answer(self, msg: stun.Message, code: int, reason: str,
                                now: float) -> Received:
        if not self._unauthenticated.take(now):
            self.counters.answers_suppressed += 1
            return _NOTHING
        # Unsigned: we could not tell which key to sign with (RFC 8489 section 9.1.3).
        return Received(reply=_error(msg, code, reason, None))

    def _admit(self, s: _Session, path: Path, now: float) -> bool:
        """Room for one more path: under max_paths, or by displacing the path that has gone
        longest without a valid check, if that is a whole consent window (never the route)."""
        if len(s.paths) < self.max_paths:
            return True
        stale = min((p for p in s.paths if p != s.route), key=s.paths.__getitem__, default=None)
        if stale is None or now - s.paths[stale] < self.consent_timeout:
            return False
        del s.paths[stale]
        self._by_path.pop(stale, None)
        return True

    def _validated(self, s: _Session, path: Path, now: float,
                   nominates: bool) -> tuple[Event, ...]:
        ufrag = s.local.ufrag
        events: list[Event] = []
        if not s.validated:
            s.validated = True
            s.route, s.consent_at = path, now
            events.append(PathValidated(ufrag, path))
            heapq.heappush(self._deadlines, (now + self.consent_timeout, s.serial, ufrag))
        if nominates and not s.nominated:
            s.nominated = True
            s.route = path
            events.append(Nominated(ufrag, path))
        elif (nominates or s.route is None) and s.route != path:
            previous, s.route = s.route, path
            events.append(SelectedPathChanged(ufrag, path, previous))
        if s.route == path:
            s.consent_at = now
        return tuple(events)

    def _unbind_all(self, s: _Session) -> None:
        for path in s.paths:
            if self._by_path.get(path) == s.local.ufrag:
                del self._by_path[path]
        s.paths.clear()

    # -- consent timers -------------------------------------------------------------------

    def _live(self, entry: tuple[float, int, str]) -> bool:
        s = self._sessions.get(entry[2])
        return s is not None and s.serial == entry[1] and not s.lost

    def next_deadline(self) -> float | None:
        """When `timer` has work next (None: no session is validated and live)."""
        heap = self._deadlines
        while heap:
            when, serial, ufrag = heap[0]
            if not self._live(heap[0]):
                heapq.heappop(heap)
                continue
            real = self._sessions[ufrag].consent_at + self.consent_timeout
            if real > when:
                heapq.heapreplace(heap, (real, serial, ufrag))
                continue
            return when
        return None

    def timer(self, now: float) -> list[Event]:
        """Consent lost for every session whose route has had no valid check for
        `consent_timeout` by `now`."""
        heap = self._deadlines
        events: list[Event] = []
        while heap and heap[0][0] <= now:
            _, serial, ufrag = heap[0]
            if not self._live(heap[0]):
                heapq.heappop(heap)
                continue
            s = self._sessions[ufrag]
            real = s.consent_at + self.consent_timeout
            if real > now:
                heapq.heapreplace(heap, (real, serial, ufrag))
                continue
            heapq.heappop(heap)
            s.lost = True
            events.append(ConsentLost(ufrag, s.route))
            s.route = None
            self._unbind_all(s)
            self.counters.consent_lost += 1
        return events


def _error(msg: stun.Message, code: int, reason: str, key: bytes | None,
           extra: list[tuple[int, bytes]] | None = None) -> bytes:
    return stun.build(stun.BINDING, stun.StunClass.ERROR, msg.transaction_id,
                      [(stun.ERROR_CODE, stun.encode_error_code(code, reason)), *(extra or [])],
                      integrity_key=key)
