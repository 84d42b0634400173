"""The reference AP-S: the customer's application server, as an aiohttp app over SQLite.

It verifies users and issues roomkeys (Flow 1 step 2), detects duplicate logins across
appliances (Flow 3) and records the call-detail reports the appliance sends (Flow 2).
The HTTP contract is documented for integrators in docs/aps-api.md.

Every endpoint wants ``Authorization: Bearer <API token>`` when the AP-S is given a token
(the command line always gives one: the token file next to the database, created 0600 on
first start). With an agent-token secret it also issues, with each roomkey, the token that
admits the agent's video leg (``appliance.core.agent_token``), and serves the agent's page link.

Run it with ``python -m reference_aps.server --port 8480 --db data/aps/aps.sqlite3``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs, quote, unquote

import msgspec
from aiohttp import web

from appliance.core import agent_token
from appliance.core.throttle import LogBudget
from appliance.core.token_file import TokenFileError, load_or_create_token
from reference_aps.store import IdentityBlocked, Store, VerifyOutcome, VerifyRequest

log = logging.getLogger("appliance.aps")

DEFAULT_DUPLICATE_MESSAGE = "重複登入: 您的帳號已在另一裝置登入"
# The notify message ends up as the value of a WebSocket `message` action on the other
# appliance, and the protocol caps every value at 128 bytes.
MAX_MESSAGE_BYTES = 128
MAX_CDR_LIMIT = 1000
DEFAULT_CDR_LIMIT = 50
DEFAULT_AGENT_TOKEN_TTL = 2 * 3600.0  # longer than a call; /agent-link issues a fresh one
DEFAULT_AGENT_PAGE_URL = "https://127.0.0.1:4433/AgentVideo.html"
TOKEN_FILE_NAME = "api-token"  # next to the database unless told otherwise
# Requests refused for a missing or wrong API token: one log line per window, then a count.
REFUSAL_LOG_INTERVAL = 10.0

# SQLite INTEGER is a signed 64-bit value; anything larger would fail at insert time.
UInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
ApplianceId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


# -- request bodies -------------------------------------------------------------------------


class VerifyBody(msgspec.Struct):
    appliance_id: ApplianceId
    channel: UInt
    dialogid: UInt
    ref: UInt
    userdata: str
    module: str
    caller: UInt | None = None
    callee: UInt | None = None
    suid: str | None = None


class CallEventBody(msgspec.Struct):
    appliance_id: ApplianceId
    roomkey: UInt
    event: Literal["answered", "released"]
    at: float
    cause: int | None = None
    causestring: str | None = None


class RecordFileBody(msgspec.Struct):
    appliance_id: ApplianceId
    roomkey: UInt
    record_file: Annotated[str, msgspec.Meta(min_length=1)]


class EndCallBody(msgspec.Struct):
    appliance_id: ApplianceId
    roomkey: UInt
    record_file: str = ""  # "" = the call was not recorded


# -- errors and responses -------------------------------------------------------------------


class ApiError(Exception):
    """A request the AP-S answers with ``{"result": "error", "reason": ...}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ensure_ascii=False: the duplicate-login message is Chinese, and an operator reading
# curl output should see it rather than \\u escapes.
_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class AgentLinks:
    """Where an agent's PC joins a call: the appliance's AgentVideo.html, and with a secret
    shared with the appliance ([aps] agent_token_secret_file) the token that admits it."""

    page_url: str = DEFAULT_AGENT_PAGE_URL
    secret: bytes | None = None
    ttl: float = DEFAULT_AGENT_TOKEN_TTL

    def token(self, roomkey: int, now: float) -> str | None:
        return None if self.secret is None else agent_token.issue(self.secret, roomkey, now,
                                                                  self.ttl)

    def url(self, roomkey: int, token: str | None) -> str:
        url = f"{self.page_url}?roomkey={roomkey}"
        return url if token is None else f"{url}&token={quote(token, safe='')}"


