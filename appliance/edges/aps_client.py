"""The appliance's HTTP client for AP-S, the customer's application server.

AP-S verifies each user and issues the call's roomkey (Flow 1 step 2), may ask for a
duplicate-login notification (Flow 3), and receives the call reports (Flow 2). The
contract is in docs/aps-api.md; the reference AP-S is ``reference_aps.server``.

Retry policy, the same for every endpoint: a connection error, a timeout or an HTTP 5xx
is retried, up to ``attempts`` in all, sleeping ``backoff``, ``2*backoff``, ... between
them; then ``ApsUnavailable`` is raised. Any other answer is final. Retrying verify is
safe because AP-S must answer a repeated (appliance_id, dialogid, ref) with the same
roomkey.

AP-S is trusted no more than the network it sits on: answers are read up to
``MAX_ANSWER_BYTES``, and a roomkey outside 0..2^63-1 is an unusable answer. With an API
token configured, every request carries ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import aiohttp

from appliance.core.token_file import TokenFileError, read_token

if TYPE_CHECKING:
    from appliance.core.config import Config

log = logging.getLogger("appliance.aps_client")

# The notify message becomes the value of a WebSocket `message` action, and the
# protocol caps every value at 128 bytes.
MAX_MESSAGE_BYTES = 128
MAX_ANSWER_BYTES = 64 * 1024  # a verify answer is ~200 bytes; never buffer a flood
MAX_UINT = 2**63 - 1  # docs/aps-api.md: integers fit in 63 bits
MAX_APPLIANCE_ID_CHARS = 128

CallEventKind = Literal["answered", "released"]


class ApsError(Exception):
    """Base of the errors this client raises."""


class ApsUnavailable(ApsError):
    """AP-S could not be reached or gave no usable answer, after all attempts."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ApsConfigError(ApsError):
    """The API token file named in the config cannot be used."""


class VerifyRejected(ApsError):
    """AP-S refused the user (result "error", or a 4xx answer to verify)."""

    def __init__(self, reason: str, status: int = 200) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Notify:
    """Duplicate login: tell appliance ``ms`` to show ``message`` in call ``roomkey``."""

    ms: str
    message: str
    roomkey: int


@dataclass(frozen=True, slots=True)
class VerifyResult:
    roomkey: int
    notify: Notify | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes


