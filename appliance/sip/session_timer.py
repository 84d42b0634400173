"""RFC 4028 session timers for our side of a call to the desk phone, sans-IO.

Without them a dialog whose far end vanished (a PBX restart, a worker of ours killed) stays
up forever on the other side. With them one side, the *refresher*, re-sends the session
(re-INVITE or UPDATE) every half interval, and the other side ends the call with BYE when no
refresh came in time.

This object only keeps the negotiated interval and who refreshes, and says *when*: the call
(`call.py`) asks it for the headers of its requests and responses, feeds it every 2xx and
every refresh the peer sends, and acts on `handle_timer()`'s answer (REFRESH: send one;
EXPIRE: send BYE). Times are the caller's `now`, as everywhere in this package.

Rules kept here (RFC 4028 section numbers):
- our INVITE says `Supported: timer`, `Session-Expires: N`, `Min-SE: M` (§7.1) and leaves
  the choice of refresher to the answerer;
- 422 carries the peer's Min-SE: we retry with it, a bounded number of times (§7.3);
- a 2xx without Session-Expires means no session timer (§7.2); with one, its interval and
  `refresher=uac|uas` decide (uac is us, since we are the UAC of the INVITE);
- any successful refresh, whoever sent it, restarts the interval (§10);
- the refresher refreshes at half the interval (§10); the other side gives up at
  interval - min(32, interval/3) (§10) and so does a refresher whose refreshes fail;
- a refresh from the peer below our Min-SE gets 422 (§8.1); our answer carries
  Session-Expires with the refresher we agree to, and `Require: timer` when that is the
  peer (§9).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto

from .deadlines import due, earliest
from .message import SipParseError, SipRequest, SipResponse, parse_params, split_header_list

RFC_MIN_SE = 90  # §4: no interval below 90 s on the wire; lower ones are for tests only
MAX_INTERVAL = 86400  # a peer's Min-SE above a day is not a session timer we keep
MAX_422_RETRIES = 2
_DELTA_RE = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class TimerSettings:
    """What we ask for: `expires` seconds (0: no session timer), never below `min_se`."""

    expires: int = 1800
    min_se: int = RFC_MIN_SE


class TimerAction(Enum):
    REFRESH = auto()  # send a refresh (re-INVITE or UPDATE) now
    EXPIRE = auto()  # the session is over: send BYE


@dataclass(frozen=True)
class SessionExpires:
    delta: int
    refresher: str | None  # "uac", "uas", or None when the parameter is absent


def parse_session_expires(message: SipRequest | SipResponse) -> SessionExpires | None:
    """The Session-Expires header (compact `x` too: Headers stores the long name); None when
    absent or unreadable."""
    value = message.headers.get("Session-Expires")
    if value is None:
        return None
    delta, _, params = value.partition(";")
    delta = delta.strip(" \t")
    if not _DELTA_RE.fullmatch(delta):
        return None
    try:
        refresher = parse_params(params).get("refresher")
    except SipParseError:
        refresher = None
    refresher = refresher.lower() if refresher else None
    return SessionExpires(int(delta), refresher if refresher in ("uac", "uas") else None)


def _min_se(message: SipRequest | SipResponse) -> int | None:
    value = (message.headers.get("Min-SE") or "").partition(";")[0].strip(" \t")
    return int(value) if _DELTA_RE.fullmatch(value) else None


def supports_timer(message: SipRequest | SipResponse) -> bool:
    options = [
        item.lower()
        for name in ("Supported", "Require")
        for value in message.headers.get_all(name)
        for item in split_header_list(value)
    ]
    return "timer" in options


class SessionTimer:
    def __init__(self, settings: TimerSettings | None = None) -> None:
        settings = settings or TimerSettings(expires=0)
        self.min_se = max(1, settings.min_se)
        self.expires = max(settings.expires, self.min_se) if settings.expires > 0 else 0
        self.interval: int | None = None  # negotiated; None: no session timer running
        self.we_refresh = False
        self._refresh_at: float | None = None
        self._expire_at: float | None = None
        self._422_retries = 0

    @property
    def enabled(self) -> bool:
        return self.expires > 0

    @property
    def active(self) -> bool:
        return self.interval is not None

    # -- our requests ----------------------------------------------------------------------

    def invite_headers(self) -> list[tuple[str, str]]:
        """For the initial INVITE: we support timers, this is the interval we want."""
        if not self.enabled:
            return []
        return [
            ("Supported", "timer"),
            ("Session-Expires", str(self.expires)),
            ("Min-SE", str(self.min_se)),
        ]

    def refresh_headers(self) -> list[tuple[str, str]]:
        """For our refresh: the running interval, and we stay the refresher (§7.4)."""
        interval = self.interval or self.expires
        return [
            ("Supported", "timer"),
            ("Session-Expires", f"{interval};refresher=uac"),
            ("Min-SE", str(self.min_se)),
        ]

    def on_422(self, response: SipResponse) -> bool:
        """422 Session Interval Too Small: True if we should retry with the larger interval
        (now in `expires`); False when the peer's Min-SE is unusable or we tried enough."""
        asked = _min_se(response)
        if (
            not self.enabled
            or asked is None
            or asked <= self.expires
            or asked > MAX_INTERVAL
            or self._422_retries >= MAX_422_RETRIES
        ):
            return False
        self._422_retries += 1
        self.expires = asked
        self.min_se = max(self.min_se, asked)
        if self.interval is not None:
            self.interval = asked
        return True

    def on_2xx(self, response: SipResponse, now: float) -> None:
        """A 2xx to our INVITE or to our refresh: it says whether a timer runs, and who
        refreshes (uac: us; a 2xx without the parameter is taken as us, the safe side)."""
        if not self.enabled:
            return
        se = parse_session_expires(response)
        if se is None or se.delta == 0:
            self.stop()
            return
        # Never faster than our own floor (nor slower than a day), whatever a peer answers.
        self._start(min(max(se.delta, self.min_se), MAX_INTERVAL), se.refresher != "uas", now)

    # -- the peer's requests ---------------------------------------------------------------

    def too_small(self, request: SipRequest) -> list[tuple[str, str]] | None:
        """The headers of a 422 for a refresh whose interval is below our Min-SE, else None."""
        se = parse_session_expires(request)
        if not self.enabled or se is None or se.delta >= self.min_se:
            return None
        return [("Min-SE", str(self.min_se))]

    def on_refresh_request(self, request: SipRequest, now: float) -> list[tuple[str, str]]:
        """The peer's re-INVITE or UPDATE we answer 2xx: restart the interval and return the
        headers for our 2xx (§9). Without Session-Expires but with timer support we keep a
        timer with us as refresher; without either, the peer wants no timer (§7.2, §9)."""
        if not self.enabled:
            return []
        se = parse_session_expires(request)
        if se is not None and se.delta > 0:
            # The request's UAC is the peer: refresher=uac (or absent: we let the one who
            # just refreshed keep doing it) means the peer refreshes.
            peer_refreshes = se.refresher != "uas"
            interval = min(max(se.delta, self.min_se), MAX_INTERVAL)
        elif supports_timer(request):
            peer_refreshes = False
            interval = self.interval or self.expires
        else:
            self.stop()
            return []
        self._start(interval, not peer_refreshes, now)
        refresher = "uac" if peer_refreshes else "uas"
        headers = [("Session-Expires", f"{interval};refresher={refresher}")]
        if peer_refreshes:
            headers.append(("Require", "timer"))
        return headers

    # -- time ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        return earliest(self._refresh_at, self._expire_at)

    def handle_timer(self, now: float) -> TimerAction | None:
        if due(self._refresh_at, now):
            self._refresh_at = None  # one refresh in flight; its 2xx restarts the interval
            return TimerAction.REFRESH
        if due(self._expire_at, now):
            self.stop()
            return TimerAction.EXPIRE
        return None

    def retry_refresh(self, now: float, delay: float) -> None:
        """Our refresh met glare (491): try again after `delay`, if still before expiry."""
        if self._expire_at is not None and now + delay < self._expire_at:
            self._refresh_at = now + delay

    def stop(self) -> None:
        self.interval = None
        self._refresh_at = None
        self._expire_at = None

    def _start(self, interval: int, we_refresh: bool, now: float) -> None:
        self.interval = interval
        self.we_refresh = we_refresh
        self._refresh_at = now + interval / 2 if we_refresh else None
        self._expire_at = now + interval - min(32.0, interval / 3)