@dataclass(slots=True)
class _Guard:
    """The API token, and the count of requests refused for want of it."""

    token: str | None
    refused: int = 0
    _log: LogBudget = field(default_factory=lambda: LogBudget(1, REFUSAL_LOG_INTERVAL))

    def admits(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode())

    def note_refusal(self, line: str) -> None:
        """Anyone can send these at line rate: log the first, then a count per window."""
        self.refused += 1
        allowed, unlogged = self._log.allow(time.monotonic())
        if not allowed:
            return
        more = f" ({unlogged} more since the last such line)" if unlogged else ""
        log.warning("%s: refused, missing or wrong API token%s; %d refused in all", line,
                    more, self.refused)


OnVerified = Callable[[int, str], None]  # (roomkey, agent page URL) of a new call

STORE_KEY = web.AppKey("aps_store", Store)
MESSAGE_KEY = web.AppKey("aps_duplicate_message", str)
GUARD_KEY = web.AppKey("aps_guard", _Guard)
AGENT_KEY = web.AppKey("aps_agent_links", AgentLinks)
ON_VERIFIED_KEY = web.AppKey("aps_on_verified", list)
# What the handler did, appended to the one log line the middleware writes per request.
SUMMARY_KEY = web.RequestKey("aps_summary", str)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _error(status: int, reason: str) -> web.Response:
    return _json({"result": "error", "reason": reason}, status=status)


_Body = TypeVar("_Body")


async def _decode(request: web.Request, body_type: type[_Body]) -> _Body:
    raw = await request.read()
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc


# -- userdata -------------------------------------------------------------------------------


def parse_identity(userdata: str) -> str | None:
    """The user's identity (the ``id`` field) from the offer's userdata, or None.

    userdata is either JSON object text (``{"id":"A123456789",...}``), possibly
    URL-encoded as a whole, or a URL-encoded form (``id=A123456789&x=y``).
    """
    text = userdata.strip()
    if not text.startswith("{") and unquote(text).lstrip().startswith("{"):
        text = unquote(text).strip()
    if text.startswith("{"):
        return _identity_from_json(text)
    values = parse_qs(text, keep_blank_values=True).get("id")
    return _clean_identity(values[0]) if values else None


