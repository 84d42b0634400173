"""The ICE servers handed to the pages and the SDK, with time-limited TURN credentials.

`[media] ice_servers` goes to every page (GET /ice-servers on the front, supervisor/front.py)
and to the SDK. An entry may name a `secret_file` instead of a fixed username/credential: it
is then a TURN server run with coturn's `use-auth-secret` + `static-auth-secret`, and each
client gets a credential of its own, made with the TURN REST convention
(draft-uberti-behave-turn-rest-00, section 2.2):

    username   = "<expiry>:<user id>"    expiry: Unix time (s) after which coturn refuses it
    credential = base64(HMAC-SHA1(secret, username))

coturn recomputes the credential from its own copy of the secret: nothing is shared at run
time and nothing is stored. It checks the expiry on every request that carries
MESSAGE-INTEGRITY, the allocation's Refresh requests included, so `ttl` must outlast the
longest call, not only its set-up: a credential that expires mid-call loses the relay at its
next refresh.

This module owns:
- the derivation (`rest_username`, `rest_credential`, `issue`, `make_user_id`);
- what an ICE server entry may be (`parse_url`, `check_server`, `check_config_entry`):
  STUN/TURN URIs (RFC 7064, RFC 7065) in the subset that browsers and aiortc both parse,
  since the workers hand the same list to aiortc, where a URI it cannot parse fails every
  call;
- `PageIceServers`: the list one client gets, with fresh credentials, and `SecretFile`, the
  shared secret read from its file (re-read when it changes: a rotation needs no restart);
- the JSON answer the front serves and the SDK reads (`encode_answer`, `parse_answer`). The
  pages check it by the same rules (supervisor/static/protocol-client.js,
  `parseIceServersAnswer`); tests/unit/test_turn_credentials.py holds the two together.

Secrets stay out of logs and files: errors name a field or a file, never a value, and a
derived credential exists only in the answer to the client that asked for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from appliance.core.token_file import TokenFileError, read_token

MAX_SERVERS = 8  # entries in [media] ice_servers and in an answer
MAX_URLS = 8  # URLs of one entry
MAX_URL_CHARS = 256
MAX_FIELD_CHARS = 256  # a username or a credential
MAX_USER_ID_CHARS = 64
MAX_PATH_CHARS = 4096
MIN_TTL_S = 60
MAX_TTL_S = 7 * 24 * 3600
DEFAULT_TTL_S = 24 * 3600  # what the REST draft recommends; longer than any call
MAX_ANSWER_BYTES = 16 * 1024  # 8 servers x 8 URLs of 256 characters fit with room to spare
SECRET_RECHECK_S = 10.0  # how often a secret file is looked at again (stat) at most

# RFC 7064/7065 URIs, narrowed to what aiortc's own regexes (rtcicetransport.STUN_REGEX,
# TURN_REGEX) parse to the same host, port and transport: no IPv6 literal (aiortc cannot
# parse "[...]"; use a DNS name), and only the two transports there are.
_URL = re.compile(
    r"(?P<scheme>stuns?|turns?):(?P<host>[A-Za-z0-9.-]{1,253})(?::(?P<port>[0-9]{1,5}))?"
    r"(?:\?transport=(?P<transport>udp|tcp))?"
)
_FIELD = re.compile(rf"[\x20-\x7e]{{1,{MAX_FIELD_CHARS}}}")  # printable ASCII
_USER_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_USER_ID_CHARS}}}")
_LABEL_DROP = re.compile(r"[^A-Za-z0-9._-]")
_NONCE = re.compile(r"[0-9a-f]{1,32}")


class IceServerError(ValueError):
    """An ICE server entry, URL, answer or secret that cannot be used (names the problem,
    never a secret)."""


@dataclass(frozen=True)
class IceUrl:
    scheme: str  # stun, stuns, turn, turns
    host: str
    port: int
    transport: str | None  # udp or tcp for turn(s); None for stun(s)


def parse_url(url: str) -> IceUrl:
    """A STUN or TURN URI, or IceServerError."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise IceServerError(f"an ICE server URL must be a string of at most {MAX_URL_CHARS}"
                             " characters")
    m = _URL.fullmatch(url)
    if m is None:
        raise IceServerError(f"not a stun:, stuns:, turn: or turns: URL: {url!r}")
    scheme, transport = m["scheme"], m["transport"]
    port = int(m["port"]) if m["port"] else (5349 if scheme in ("stuns", "turns") else 3478)
    if not 1 <= port <= 65535:
        raise IceServerError(f"port out of range in {url!r}")
    if scheme.startswith("stun"):
        if transport is not None:
            raise IceServerError(f"a STUN URL takes no transport (RFC 7064): {url!r}")
    elif scheme == "turns":
        if transport == "udp":
            raise IceServerError(f"turns: is TLS over TCP: {url!r}")
        transport = "tcp"
    else:
        transport = transport or "udp"
    return IceUrl(scheme, m["host"], port, transport)


