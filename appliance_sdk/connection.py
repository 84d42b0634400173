"""The APP SDK's connection to a media server (the slides' `connectMediaServer`).

One WebSocket carries every call of this client; a single reader task decodes each frame
and hands it to the connection's CallRouter, which routes it by (dialogid, ref) to the Call
registered there. Frames that belong to no call, such as the `release` the MS sends for a
frame it could not parse, land in `client.unrouted`.

Each call's ICE servers are the ones given to `connect`, or with `ice_servers="appliance"`
the ones the appliance hands its pages, asked for per call (GET /ice-servers on the same
host and port: fresh TURN credentials each time).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import platform
import secrets
import ssl
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import aiortc
import msgspec
from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamTrack
from msgspec import UNSET

from appliance.core import protocol
from appliance.core.turn_credentials import MAX_ANSWER_BYTES, IceServerError, parse_answer
from appliance.edges.ice_tcp_active import use_active_tcp
from appliance.edges.rtc_adapter import CandidatePolicy, apply_candidate_policy, make_configuration

from .call import Call
from .events import Event, event_name
from .media import ColorBarsVideoTrack, ToneAudioTrack
from .routing import CallRouter

log = logging.getLogger("appliance.client")

UA_FAMILY = "python-sdk"
_CONNECT_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 5.0
_ICE_SERVERS_TIMEOUT = 5.0
APPLIANCE = "appliance"  # ice_servers=APPLIANCE: the appliance's list, asked for per call


def ice_servers_url(url: str) -> str:
    """wss://host:port/... -> https://host:port/ice-servers, where the pages ask too."""
    parts = urlsplit(url)
    scheme = "http" if parts.scheme == "ws" else "https"
    return urlunsplit((scheme, parts.netloc, "/ice-servers", "", ""))


def _ua_version() -> str:
    try:
        return importlib.metadata.version("webrtc-sip-appliance")
    except importlib.metadata.PackageNotFoundError:  # vendored without its metadata
        return aiortc.__version__


def _ssl_setting(url: str, ssl_verify: bool, cafile: str | None) -> ssl.SSLContext | bool:
    if cafile is not None and not ssl_verify:
        # Passing a CA but not verifying would look safe while accepting any certificate.
        raise ValueError("cafile given but ssl_verify is False")
    if not url.startswith("wss:"):
        return True  # unused for ws://
    if not ssl_verify:
        return False  # the appliance's default self-signed certificate
    return ssl.create_default_context(cafile=cafile)


def _prefer_audio_codec(transceiver: RTCRtpTransceiver, audio: str) -> None:
    """Put the requested codec first in the offer; keep the others as fall-backs."""
    mime = {"PCMU": "audio/PCMU", "OPUS": "audio/opus"}.get(audio.upper())
    if mime is None:
        return  # unknown names are sent as-is: the MS is the one to refuse them
    codecs = RTCRtpSender.getCapabilities("audio").codecs
    transceiver.setCodecPreferences(
        sorted(codecs, key=lambda c: c.mimeType.lower() != mime.lower())
    )


def _lenient_ids(data: str | bytes) -> tuple[int | None, int | None]:
    """dialogid/ref of a frame that did not decode, to still route its error to the call."""
    try:
        frame = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None, None
    if not isinstance(frame, dict):
        return None, None
    ids = []
    for key in ("dialogid", "ref"):
        value = frame.get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        ids.append(value if isinstance(value, int) and not isinstance(value, bool) else None)
    return ids[0], ids[1]