class ApsClient:
    """One aiohttp session to one AP-S; use ``async with`` or ``start()``/``close()``."""

    def __init__(
        self,
        base_url: str,
        appliance_id: str,
        timeout: float = 2.0,
        attempts: int = 3,
        backoff: float = 0.2,
        api_token: str | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._headers = {"Content-Type": "application/json; charset=utf-8"}
        if api_token:
            self._headers["Authorization"] = f"Bearer {api_token}"
        # Plain concatenation, not URL joining: a base like http://host/aps keeps its path.
        self.base_url = base_url.rstrip("/")
        self.appliance_id = appliance_id
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._session: aiohttp.ClientSession | None = None
        self._call_event_missing_logged = False

    @classmethod
    def from_config(cls, config: Config) -> ApsClient:
        """The client the config describes, with its API token (see `api_token_path`)."""
        path = api_token_path(config)
        try:
            token = None if path is None else read_token(path)
        except TokenFileError as exc:
            raise ApsConfigError(f"[aps] api_token_file: {exc}") from None
        return cls(config.aps.url, config.appliance.id, timeout=config.aps.timeout,
                   attempts=config.aps.attempts, api_token=token)

    async def start(self) -> None:
        if self._session is None:
            # trust_env=False: AP-S sits on the customer's LAN; a proxy picked up from the
            # environment would be a surprise detour for user identities.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                trust_env=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- verify -----------------------------------------------------------------------------

    async def verify(
        self,
        *,
        channel: int,
        dialogid: int,
        ref: int,
        caller: int | None,
        callee: int | None,
        userdata: str,
        suid: str | None,
        module: str,
    ) -> VerifyResult:
        """Ask AP-S to verify the user's userdata and issue the call's roomkey.

        Raises VerifyRejected when AP-S refuses (the call gets `release` "verify error")
        and ApsUnavailable when no usable answer arrives.
        """
        body = {
            "appliance_id": self.appliance_id,
            "channel": channel,
            "dialogid": dialogid,
            "ref": ref,
            "caller": caller,
            "callee": callee,
            "userdata": userdata,
            "suid": suid,
            "module": module,
        }
        answer = await self._post("/verify", body)
        data = _json_object(answer.body)
        if 400 <= answer.status < 500:
            # Final: the request itself was refused, so the user cannot be let in.
            reason = _reason(data) or f"HTTP {answer.status}"
            raise VerifyRejected(reason, status=answer.status)
        if not 200 <= answer.status < 300 or data is None:
            raise ApsUnavailable(f"/verify: unusable answer (HTTP {answer.status})")
        return _verify_result(data)

    # -- reports ----------------------------------------------------------------------------

    async def call_event(
        self,
        roomkey: int,
        event: CallEventKind,
        at: float,
        cause: int | None = None,
        causestring: str | None = None,
    ) -> bool:
        """Report that the agent answered or the call was released.

        CallEvent is optional for a customer's AP-S: a 404 (endpoint or roomkey unknown)
        returns False and is otherwise ignored. True when AP-S accepted the report.
        """
        body = {
            "appliance_id": self.appliance_id,
            "roomkey": roomkey,
            "event": event,
            "at": at,
            "cause": cause,
            "causestring": causestring,
        }
        answer = await self._post("/CallEvent", body)
        if answer.status == 404:
            if not self._call_event_missing_logged:
                self._call_event_missing_logged = True
                log.info("AP-S answers 404 to /CallEvent; treating call events as optional")
            return False
        return _report_accepted("/CallEvent", roomkey, answer)

    async def record_file(self, roomkey: int, record_file: str) -> bool:
        """Report the recording's file name. False (logged) when AP-S refused it."""
        body = {"appliance_id": self.appliance_id, "roomkey": roomkey, "record_file": record_file}
        return _report_accepted("/RecordFile", roomkey, await self._post("/RecordFile", body))

    async def end_call(self, roomkey: int, record_file: str) -> bool:
        """Report the end of the call; record_file is "" when it was not recorded."""
        body = {"appliance_id": self.appliance_id, "roomkey": roomkey, "record_file": record_file}
        return _report_accepted("/EndCall", roomkey, await self._post("/EndCall", body))

    async def report_released(self, roomkey: int, cause: int, causestring: str, *,
                              end_call: bool) -> None:
        """The one way a call's end reaches AP-S, from the worker that held it or from the
        supervisor when that worker died: CallEvent "released" (its CDR), then EndCall
        unless the recording's Convertor sends it later (`end_call=False`, with the file
        name). Each report on its own, so a lost CallEvent never leaves the record live.
        Never raises for AP-S trouble: a call's teardown must not wait on AP-S's mood."""
        try:
            await self.call_event(roomkey, "released", time.time(), cause, causestring)
        except ApsUnavailable as exc:
            log.warning("AP-S did not take the release of call %d: %s", roomkey, exc)
        if not end_call:
            return
        try:
            await self.end_call(roomkey, "")
        except ApsUnavailable as exc:
            log.warning("AP-S did not take the end of call %d: %s", roomkey, exc)

    # -- transport --------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> _Answer:
        """POST with the retry policy; returns the first non-5xx answer."""
        if self._session is None:
            raise RuntimeError("ApsClient is not started")
        url = self.base_url + path
        payload = json.dumps(body, ensure_ascii=False).encode()
        problem = ""
        for attempt in range(1, self.attempts + 1):
            try:
                answer = await self._post_once(url, payload)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = _describe_error(exc, self.timeout)
            else:
                if answer.status < 500:
                    return answer
                problem = f"HTTP {answer.status}"
            if attempt < self.attempts:
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning(
                    "AP-S %s attempt %d/%d failed: %s; retrying in %.2fs",
                    path,
                    attempt,
                    self.attempts,
                    problem,
                    delay,
                )
                await asyncio.sleep(delay)
        raise ApsUnavailable(f"{url}: {problem} (after {self.attempts} attempts)")

    async def _post_once(self, url: str, payload: bytes) -> _Answer:
        assert self._session is not None
        # allow_redirects=False: a redirected POST may silently turn into a GET.
        async with self._session.post(
            url, data=payload, headers=self._headers, allow_redirects=False
        ) as resp:
            return _Answer(status=resp.status, body=await _read_bounded(resp, url))


def api_token_path(config: Config) -> Path | None:
    """[aps] api_token_file, or data_dir/aps/api-token if it exists, or None (no header)."""
    if config.aps.api_token_file:
        return Path(config.aps.api_token_file).resolve()
    default = config.data_path / "aps" / "api-token"
    return default if os.path.lexists(default) else None


async def _read_bounded(resp: aiohttp.ClientResponse, url: str) -> bytes:
    """The body, or b"" (an unusable answer) when it is longer than MAX_ANSWER_BYTES."""
    if (resp.content_length or 0) > MAX_ANSWER_BYTES:
        log.warning("AP-S %s answered %d bytes; ignored (limit %d)", url,
                    resp.content_length, MAX_ANSWER_BYTES)
        return b""
    body = bytearray()
    while chunk := await resp.content.read(MAX_ANSWER_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            log.warning("AP-S %s answered more than %d bytes; ignored", url, MAX_ANSWER_BYTES)
            return b""
    return bytes(body)


# -- answer parsing -------------------------------------------------------------------------


def _describe_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return data if isinstance(data, dict) else None


def _reason(data: dict[str, Any] | None) -> str | None:
    reason = None if data is None else data.get("reason")
    return reason if isinstance(reason, str) and reason else None


def _as_uint(value: Any) -> int | None:
    """An unsigned 63-bit int, from a number or a numeric string (as the protocol allows)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)  # isascii(): "²".isdigit() is true, but int() refuses it
    if isinstance(value, int):
        return value if 0 <= value <= MAX_UINT else None
    return None


def _verify_result(data: dict[str, Any]) -> VerifyResult:
    result = data.get("result")
    if result == "error":
        raise VerifyRejected(_reason(data) or "verify error")
    roomkey = _as_uint(data.get("roomkey"))
    if result != "success" or roomkey is None:
        raise ApsUnavailable(f"/verify: unusable answer {json.dumps(data)[:200]}")
    return VerifyResult(roomkey=roomkey, notify=_notify(data.get("notify")))


def _notify(value: Any) -> Notify | None:
    # A malformed notify must not cost the user a call that AP-S accepted: log, ignore.
    if value is None:
        return None
    ms = value.get("ms") if isinstance(value, dict) else None
    message = value.get("message") if isinstance(value, dict) else None
    roomkey = _as_uint(value.get("roomkey")) if isinstance(value, dict) else None
    if not isinstance(ms, str) or not 0 < len(ms) <= MAX_APPLIANCE_ID_CHARS \
            or not isinstance(message, str) or roomkey is None:
        log.warning("AP-S verify answer has a malformed notify, ignored: %r", value)
        return None
    return Notify(ms=ms, message=_truncate_utf8(message, MAX_MESSAGE_BYTES), roomkey=roomkey)


def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    log.warning("AP-S notify message is %d bytes, cut to %d", len(raw), limit)
    return raw[:limit].decode(errors="ignore")  # drops a character cut in half


def _report_accepted(path: str, roomkey: int, answer: _Answer) -> bool:
    """2xx is success (a plain "200 OK" body is fine) unless the body says result "error"."""
    data = _json_object(answer.body)
    if 200 <= answer.status < 300 and (data is None or data.get("result") != "error"):
        return True
    reason = _reason(data) or f"HTTP {answer.status}"
    log.warning("AP-S refused %s for roomkey %d: %s", path, roomkey, reason)
    return False