def _identity_from_json(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("id")
    # A numeric id is accepted (some apps send it unquoted); bool is an int subclass: no.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _clean_identity(value) if isinstance(value, str) else None


def _clean_identity(value: str) -> str | None:
    value = value.strip()
    return value or None


def mask_identity(identity: str) -> str:
    """Identity for log lines: national IDs are personal data, logs travel widely."""
    if len(identity) <= 5:
        return "*" * len(identity)
    return identity[:3] + "*" * (len(identity) - 5) + identity[-2:]


# -- handlers -------------------------------------------------------------------------------


async def handle_verify(request: web.Request) -> web.Response:
    body = await _decode(request, VerifyBody)
    call = f"{body.appliance_id} dialogid={body.dialogid} ref={body.ref}"
    identity = parse_identity(body.userdata)
    if identity is None:
        request[SUMMARY_KEY] = f"{call}: refused, userdata has no id"
        return _json({"result": "error", "reason": "userdata has no id"})
    store = request.app[STORE_KEY]
    req = VerifyRequest(
        appliance_id=body.appliance_id,
        channel=body.channel,
        dialogid=body.dialogid,
        ref=body.ref,
        caller=body.caller,
        callee=body.callee,
        identity=identity,
        module=body.module,
    )
    try:
        outcome = store.verify(req)
    except IdentityBlocked:
        request[SUMMARY_KEY] = f"{call} identity={mask_identity(identity)}: refused, blocked"
        return _json({"result": "error", "reason": "identity blocked"})
    request[SUMMARY_KEY] = f"{call} identity={mask_identity(identity)}: " + _describe(outcome)
    agent = request.app[AGENT_KEY]
    token = agent.token(outcome.roomkey, time.time())
    if outcome.created:
        for on_verified in request.app[ON_VERIFIED_KEY]:
            on_verified(outcome.roomkey, agent.url(outcome.roomkey, token))
    return _json(_verify_answer(outcome, request.app[MESSAGE_KEY], token))


def _verify_answer(outcome: VerifyOutcome, message: str, token: str | None) -> dict[str, Any]:
    answer: dict[str, Any] = {"result": "success", "roomkey": outcome.roomkey}
    if token is not None:
        # For the integrator's agent desktop; the appliance ignores it (it checks the
        # token the agent's page sends in its offer).
        answer["agent_token"] = token
    if outcome.duplicate is not None:
        answer["notify"] = {
            "ms": outcome.duplicate.appliance_id,
            "message": message,
            "roomkey": outcome.duplicate.roomkey,
        }
    return answer


def _describe(outcome: VerifyOutcome) -> str:
    text = f"roomkey {outcome.roomkey} ({'new' if outcome.created else 'retry, same roomkey'})"
    if outcome.duplicate is not None:
        dup = outcome.duplicate
        text += f", duplicate login: live on {dup.appliance_id} roomkey {dup.roomkey}"
    return text


async def handle_call_event(request: web.Request) -> web.Response:
    body = await _decode(request, CallEventBody)
    store = request.app[STORE_KEY]
    if body.event == "answered":
        found = store.answered(body.roomkey, body.at)
    else:
        found = store.released(body.roomkey, body.at, body.cause, body.causestring)
    request[SUMMARY_KEY] = f"{body.appliance_id} roomkey {body.roomkey}: {body.event}"
    if body.event == "released" and body.cause is not None:
        request[SUMMARY_KEY] += f" cause={body.cause} {body.causestring or ''}".rstrip()
    if not found:
        raise ApiError(404, "unknown roomkey")
    return _json({"result": "ok"})


async def handle_record_file(request: web.Request) -> web.Response:
    body = await _decode(request, RecordFileBody)
    found = request.app[STORE_KEY].set_record_file(body.roomkey, body.record_file)
    request[SUMMARY_KEY] = f"{body.appliance_id} roomkey {body.roomkey}: {body.record_file}"
    if not found:
        raise ApiError(404, "unknown roomkey")
    return _json({"result": "ok"})


async def handle_end_call(request: web.Request) -> web.Response:
    body = await _decode(request, EndCallBody)
    found = request.app[STORE_KEY].end_call(body.roomkey, body.record_file)
    recorded = body.record_file or "not recorded"
    request[SUMMARY_KEY] = f"{body.appliance_id} roomkey {body.roomkey}: ended, {recorded}"
    if not found:
        raise ApiError(404, "unknown roomkey")
    return _json({"result": "ok"})


async def handle_cdr(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    if "roomkey" in request.query:
        roomkey = _query_int(request, "roomkey", 0, 2**63 - 1)
        row = store.get_call(roomkey)
        calls = [] if row is None else [row]
    else:
        limit = _query_int(request, "limit", 1, MAX_CDR_LIMIT, DEFAULT_CDR_LIMIT)
        calls = store.recent_calls(limit)
    for row in calls:
        # National IDs are personal data; whoever reads call records needs no more than this.
        row["identity"] = mask_identity(row["identity"])
    request[SUMMARY_KEY] = f"{len(calls)} call(s)"
    return _json({"calls": calls})


async def handle_agent_link(request: web.Request) -> web.Response:
    """The agent's page link for a live call, with a fresh agent token when one is issued."""
    roomkey = _query_int(request, "roomkey", 0, 2**63 - 1)
    row = request.app[STORE_KEY].get_call(roomkey)
    if row is None:
        raise ApiError(404, "unknown roomkey")
    if not row["live"]:
        raise ApiError(410, "the call has ended")
    agent = request.app[AGENT_KEY]
    now = time.time()
    token = agent.token(roomkey, now)
    request[SUMMARY_KEY] = f"roomkey {roomkey}: agent link" + (" with token" if token else "")
    return _json({
        "roomkey": roomkey,
        "url": agent.url(roomkey, token),
        "token": token,
        "expires": None if token is None else int(now + agent.ttl),
    })


def _query_int(
    request: web.Request, name: str, low: int, high: int, default: int | None = None
) -> int:
    text = request.query.get(name)
    if text is None and default is not None:
        return default
    try:
        value = int(text or "")
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"query parameter {name} must be between {low} and {high}")
    return value


# -- app ------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _log_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One readable log line per request; ApiError and crashes become JSON answers."""
    started = time.perf_counter()
    guard = request.app[GUARD_KEY]
    if not guard.admits(request):
        guard.note_refusal(f"{request.remote} {request.method} {request.path}")
        response = _error(401, "missing or wrong API token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="aps"'
        return response
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _error(exc.status, exc.reason)
        summary = request.get(SUMMARY_KEY)
        request[SUMMARY_KEY] = f"{summary}: {exc.reason}" if summary else exc.reason
    except web.HTTPException as exc:  # 404 route, 405 method: aiohttp's own answers
        _log_line(request, exc.status, started)
        raise
    except Exception:
        # The appliance retries on 5xx, so say so plainly rather than dropping the line.
        log.exception("%s %s failed", request.method, request.path_qs)
        response = _error(500, "internal error")
    _log_line(request, response.status, started)
    return response


def _log_line(request: web.Request, status: int, started: float) -> None:
    elapsed_ms = (time.perf_counter() - started) * 1000
    summary = request.get(SUMMARY_KEY)
    line = f"{request.remote} {request.method} {request.path_qs} {status} {elapsed_ms:.1f}ms"
    log.info("%s%s", line, f" {summary}" if summary else "")


def build_app(
    db_path: str | Path,
    duplicate_message: str = DEFAULT_DUPLICATE_MESSAGE,
    *,
    api_token: str | None = None,
    agent: AgentLinks | None = None,
    on_verified: OnVerified | None = None,
) -> web.Application:
    """The AP-S application; opens (and creates) the SQLite database at db_path.

    api_token None leaves the API open: for tests on loopback only; the command line and
    the demo always set one.
    """
    if not duplicate_message or len(duplicate_message.encode()) > MAX_MESSAGE_BYTES:
        raise ValueError(f"duplicate_message must be 1..{MAX_MESSAGE_BYTES} UTF-8 bytes")
    if api_token is not None and not api_token:
        raise ValueError("api_token must not be empty")
    # Bodies are a few hundred bytes; refuse anything large before reading it.
    app = web.Application(middlewares=[_log_and_errors], client_max_size=64 * 1024)
    store = Store(db_path)
    app[STORE_KEY] = store
    app[MESSAGE_KEY] = duplicate_message
    app[GUARD_KEY] = _Guard(api_token)
    app[AGENT_KEY] = agent or AgentLinks()
    app[ON_VERIFIED_KEY] = [] if on_verified is None else [on_verified]
    app.router.add_post("/verify", handle_verify)
    app.router.add_post("/CallEvent", handle_call_event)
    app.router.add_post("/RecordFile", handle_record_file)
    app.router.add_post("/EndCall", handle_end_call)
    app.router.add_get("/cdr", handle_cdr)
    app.router.add_get("/agent-link", handle_agent_link)

    async def close_store(_: web.Application) -> None:
        store.close()

    app.on_cleanup.append(close_store)
    return app


async def serve(
    host: str,
    port: int,
    db_path: str | Path,
    duplicate_message: str = DEFAULT_DUPLICATE_MESSAGE,
    *,
    api_token: str | None = None,
    agent: AgentLinks | None = None,
    on_verified: OnVerified | None = None,
) -> web.AppRunner:
    """Start the AP-S; the caller owns the returned runner and must ``cleanup()`` it.

    port 0 picks a free port; read it from ``runner.addresses``.
    """
    app = build_app(db_path, duplicate_message, api_token=api_token, agent=agent,
                    on_verified=on_verified)
    # access_log=None: the middleware already writes one richer line per request.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    for address in runner.addresses:
        log.info("AP-S listening on %s, database %s, API token %s, agent tokens %s", address,
                 Path(db_path).resolve(), "required" if api_token else "NOT required",
                 "issued" if agent is not None and agent.secret else "not issued")
    if not _is_loopback(host):
        log.warning("AP-S listens on %s, not loopback: keep it on a private network "
                    "(the API token is all that guards the call records)", host or "*")
    return runner


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def default_token_file(db_path: str | Path) -> Path:
    """Where the API token lives unless told otherwise: next to the database."""
    return Path(db_path).resolve().parent / TOKEN_FILE_NAME


def run_forever(
    host: str,
    port: int,
    db_path: str | Path,
    *,
    token_file: str | Path | None = None,
    agent_secret_file: str | Path | None = None,
    agent_token_ttl: float = DEFAULT_AGENT_TOKEN_TTL,
    agent_page_url: str = DEFAULT_AGENT_PAGE_URL,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); for a command line.

    The API token is read from token_file (default: next to the database), which is
    created 0600 with a random token on first start; so is the agent secret file, if named.
    """
    token_path = Path(token_file) if token_file else default_token_file(db_path)
    try:
        api_token = load_or_create_token(token_path)
        secret = load_or_create_token(Path(agent_secret_file)).encode() if agent_secret_file \
            else None
    except TokenFileError as exc:
        raise SystemExit(f"AP-S: {exc}") from None
    log.info("AP-S API token in %s (send it as Authorization: Bearer)", token_path.resolve())
    agent = AgentLinks(page_url=agent_page_url, secret=secret, ttl=agent_token_ttl)

    async def main() -> None:
        stop = asyncio.Event()
        # SIGTERM is how a service manager stops us; end as cleanly as on Ctrl-C.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runner = await serve(host, port, db_path, api_token=api_token, agent=agent)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        log.info("AP-S stopped")

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log.info("AP-S stopped")


def _main() -> None:
    parser = argparse.ArgumentParser(description="reference AP-S (customer application server)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8480)
    parser.add_argument("--db", default="data/aps/aps.sqlite3", help="SQLite file")
    add_security_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_forever(args.host, args.port, args.db, **security_options(args))


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The API token and agent-token options, shared with `appliance aps`."""
    parser.add_argument("--token-file", default=None,
                        help=f"API bearer token file (default: {TOKEN_FILE_NAME} next to --db; "
                             "created 0600 if absent)")
    parser.add_argument("--agent-secret-file", default=None,
                        help="secret shared with the appliance's [aps] agent_token_secret_file; "
                             "given: verify answers carry an agent_token (created if absent)")
    parser.add_argument("--agent-token-ttl", type=float, default=DEFAULT_AGENT_TOKEN_TTL,
                        help="seconds an agent token stays valid (default 7200)")
    parser.add_argument("--agent-page-url", default=DEFAULT_AGENT_PAGE_URL,
                        help="the appliance's AgentVideo.html URL, for /agent-link")


def security_options(args: argparse.Namespace) -> dict[str, Any]:
    if not 0 < args.agent_token_ttl <= agent_token.MAX_LIFETIME_S:
        raise SystemExit(f"--agent-token-ttl must be in 1..{agent_token.MAX_LIFETIME_S} s")
    return {"token_file": args.token_file, "agent_secret_file": args.agent_secret_file,
            "agent_token_ttl": args.agent_token_ttl, "agent_page_url": args.agent_page_url}


if __name__ == "__main__":
    _main()