def check_server(urls: Any, username: Any, credential: Any, *,
                 shared_secret: bool = False) -> tuple[str, ...]:
    """The entry's URLs, if browsers and aiortc both take the entry; else IceServerError.

    A TURN URL needs a username and a credential, or (shared_secret) neither: a browser's
    RTCPeerConnection throws on a TURN server without them, which would break the page."""
    url_list = [urls] if isinstance(urls, str) else urls
    if not isinstance(url_list, list) or not 1 <= len(url_list) <= MAX_URLS:
        raise IceServerError(f"urls must be a URL or a list of 1..{MAX_URLS} URLs")
    turn = any([parse_url(u).scheme.startswith("turn") for u in url_list])  # parse them all
    for name, value in (("username", username), ("credential", credential)):
        if value is not None and not (isinstance(value, str) and _FIELD.fullmatch(value)):
            raise IceServerError(
                f"{name} must be 1..{MAX_FIELD_CHARS} printable ASCII characters")
    if shared_secret:
        if username is not None or credential is not None:
            raise IceServerError("secret_file replaces username and credential: set one or "
                                 "the other")
        if not turn:
            raise IceServerError("secret_file is for a TURN server: no turn: or turns: URL")
    elif turn and (username is None or credential is None):
        raise IceServerError("a TURN server needs username and credential, or secret_file")
    return tuple(url_list)


def check_config_entry(urls: Any, username: Any, credential: Any, secret_file: str,
                       ttl: int) -> None:
    """A `[media] ice_servers` entry as config.load validates it (IceServerError if not)."""
    check_server(urls, username, credential, shared_secret=bool(secret_file))
    if len(secret_file) > MAX_PATH_CHARS or "\x00" in secret_file:
        raise IceServerError("secret_file is not a usable path")
    if not MIN_TTL_S <= ttl <= MAX_TTL_S:
        raise IceServerError(f"ttl must be {MIN_TTL_S}..{MAX_TTL_S} seconds (longer than "
                             "your longest call: coturn checks it at every refresh)")


# -- the TURN REST credential ------------------------------------------------------------


def rest_username(expiry: int, user_id: str) -> str:
    """"<expiry>:<user id>": what coturn's use-auth-secret takes apart again."""
    if not 0 <= expiry < 10**12:
        raise IceServerError("expiry out of range")
    if not _USER_ID.fullmatch(user_id):
        raise IceServerError(f"a user id is 1..{MAX_USER_ID_CHARS} of A-Z a-z 0-9 . _ -")
    return f"{expiry}:{user_id}"