class MediaServerClient:
    """A WebSocket connection to an MS, and the calls made over it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        *,
        host_addresses: Sequence[str],
        ice_servers: Sequence[dict[str, Any]] | Literal["appliance"],
        ice_servers_url: str | None = None,
        ssl_setting: ssl.SSLContext | bool = True,
    ) -> None:
        self.unrouted: asyncio.Queue[Event] = asyncio.Queue()
        self._router: CallRouter[Call] = CallRouter()
        self.calls = self._router.calls  # the live calls by (dialogid, ref)
        self.closed = False
        self._session = session
        self._ws = ws
        # relay: a TURN server in ice_servers gives each call a relayed candidate too, for
        # networks that let no UDP reach the appliance.
        self._policy = CandidatePolicy.from_strings(list(host_addresses), relay=True)
        self._ice_servers: list[dict[str, Any]] | None
        if isinstance(ice_servers, str):
            if ice_servers != APPLIANCE or ice_servers_url is None:
                raise ValueError('ice_servers is a list of servers, or "appliance" with '
                                 "ice_servers_url")
            self._ice_servers = None  # asked of the appliance for each call
        else:
            self._ice_servers = list(ice_servers)
        self._ice_servers_url = ice_servers_url
        self._ssl = ssl_setting
        self._send_lock = asyncio.Lock()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        ssl_verify: bool = False,
        cafile: str | None = None,
        host_addresses: Sequence[str] = ("127.0.0.1",),
        ice_servers: Sequence[dict[str, Any]] | Literal["appliance"] = (),
    ) -> MediaServerClient:
        """Open the WebSocket to `url` (ws:// or wss://).

        TLS verification is off by default because the appliance ships a self-signed
        certificate; pass ssl_verify=True (and cafile for a private CA) in production.
        host_addresses are the only host addresses ICE announces; ice_servers are
        {"urls", "username", "credential"} dicts (none: no STUN/TURN traffic at all), or
        "appliance": what the appliance gives its pages (`fetch_ice_servers`), per call. A
        TURN server among them adds a relayed candidate to each call's offer.
        """
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"media server URL must be ws:// or wss://, not {url!r}")
        ssl_setting = _ssl_setting(url, ssl_verify, cafile)
        session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                ws = await session.ws_connect(url, ssl=ssl_setting, autoping=True)
        except BaseException:
            await session.close()
            raise
        return cls(session, ws, host_addresses=host_addresses, ice_servers=ice_servers,
                   ice_servers_url=ice_servers_url(url), ssl_setting=ssl_setting)

    async def __aenter__(self) -> MediaServerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Hang up every call still up, then close the WebSocket."""
        for call in list(self.calls.values()):
            try:
                await call.close()
            except Exception:  # closing the rest matters more than one failed hangup
                log.exception("closing %r failed", call)
        self.closed = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._session.close()

    # -- sending ---------------------------------------------------------------------------

    async def send(self, action: protocol.Action) -> None:
        """Send one action as clean JSON (a text frame)."""
        await self.send_raw(protocol.encode(action))

    async def send_raw(self, data: str | bytes) -> None:
        """Send `data` as one text frame, byte for byte (tests use it for malformed input)."""
        if self.closed or self._ws.closed:
            raise ConnectionError("connection to the MS is closed")
        payload = data.encode() if isinstance(data, str) else bytes(data)
        async with self._send_lock:
            await self._ws.send_frame(payload, aiohttp.WSMsgType.TEXT)

    # -- ICE servers -----------------------------------------------------------------------

    async def fetch_ice_servers(self) -> list[dict[str, Any]]:
        """The ICE servers the appliance gives its pages now, TURN credentials made for
        this request (GET /ice-servers). IceServerError if it gives none that are usable."""
        if self._ice_servers_url is None:
            raise IceServerError("no appliance URL to ask for ICE servers")
        try:
            async with asyncio.timeout(_ICE_SERVERS_TIMEOUT):
                async with self._session.get(self._ice_servers_url, ssl=self._ssl) as response:
                    if response.status != 200:
                        raise IceServerError(f"GET {self._ice_servers_url}: HTTP "
                                             f"{response.status}")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(4096):
                        body += chunk
                        if len(body) > MAX_ANSWER_BYTES:
                            break  # parse_answer refuses it; no need to read the rest
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IceServerError(f"GET {self._ice_servers_url}: {exc!r}") from None
        return parse_answer(bytes(body))

    async def _ice_servers_for_call(self) -> list[dict[str, Any]]:
        if self._ice_servers is not None:
            return self._ice_servers
        try:
            return await self.fetch_ice_servers()
        except IceServerError as exc:
            # As the pages do: a call without them still connects wherever UDP gets through.
            log.warning("no ICE servers from the appliance (%s): calling without STUN/TURN",
                        exc)
            return []

    # -- calls -----------------------------------------------------------------------------

    async def make_video_call(
        self,
        caller: int,
        callee: int,
        userdata: str,
        module: str = "User",
        *,
        medium: int = 2,
        record: int = 0,
        lifetime: int = 0,
        suid: str | None = None,
        audio: str = "PCMU",
        nickname: str | None = None,
        dialogid: int | None = None,
        ref: int | None = None,
        audio_track: MediaStreamTrack | None = None,
        video_track: MediaStreamTrack | None = None,
        transport: str | None = None,
    ) -> Call:
        """Send the user's `offer` and return the Call at once (the answer comes as events).

        `transport="TCP"` is the offer's `protocol: "TCP"` (PROTOCOL.md): the appliance then
        announces only its ICE-TCP candidate, and this call connects to it over TCP as the
        active side of RFC 6544 (appliance/edges/ice_tcp_active.py), for networks that let
        no UDP through. Such a call uses no STUN or TURN server."""
        offer = protocol.Offer(
            caller=caller,
            callee=callee,
            userdata=userdata,
            module=module,
            record=record,
            lifetime=lifetime,
            audio=audio,
            suid=UNSET if suid is None else suid,
            nickname=UNSET if nickname is None else nickname,
            protocol=UNSET if transport is None else transport,
        )
        return await self._start_call(offer, medium, dialogid, ref, audio_track, video_track)

    async def join_room(
        self,
        roomkey: int,
        *,
        medium: int = 2,
        nickname: str | None = None,
        video_track: MediaStreamTrack | None = None,
        audio_track: MediaStreamTrack | None = None,
        dialogid: int | None = None,
        ref: int | None = None,
        token: str | None = None,
        transport: str | None = None,
    ) -> Call:
        """The agent's video leg (AgentVideo.html?roomkey=...&token=...): module Agent with
        the roomkey, and the agent token AP-S issued when the appliance requires one.
        `transport` as in make_video_call."""
        offer = protocol.Offer(
            module="Agent",
            roomkey=roomkey,
            nickname=UNSET if nickname is None else nickname,
            token=UNSET if token is None else token,
            protocol=UNSET if transport is None else transport,
        )
        call = await self._start_call(offer, medium, dialogid, ref, audio_track, video_track)
        call.roomkey = roomkey
        return call

    async def _start_call(
        self,
        offer: protocol.Offer,
        medium: int,
        dialogid: int | None,
        ref: int | None,
        audio_track: MediaStreamTrack | None,
        video_track: MediaStreamTrack | None,
    ) -> Call:
        if medium not in (0, 2):
            raise ValueError(f"medium must be 0 (audio) or 2 (video), not {medium}")
        if self.closed:
            raise ConnectionError("connection to the MS is closed")
        dialogid, ref = self._new_ids(dialogid, ref)
        pc = RTCPeerConnection(make_configuration(await self._ice_servers_for_call()))
        owned: list[MediaStreamTrack] = []
        if audio_track is None:
            audio_track = ToneAudioTrack()
            owned.append(audio_track)
        audio_tx = pc.addTransceiver(audio_track, direction="sendrecv")
        if offer.audio is not UNSET:
            _prefer_audio_codec(audio_tx, offer.audio)
        if medium == 2:
            if video_track is None:
                video_track = ColorBarsVideoTrack()
                owned.append(video_track)
            pc.addTransceiver(video_track, direction="sendrecv")
        call = Call(
            self, self._router, pc, dialogid=dialogid, ref=ref, medium=medium, owned_tracks=owned
        )
        try:
            # After the transceivers exist, before gathering (setLocalDescription).
            apply_candidate_policy(pc, self._policy)
            if isinstance(offer.protocol, str) and offer.protocol.upper() == "TCP":
                await use_active_tcp(pc, self._policy.addresses[0].bind
                                     if self._policy.addresses else None)
            await pc.setLocalDescription(await pc.createOffer())
            offer.dialogid = dialogid
            offer.ref = ref
            offer.medium = medium
            offer.ua_family = UA_FAMILY
            offer.ua_version = _ua_version()
            offer.ua_os = platform.system()[:64]
            offer.offer = protocol.SessionDescription(type="offer", sdp=pc.localDescription.sdp)
            await self.send(offer)
        except BaseException:
            self._router.withdraw((dialogid, ref), call)
            call.ended = True
            with contextlib.suppress(Exception):
                await call.close()
            raise
        return call

    def _new_ids(self, dialogid: int | None, ref: int | None) -> tuple[int, int]:
        while True:
            # 0 is avoided: in a sloppy frame it is hard to tell from "not set".
            d = dialogid if dialogid is not None else 1 + secrets.randbelow(2**32 - 1)
            r = ref if ref is not None else 1 + secrets.randbelow(2**32 - 1)
            if (d, r) not in self.calls:
                return d, r
            if dialogid is not None and ref is not None:
                raise ValueError(f"a call with dialogid {d} and ref {r} already exists")

    # -- receiving -------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    try:
                        self._dispatch(msg.data)
                    except Exception:  # the reader serves every call: it must survive
                        log.exception("dispatching a frame failed: %r", msg.data[:200])
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    log.warning("WebSocket error: %r", self._ws.exception())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("WebSocket reader failed")
        finally:
            self.closed = True
            self._router.connection_lost()

    def _dispatch(self, data: str | bytes) -> None:
        try:
            # The MS's frames, not protocol.decode(): that one only takes client->MS actions.
            action = msgspec.json.decode(data, type=protocol.Action, strict=False)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable frame from the MS (%s): %r", exc, data[:200])
            ids = _lenient_ids(data)
            if not self._router.route_invalid(ids, data, str(exc)):  # type: ignore[arg-type]
                self.unrouted.put_nowait(Event("invalid", detail=str(exc), raw=data))
            return
        key = (action.dialogid, action.ref)
        routed = UNSET not in key and self._router.route(key, action)  # type: ignore[arg-type]
        if not routed:
            self.unrouted.put_nowait(Event(event_name(action), action))


async def connect_media_server(url: str, **kwargs: Any) -> MediaServerClient:
    """The slides' `connectMediaServer("wss://host:4433")`."""
    return await MediaServerClient.connect(url, **kwargs)
