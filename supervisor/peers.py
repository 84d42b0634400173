"""Duplicate-login notices between appliances (Flow 3, step 3).

MS-2's worker learns from AP-S that its caller's identity is still in call `roomkey` on
appliance MS-1 (`bus.NotifyPeer`). MS-2's supervisor sends MS-1 a `DuplicateLoginNotice`;
MS-1's supervisor hands it to the worker that holds the room, which shows AP-S's text to
both parties of the old call. The new call on MS-2 never waits for any of this.

The channel is ZeroMQ with CURVE: encrypted, and the sender's key is its identity.

- MS-1 binds a ROUTER. It takes notices from any number of peers at once, and the routing
  id lets it answer each sender with a `NoticeAck`. (PULL could not answer at all; REP
  answers, but one request at a time in a strict recv/send lockstep.)
- MS-2 opens a DEALER for each notice: connect, send, wait for the ack up to
  `[peers] timeout`, close with linger 0. (REQ would be stuck in its send/recv lockstep
  after a timeout.) A socket per notice also means a notice for an unreachable peer dies
  at the timeout instead of being delivered minutes later, when the old call may be long
  over. Notices are rare (one per duplicate login), so one CURVE handshake each is nothing.
- A ZAP handler (`AsyncioAuthenticator.configure_curve`) admits only the public keys in
  `[peers]`. Its User-Id for an admitted key is that peer's appliance id, so a peer cannot
  send a notice in another appliance's name.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from appliance.core.config import Config, PeerConfig
from appliance.core.throttle import LogBudget
from supervisor.peer_keys import Keypair, PeerKeyError, load_or_create

log = logging.getLogger("appliance.peers")

ZAP_DOMAIN = "peers"
MAX_MESSAGE_BYTES = 128  # the protocol's limit on a `message` value

# Ack statuses. Only DELIVERED and UNKNOWN_ROOMKEY mean the notice reached its peer.
DELIVERED = "delivered"
UNKNOWN_ROOMKEY = "unknown roomkey"
REFUSED = "refused"

UInt = Annotated[int, msgspec.Meta(ge=0)]

# deliver(roomkey, message, from_ms) -> DELIVERED or UNKNOWN_ROOMKEY
Deliver = Callable[[int, str, str], str]


# -- what travels between appliances ---------------------------------------------------------
# MessagePack maps (not arrays): an older appliance ignores fields a newer one adds.


class DuplicateLoginNotice(msgspec.Struct, tag="dup_login"):
    from_ms: str
    roomkey: UInt
    message: str


class NoticeAck(msgspec.Struct, tag="ack"):
    status: str
    detail: str = ""


_encoder = msgspec.msgpack.Encoder()
_notice_decoder = msgspec.msgpack.Decoder(DuplicateLoginNotice)
_ack_decoder = msgspec.msgpack.Decoder(NoticeAck)


@dataclass
class NoticeStats:
    """What /status and /metrics show about the channel."""

    sent: int = 0  # notices a peer acknowledged (delivered or unknown roomkey)
    failures: int = 0  # notices that did not reach their peer: the old call saw nothing
    received: int = 0  # notices from authenticated peers
    keys_refused: int = 0  # CURVE handshakes from keys not in [peers]


class NoticeFailed(Exception):
    pass


# -- MS-1: the receiving side --------------------------------------------------------------


class PeerAuthenticator(AsyncioAuthenticator):
    """ZAP for the notice socket: only [peers] keys pass; each refusal is logged."""

    REFUSAL_LOG_INTERVAL = 60.0  # a refused client reconnects every ~100 ms: log it once
    # Keys come from whoever connects: remember at most this many, and log at most
    # REFUSAL_LINES refusals per interval for all keys together.
    MAX_KEYS_REMEMBERED = 1024
    REFUSAL_LINES = 10

    def __init__(self, ctx: zmq.asyncio.Context, peers: dict[str, PeerConfig],
                 cert_dir: Path, stats: NoticeStats) -> None:
        super().__init__(ctx, log=logging.getLogger("appliance.peers.zap"))
        self.names = {peer.public_key.encode(): name for name, peer in peers.items()}
        self.cert_dir = cert_dir
        self.stats = stats
        self._refusal_logged: dict[bytes, float] = {}  # key -> when, oldest first
        self._refusal_budget = LogBudget(self.REFUSAL_LINES, self.REFUSAL_LOG_INTERVAL)

    def start(self) -> None:
        _write_public_certs(self.cert_dir, self.names)
        super().start()
        self.configure_curve(domain=ZAP_DOMAIN, location=str(self.cert_dir))

    def curve_user_id(self, client_public_key: bytes) -> str:
        # Called only for admitted keys: the frames of that connection carry this User-Id.
        return self.names[z85.encode(client_public_key)]

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ZAP request (RFC 27): version, id, domain, address, identity, mechanism, key.
        if len(msg) == 7 and msg[5] == b"CURVE" and len(msg[6]) == 32:
            key = z85.encode(msg[6])
            if key not in self.names:
                self._note_refusal(key, msg[3].decode(errors="replace"))
        await super().handle_zap_message(msg)

    def _note_refusal(self, key: bytes, address: str) -> None:
        self.stats.keys_refused += 1
        now = time.monotonic()
        last = self._refusal_logged.get(key)
        if last is not None and now - last < self.REFUSAL_LOG_INTERVAL:
            return
        allowed, suppressed = self._refusal_budget.allow(now)
        if not allowed:
            return
        self._remember_refusal(key, now)
        more = f" ({suppressed} other refusal(s) not logged)" if suppressed else ""
        log.warning("refused a peer notice connection from %s: its CURVE key %s is not in "
                    "[peers] (nothing delivered)%s", address or "?", key.decode(), more)

    def _remember_refusal(self, key: bytes, now: float) -> None:
        self._refusal_logged.pop(key, None)  # re-inserted last: the dict stays by time
        while len(self._refusal_logged) >= self.MAX_KEYS_REMEMBERED:
            del self._refusal_logged[next(iter(self._refusal_logged))]
        self._refusal_logged[key] = now


def _write_public_certs(cert_dir: Path, names: dict[bytes, str]) -> None:
    """configure_curve reads allowed keys from *.key files: write exactly the configured
    ones (a peer removed from the config must stop being admitted)."""
    shutil.rmtree(cert_dir, ignore_errors=True)
    cert_dir.mkdir(parents=True, mode=0o700)
    for index, (key, name) in enumerate(names.items()):
        # The file name is only for the operator; the peer id is not trusted as a path.
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        (cert_dir / f"{index:03d}-{safe}.key").write_text(
            f"# public key of peer appliance {name}, from [peers]\n"
            f'metadata\n    appliance = "{name}"\ncurve\n    public-key = "{key.decode()}"\n'
        )


class NoticeServer:
    def __init__(self, ctx: zmq.asyncio.Context, listen: str, keys: Keypair,
                 auth: PeerAuthenticator, deliver: Deliver, stats: NoticeStats) -> None:
        self.listen = listen
        self._ctx = ctx
        self._keys = keys
        self._auth = auth
        self._deliver = deliver
        self._stats = stats
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._auth.start()  # before bind: no handshake may ever happen without ZAP
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = self._keys.secret
        sock.curve_publickey = self._keys.public
        sock.zap_domain = ZAP_DOMAIN.encode()
        # Fail closed: with no ZAP handler answering, libzmq would otherwise admit any key.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        try:
            sock.bind(self.listen)
        except zmq.ZMQError:
            sock.close(linger=0)
            self._auth.stop()
            raise
        self._sock = sock
        self._task = asyncio.create_task(self._serve(), name="peer-notices")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close(linger=0)
        self._auth.stop()

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                ack = self._handle(frames)
            except Exception:  # one bad notice must not stop the channel
                log.exception("handling a peer notice failed")
                ack = NoticeAck(REFUSED, "internal error")
            await self._sock.send_multipart([frames[0].bytes, _encoder.encode(ack)])

    def _handle(self, frames: list[Any]) -> NoticeAck:
        if len(frames) != 2:
            return NoticeAck(REFUSED, "expected one frame")
        payload = frames[1]
        peer = payload.get("User-Id")  # set by our ZAP handler: the sender's appliance id
        try:
            notice = _notice_decoder.decode(payload.bytes)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable notice from peer appliance %s: %s", peer, exc)
            return NoticeAck(REFUSED, "undecodable notice")
        if notice.from_ms != peer:
            log.warning("peer appliance %s sent a notice in the name of %r: refused", peer,
                        notice.from_ms)
            return NoticeAck(REFUSED, f"your key belongs to {peer}")
        self._stats.received += 1
        message = _truncate_utf8(notice.message, MAX_MESSAGE_BYTES)
        status = self._deliver(notice.roomkey, message, peer)
        return NoticeAck(status)


# -- MS-2: the sending side ----------------------------------------------------------------

_MONITORED = (
    zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_FATAL = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


async def send_notice(ctx: zmq.asyncio.Context, keys: Keypair, peer: PeerConfig,
                      notice: DuplicateLoginNotice, timeout: float) -> NoticeAck:
    """Send one notice and return the peer's ack; NoticeFailed says readably why not."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = peer.public_key.encode()
    monitor = sock.get_monitor_socket(_MONITORED)
    seen: list[int] = []
    try:
        try:
            sock.connect(peer.endpoint)
        except zmq.ZMQError as exc:
            raise NoticeFailed(f"bad endpoint {peer.endpoint!r}: {exc}") from None
        # Queued until the handshake completes; dropped with the socket if it never does.
        await sock.send(_encoder.encode(notice))
        answer = asyncio.ensure_future(sock.recv())
        watch = asyncio.ensure_future(_watch(monitor, seen))
        done, pending = await asyncio.wait({answer, watch}, timeout=timeout,
                                           return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            future.cancel()
        if answer in done:
            try:
                return _ack_decoder.decode(answer.result())
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise NoticeFailed("the peer's answer is not an acknowledgement") from None
        raise NoticeFailed(_why(seen, timeout))
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


async def _watch(monitor: zmq.asyncio.Socket, seen: list[int]) -> None:
    """Collect connection events; return as soon as the handshake has failed for good."""
    while True:
        event = parse_monitor_message(await monitor.recv_multipart())["event"]
        seen.append(event)
        if event in _FATAL:
            return


def _why(seen: list[int], timeout: float) -> str:
    if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
        return "the peer refused this appliance's CURVE key (is our `appliance peer-key` in " \
               "its [peers]?)"
    if zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL in seen or \
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL in seen:
        return "CURVE handshake failed (is public_key in [peers] that appliance's key?)"
    if zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
        return f"connected, but no acknowledgement within {timeout:g} s"
    if zmq.EVENT_CONNECTED in seen:
        # A wrong server key shows as a connection the peer drops during the handshake.
        return f"connected, but the CURVE handshake did not complete within {timeout:g} s " \
               "(is public_key in [peers] that appliance's key?)"
    return f"not reachable (no connection within {timeout:g} s)"


def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode()
    return text if len(raw) <= limit else raw[:limit].decode(errors="ignore")


# -- the supervisor's view -----------------------------------------------------------------


class Peers:
    """The supervisor's end of the channel: sends its workers' notices, receives others'."""

    def __init__(self, config: Config, deliver: Deliver) -> None:
        self.appliance_id = config.appliance.id
        self.config = config.peers
        self._key_path = config.peer_secret_key_path()
        self._cert_dir = config.data_path / "peers" / "authorized"
        self._deliver = deliver
        self.stats = NoticeStats()
        self.listening = False
        self._ctx: zmq.asyncio.Context | None = None
        self._keys: Keypair | None = None
        self._server: NoticeServer | None = None

    def start(self) -> None:
        """Never raises: a broken notice channel costs notices, not the appliance's calls."""
        if not self.config.listen and not self.config.peers:
            return  # the feature is not in use: no key is created
        try:
            self._keys = load_or_create(self._key_path, self.appliance_id)
        except (PeerKeyError, OSError) as exc:
            log.error("no duplicate-login notices to or from other appliances: %s", exc)
            return
        self._ctx = zmq.asyncio.Context()
        if not self.config.listen:
            return
        auth = PeerAuthenticator(self._ctx, self.config.peers, self._cert_dir, self.stats)
        server = NoticeServer(self._ctx, self.config.listen, self._keys, auth, self._deliver,
                              self.stats)
        try:
            server.start()
        except zmq.ZMQError as exc:
            log.error("cannot listen for peer notices on %s: %s; duplicate-login notices "
                      "from other appliances will not arrive", self.config.listen, exc)
            return
        self._server = server
        self.listening = True
        log.info("peer notices: listening on %s for %d peer(s): %s", self.config.listen,
                 len(self.config.peers), ", ".join(sorted(self.config.peers)) or "none")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self.listening = False

    async def notify(self, ms: str, roomkey: int, message: str) -> None:
        """Tell appliance `ms` to show `message` in its call `roomkey`. Never raises."""
        if ms == self.appliance_id:
            # AP-S names this very appliance: the old call is here, no network needed.
            status = self._deliver(roomkey, message, ms)
            log.info("duplicate login: roomkey %d is on this appliance: %s", roomkey, status)
            self.stats.sent += 1
            return
        peer = self.config.peers.get(ms)
        if peer is None:
            self._failed(ms, roomkey, f"{ms!r} is not in this appliance's [peers] table")
            return
        if self._keys is None or self._ctx is None:
            self._failed(ms, roomkey, "this appliance has no usable peer keypair")
            return
        notice = DuplicateLoginNotice(self.appliance_id, roomkey, message)
        try:
            ack = await send_notice(self._ctx, self._keys, peer, notice, self.config.timeout)
        except NoticeFailed as exc:
            self._failed(ms, roomkey, f"{peer.endpoint}: {exc}")
            return
        except zmq.ZMQError as exc:  # e.g. the context closed under it at shutdown
            self._failed(ms, roomkey, f"{peer.endpoint}: {exc}")
            return
        if ack.status not in (DELIVERED, UNKNOWN_ROOMKEY):
            self._failed(ms, roomkey, f"{peer.endpoint} refused it: {ack.detail or ack.status}")
            return
        self.stats.sent += 1
        log.info("duplicate-login notice for roomkey %d: %s says %s", roomkey, ms, ack.status)

    def _failed(self, ms: str, roomkey: int, why: str) -> None:
        self.stats.failures += 1
        log.warning("duplicate-login notice for roomkey %d not delivered to appliance %s: %s "
                    "(the new call goes on; the old call is not told)", roomkey, ms, why)