def rest_credential(secret: bytes, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)), the password coturn expects for `username`."""
    if not secret:
        raise IceServerError("a TURN credential needs a non-empty secret")
    digest = hmac.new(secret, username.encode("ascii"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def issue(secret: bytes, user_id: str, now: float, ttl_s: int) -> tuple[str, str]:
    """(username, credential) valid from `now` (Unix time) for `ttl_s` seconds."""
    username = rest_username(int(now) + ttl_s, user_id)
    return username, rest_credential(secret, username)


def make_user_id(label: str, nonce: str) -> str:
    """The user id of one client's credential: the appliance's id (so that coturn's log says
    whose it is) and a random nonce (so that no two clients share a username, which coturn's
    user-quota counts by). Characters a username must not carry are dropped from the label."""
    if not _NONCE.fullmatch(nonce):
        raise IceServerError("a nonce is 1..32 lower-case hex digits")
    clean = _LABEL_DROP.sub("", label)[:MAX_USER_ID_CHARS - len(nonce) - 1]
    return f"{clean}.{nonce}" if clean else nonce


class SecretFile:
    """A shared secret kept in a file (mode 0600, one word: the value of coturn's
    static-auth-secret). Looked at again at most every `recheck_s` seconds and re-read when
    it changed, so that an operator rotates the secret without restarting; an unreadable
    file is an IceServerError naming the file (and is not retried before `recheck_s`)."""

    def __init__(self, path: Path, recheck_s: float = SECRET_RECHECK_S) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._secret: bytes | None = None
        self._error: str | None = None
        self._identity: tuple[int, int, int, int] | None = None  # what the file was
        self._checked_at: float | None = None

    def get(self, now: float) -> bytes:
        """The secret; `now` is any clock that only moves forward (for the re-check)."""
        if self._checked_at is None or not 0 <= now - self._checked_at < self.recheck_s:
            self._checked_at = now
            self._refresh()
        if self._secret is None:
            raise IceServerError(self._error or f"no secret in {self.path}")
        return self._secret

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._secret, self._identity = None, None
            self._error = f"cannot read the TURN secret file {self.path}: {exc.strerror}"
            return
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if identity == self._identity and self._secret is not None:
            return
        try:
            self._secret = read_token(self.path).encode("ascii")
        except TokenFileError as exc:
            self._secret, self._identity = None, None
            self._error = f"TURN secret: {exc}"
            return
        self._identity, self._error = identity, None


@dataclass(frozen=True)
class IceServerEntry:
    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None
    secret_file: str = ""
    ttl: int = DEFAULT_TTL_S


class PageIceServers:
    """The ICE servers one client (a page, an SDK call) gets: each entry as configured, an
    entry with a secret file with a credential made for this client only."""

    def __init__(self, entries: Sequence[IceServerEntry]) -> None:
        self.entries = tuple(entries)
        self._secrets = {e.secret_file: SecretFile(Path(e.secret_file))
                         for e in self.entries if e.secret_file}

    @classmethod
    def from_config(cls, servers: Sequence[Mapping[str, Any]]) -> PageIceServers:
        """From `Config.ice_servers()`, which config.load has validated."""
        entries = []
        for s in servers:
            urls = s["urls"]
            entries.append(IceServerEntry(
                urls=(urls,) if isinstance(urls, str) else tuple(urls),
                username=s.get("username"), credential=s.get("credential"),
                secret_file=s.get("secret_file") or "", ttl=int(s.get("ttl") or DEFAULT_TTL_S),
            ))
        return cls(entries)

    def for_client(self, now: float, user_id: str,
                   monotonic: float | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        """(the servers for one client, credentials valid `ttl` from `now` (Unix time); why
        entries were left out: a secret file that cannot be read). `monotonic` paces the
        secret files' re-checks (default: `now`)."""
        servers: list[dict[str, Any]] = []
        problems: list[str] = []
        for entry in self.entries:
            server: dict[str, Any] = {"urls": list(entry.urls)}
            if entry.secret_file:
                try:
                    secret = self._secrets[entry.secret_file].get(
                        now if monotonic is None else monotonic)
                except IceServerError as exc:
                    problems.append(str(exc))
                    continue
                server["username"], server["credential"] = issue(secret, user_id, now,
                                                                 entry.ttl)
            else:
                if entry.username is not None:
                    server["username"] = entry.username
                if entry.credential is not None:
                    server["credential"] = entry.credential
            servers.append(server)
        return servers, problems


# -- the answer of GET /ice-servers ------------------------------------------------------


class _AnswerServer(msgspec.Struct):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class _Answer(msgspec.Struct):
    iceServers: list[_AnswerServer]  # the RTCConfiguration member's name


def encode_answer(servers: Sequence[Mapping[str, Any]]) -> bytes:
    """The body of GET /ice-servers: {"iceServers": [...]}, an RTCConfiguration fragment."""
    return msgspec.json.encode({"iceServers": list(servers)})


def parse_answer(data: bytes | str) -> list[dict[str, Any]]:
    """The servers of an /ice-servers answer, each {"urls": [...], "username"?,
    "credential"?}, checked as the config checks an entry; IceServerError on anything else."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_ANSWER_BYTES:
        raise IceServerError(f"an ICE servers answer is at most {MAX_ANSWER_BYTES} bytes")
    try:
        answer = msgspec.json.decode(raw, type=_Answer)
    except (msgspec.MsgspecError, RecursionError, UnicodeError) as exc:
        raise IceServerError(f"not an ICE servers answer: {exc}") from None
    if len(answer.iceServers) > MAX_SERVERS:
        raise IceServerError(f"an ICE servers answer lists at most {MAX_SERVERS} servers")
    servers: list[dict[str, Any]] = []
    for s in answer.iceServers:
        server: dict[str, Any] = {"urls": list(check_server(s.urls, s.username, s.credential))}
        if s.username is not None:
            server["username"] = s.username
        if s.credential is not None:
            server["credential"] = s.credential
        servers.append(server)
    return servers
