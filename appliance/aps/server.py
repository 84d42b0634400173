"""The reference AP-S: the customer's application server, as an aiohttp app over SQLite.

It verifies users and issues roomkeys (Flow 1 step 2), detects duplicate logins across
appliances (Flow 3) and records the call-detail reports the appliance sends (Flow 2).
The HTTP contract is documented for integrators in docs/aps-api.md.

Run it with ``python -m appliance.aps.server --port 8480 --db data/aps/aps.sqlite3``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs, unquote

import msgspec
from aiohttp import web

from appliance.aps.store import IdentityBlocked, Store, VerifyOutcome, VerifyRequest

log = logging.getLogger("appliance.aps")

DEFAULT_DUPLICATE_MESSAGE = "重複登入: 您的帳號已在另一裝置登入"
# The notify message ends up as the value of a WebSocket `message` action on the other
# appliance, and the protocol caps every value at 128 bytes.
MAX_MESSAGE_BYTES = 128
MAX_CDR_LIMIT = 1000
DEFAULT_CDR_LIMIT = 50

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

STORE_KEY = web.AppKey("aps_store", Store)
MESSAGE_KEY = web.AppKey("aps_duplicate_message", str)
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
    return _json(_verify_answer(outcome, request.app[MESSAGE_KEY]))


def _verify_answer(outcome: VerifyOutcome, message: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"result": "success", "roomkey": outcome.roomkey}
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
    request[SUMMARY_KEY] = f"{len(calls)} call(s)"
    return _json({"calls": calls})


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
    db_path: str | Path, duplicate_message: str = DEFAULT_DUPLICATE_MESSAGE
) -> web.Application:
    """The AP-S application; opens (and creates) the SQLite database at db_path."""
    if not duplicate_message or len(duplicate_message.encode()) > MAX_MESSAGE_BYTES:
        raise ValueError(f"duplicate_message must be 1..{MAX_MESSAGE_BYTES} UTF-8 bytes")
    # Bodies are a few hundred bytes; refuse anything large before reading it.
    app = web.Application(middlewares=[_log_and_errors], client_max_size=64 * 1024)
    store = Store(db_path)
    app[STORE_KEY] = store
    app[MESSAGE_KEY] = duplicate_message
    app.router.add_post("/verify", handle_verify)
    app.router.add_post("/CallEvent", handle_call_event)
    app.router.add_post("/RecordFile", handle_record_file)
    app.router.add_post("/EndCall", handle_end_call)
    app.router.add_get("/cdr", handle_cdr)

    async def close_store(_: web.Application) -> None:
        store.close()

    app.on_cleanup.append(close_store)
    return app


async def serve(
    host: str,
    port: int,
    db_path: str | Path,
    duplicate_message: str = DEFAULT_DUPLICATE_MESSAGE,
) -> web.AppRunner:
    """Start the AP-S; the caller owns the returned runner and must ``cleanup()`` it.

    port 0 picks a free port; read it from ``runner.addresses``.
    """
    app = build_app(db_path, duplicate_message)
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
        log.info("AP-S listening on %s, database %s", address, Path(db_path).resolve())
    return runner


def run_forever(host: str, port: int, db_path: str | Path) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); for a command line."""

    async def main() -> None:
        stop = asyncio.Event()
        # SIGTERM is how a service manager stops us; end as cleanly as on Ctrl-C.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runner = await serve(host, port, db_path)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_forever(args.host, args.port, args.db)


if __name__ == "__main__":
    _main()
