"""Appliance configuration: one TOML file (conf/appliance.toml), every key with a default.

Defaults are chosen so that a first start with no file at all works on one machine
(loopback media, the embedded reference AP-S, a self-signed certificate).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from appliance.core import turn_credentials
from appliance.core.netaddr import parse_networks


class SignallingConfig(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "0.0.0.0"
    port: int = 4433
    tls_cert: str = ""  # empty: a self-signed pair is generated under data_dir/tls
    tls_key: str = ""
    # Bounds on what the public port accepts (supervisor/front.py); 0 = no limit.
    max_connections: int = 1000  # open connections in all
    # ...from one address (an IPv6 /64); a call centre's agents may share one NAT address.
    max_connections_per_address: int = 100
    handshake_timeout: float = 10.0  # seconds for the TLS handshake
    header_timeout: float = 10.0  # seconds for a complete HTTP request head (slowloris)
    idle_timeout: float = 60.0  # seconds a WebSocket may go without a frame and a live call
    send_queue: int = 256  # frames queued for a client that does not read, then it is cut


class WorkersConfig(msgspec.Struct, forbid_unknown_fields=True):
    count: int = 0  # 0: one media worker per CPU core this process may run on
    # An upper bound; the load admits (a worker whose loop lags gets no new calls: admin.
    # degraded_lag_ms). 300 channels = 150 full calls (customer + agent): the bench observed
    # 160 full calls per worker core on a 2-core Xeon VM with the native loop (2026-12-02,
    # docs/capacity.md); each call also takes 2 RTP ports of sip.rtp_port_min..max.
    channels_per_worker: int = 300
    restart_delay: float = 0.2  # seconds before a dead worker is started again
    # A dead worker's desk-phone dialogs get BYE from its replacement (same SIP port); if
    # none is up after this many seconds, the supervisor sends those BYEs itself.
    dialog_bye_fallback: float = 3.0
    bus_endpoint: str = ""  # ZeroMQ endpoint; empty: ipc socket under data_dir


class SipConfig(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1"
    base_port: int = 5060  # worker i listens on base_port + i
    proxy: str = "127.0.0.1:5080"  # PBX / SIP proxy INVITEs go to (host:port)
    user_agent: str = "WebRTC Media Server 1.0"
    username: str = ""  # digest credentials, used only when the PBX challenges (401/407)
    password: str = ""
    ring_timeout: float = 60.0  # seconds of ringing before CANCEL and cause 19 "no answer"
    dtmf_mode: str = "rfc4733"  # "rfc4733" (telephone-events on RTP) or "info" (SIP INFO)
    rtp_address: str = ""  # address of the RTP towards the PBX; empty: same as listen
    rtp_port_min: int = 20000
    rtp_port_max: int = 29999
    ringback_hz: list[float] = msgspec.field(default_factory=lambda: [440.0, 480.0])
    ringback_on_ms: int = 1000
    ringback_off_ms: int = 2000
    # Whose RTP/RTCP the phone-side socket takes (appliance/media/rtp_source.py): false =
    # only the address:port of the phone's SDP; true = latch on the first packet from the
    # SDP's IP, any port (a NAT rewriting the port), and send our RTP back there.
    rtp_latching: bool = False
    # Who may send SIP (appliance/sip/sources.py): each call's own peers (the proxy, its
    # Record-Route and Contact hosts), the proxy outside calls, and these addresses or
    # networks ("10.1.2.3", "10.1.2.0/24") everywhere. Empty: the proxy only.
    allowed_sources: list[str] = msgspec.field(default_factory=list)
    strict_source_port: bool = False  # true: a peer's source port must match as well
    # RFC 4028 session timers towards the PBX (appliance/sip/session_timer.py): the
    # Session-Expires our INVITE asks for (0: no session timers) and our Min-SE. The RFC's
    # floor is 90 s; a smaller session_min_se exists only so tests can run in seconds.
    session_expires: int = 1800
    session_min_se: int = 90


class ApsConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8480"
    timeout: float = 2.0
    attempts: int = 3
    # The agent's credential (appliance/core/agent_token.py): a file (mode 0600) holding the secret
    # AP-S signs agent tokens with; empty: no tokens. With require_agent_token an Agent offer
    # must carry a valid `token`; without it a token, when sent, is still checked.
    agent_token_secret_file: str = ""
    require_agent_token: bool = False
    # The file (mode 0600) holding the bearer token sent to AP-S as `Authorization: Bearer`
    # on every request. Empty: data_dir/aps/api-token when that file exists (where the
    # reference AP-S of `appliance demo` creates it), else no Authorization header.
    api_token_file: str = ""


class IceServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None
    # A TURN server run with coturn's use-auth-secret: the file (mode 0600) holding its
    # static-auth-secret, instead of username/credential. Each page and SDK call then gets a
    # credential of its own, valid `ttl` seconds (appliance/core/turn_credentials.py).
    secret_file: str = ""
    ttl: int = turn_credentials.DEFAULT_TTL_S


class MediaConfig(msgspec.Struct, forbid_unknown_fields=True):
    # Addresses announced in ICE candidates: "A" or "BIND=ANNOUNCE" behind a 1:1 NAT.
    addresses: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1"])
    port_min: int = 40000
    port_max: int = 49999
    ice_servers: list[IceServerConfig] = msgspec.field(default_factory=list)
    dtls_timeout: float = 10.0
    # "packet": relay RTP as packets (the product). "aiortc": decode and re-encode video
    # through aiortc's tracks, only as the bench's baseline to measure the packet relay by.
    relay: str = "packet"
    # One WebRTC media port per worker for all its calls (issue 12): worker i listens on
    # udp_port + i (UDP) and on tcp_port + i (TCP, RFC 6544 passive candidates). 0: no such
    # port; with udp_port 0 every call binds its own UDP port in port_min..port_max.
    udp_port: int = 40000
    tcp_port: int = 40000
    # Bytes queued towards one ICE-TCP connection that reads too slowly; a frame that does
    # not fit is dropped whole and counted (appliance/ice/tcp_writer.py).
    tcp_send_buffer: int = 256 * 1024
    # ICE-TCP connections a worker's port holds (a call has one or two), and from one
    # source address: a whole office behind one NAT (where UDP is blocked, the very case
    # TCP is for) shares one, so this bounds one host, not one caller - as
    # admission.max_calls_per_address bounds its calls (two legs each).
    tcp_max_connections: int = 512
    tcp_max_per_address: int = 100
    # The native packet loop (appliance.native, issue 13) drains the worker's UDP media
    # port when it is built; false: the pure-Python path only (the reference).
    native_loop: bool = True
    # On those ports: seconds without a valid ICE check from a call's browser (RFC 7675
    # consent; browsers check about every 5 s) before the call is released.
    consent_timeout: float = 30.0


class AdminConfig(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1"  # keep it off the public interface
    port: int = 9090  # /metrics (Prometheus) and /status (JSON); 0 disables
    degraded_lag_ms: float = 50.0  # a worker whose loop lag p99 stays above this...
    degraded_after: float = 5.0  # ...for this many seconds gets no new calls
    # A worker not heard on the bus for heartbeat_timeout seconds (its loop is stuck, or it
    # is stopped) gets no new calls until it speaks again; silent for hung_restart_after
    # seconds it is killed and restarted (its calls get release 41 "media worker failed").
    heartbeat_timeout: float = 2.0
    hung_restart_after: float = 10.0


class AdmissionConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Per-client shares of the box (supervisor/admission.py); 0 = no limit."""

    # Calls in setup (booked, DTLS not up yet; each verifies with AP-S at most once at a
    # time), per WebSocket, per source address (IPv6: per /64), and on the whole box.
    max_setup_per_connection: int = 8
    max_setup_per_address: int = 16
    max_setup_total: int = 32
    # Customer calls held, per WebSocket and per source address (agent legs not counted:
    # each needs a live room, and a call centre's agents may share one NAT address).
    max_calls_per_connection: int = 50
    max_calls_per_address: int = 50
    # Wrong roomkeys (or refused agent tokens) allowed per connection and per address per
    # minute; the next one refuses every agent offer from there for the cool-down (s).
    wrong_roomkeys_per_minute: int = 5
    wrong_roomkey_cooldown: float = 60.0


class PeerConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Another appliance this one exchanges duplicate-login notices with."""

    endpoint: str = ""  # its [peers] listen endpoint, e.g. "tcp://10.0.0.2:5570"
    public_key: str = ""  # its CURVE public key, Z85 text (`appliance peer-key` prints it)


class PeersConfig(msgspec.Struct, forbid_unknown_fields=True):
    # ZeroMQ endpoint where peer appliances' notices arrive; empty: accept none.
    listen: str = ""
    # This appliance's CURVE secret key; empty: data_dir/peers/<id>.key_secret (created).
    secret_key_file: str = ""
    timeout: float = 2.0  # seconds for a notice to be acknowledged by the peer
    peers: dict[str, PeerConfig] = msgspec.field(default_factory=dict)  # appliance id -> peer


class MessagesConfig(msgspec.Struct, forbid_unknown_fields=True):
    language: str = "zh-TW"  # "zh-TW" (the original texts) or "en"
    level: str = "warning"
    position: str = "top"
    displaytime: int = 5


class ConditionsConfig(msgspec.Struct, forbid_unknown_fields=True):
    delay_jitter_ms: float = 80.0
    video_loss_pct: float = 10.0
    downlink_loss_pct: float = 10.0
    remb_min_kbps: float = 30.0
    hold_s: float = 3.0
    clear_s: float = 5.0
    silent_mic_s: float = 10.0


class RecordingConfig(msgspec.Struct, forbid_unknown_fields=True):
    dir: str = ""  # empty: data_dir/recordings
    master_key_file: str = ""  # empty: data_dir/recording-master.key (made on first start)
    # The Convertor command, run once per call after hang-up; {job}, {recordings} and
    # {key_file} are filled in. Empty: ours (`appliance convert`).
    convertor: str = ""
    attempts: int = 5  # then the job waits for the next start (nothing is deleted)
    retry_delay: float = 5.0  # seconds, doubled after each failure


class ApplianceConfig(msgspec.Struct, forbid_unknown_fields=True):
    id: str = "ms-1"
    data_dir: str = "data"
    log_level: str = "INFO"


class Config(msgspec.Struct, forbid_unknown_fields=True):
    appliance: ApplianceConfig = msgspec.field(default_factory=ApplianceConfig)
    signalling: SignallingConfig = msgspec.field(default_factory=SignallingConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    sip: SipConfig = msgspec.field(default_factory=SipConfig)
    aps: ApsConfig = msgspec.field(default_factory=ApsConfig)
    media: MediaConfig = msgspec.field(default_factory=MediaConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    messages: MessagesConfig = msgspec.field(default_factory=MessagesConfig)
    conditions: ConditionsConfig = msgspec.field(default_factory=ConditionsConfig)
    recording: RecordingConfig = msgspec.field(default_factory=RecordingConfig)
    peers: PeersConfig = msgspec.field(default_factory=PeersConfig)
    admission: AdmissionConfig = msgspec.field(default_factory=AdmissionConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.appliance.data_dir).resolve()

    @property
    def recording_path(self) -> Path:
        return Path(self.recording.dir).resolve() if self.recording.dir else (
            self.data_path / "recordings")

    @property
    def master_key_path(self) -> Path:
        return Path(self.recording.master_key_file).resolve() if self.recording.master_key_file \
            else self.data_path / "recording-master.key"

    def worker_count(self) -> int:
        if self.workers.count > 0:
            return self.workers.count
        return len(os.sched_getaffinity(0))

    def bus_endpoint(self) -> str:
        if self.workers.bus_endpoint:
            return self.workers.bus_endpoint
        return f"ipc://{self.data_path / 'run' / 'bus.sock'}"

    def peer_secret_key_path(self) -> Path:
        if self.peers.secret_key_file:
            return Path(self.peers.secret_key_file).resolve()
        return self.data_path / "peers" / f"{self.appliance.id}.key_secret"

    def ice_servers(self) -> list[dict[str, Any]]:
        return [msgspec.to_builtins(s) for s in self.media.ice_servers]


# Config values that are secrets (dotted paths). They never reach a file the appliance writes:
# the effective config the workers read has them removed, and each worker gets them on its
# stdin at spawn (appliance/core/config_secrets.py). Add any new inline secret here.
SECRETS: tuple[str, ...] = (
    "sip.password",
    "media.ice_servers",  # whole list: a TURN server's credential is in it
)


class ConfigError(Exception):
    pass


def load(path: str | Path | None) -> Config:
    """Read and validate a config file; None gives the defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return from_dict(raw, source=str(path))


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _validate(config, source)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    return msgspec.to_builtins(config)


def _validate(config: Config, source: str) -> None:
    _validate_signalling(config.signalling, source)
    if config.workers.channels_per_worker < 0:
        raise ConfigError(f"{source}: workers.channels_per_worker must be >= 0")
    if not 0 <= config.media.port_min <= config.media.port_max <= 65535:
        raise ConfigError(f"{source}: need 0 <= media.port_min <= media.port_max <= 65535")
    if config.messages.language not in ("zh-TW", "en"):
        raise ConfigError(f"{source}: messages.language must be 'zh-TW' or 'en'")
    if config.messages.level not in ("info", "notify", "warning", "error"):
        raise ConfigError(f"{source}: messages.level must be info, notify, warning or error")
    if config.messages.position not in ("top", "bottom", "middle"):
        raise ConfigError(f"{source}: messages.position must be top, bottom or middle")
    if config.media.relay not in ("packet", "aiortc"):
        raise ConfigError(f"{source}: media.relay must be 'packet' or 'aiortc'")
    if config.media.dtls_timeout <= 0:
        raise ConfigError(f"{source}: media.dtls_timeout must be > 0")
    if not CONSENT_TIMEOUT_MIN <= config.media.consent_timeout <= CONSENT_TIMEOUT_MAX:
        raise ConfigError(f"{source}: media.consent_timeout must be {CONSENT_TIMEOUT_MIN:g}.."
                          f"{CONSENT_TIMEOUT_MAX:g} seconds")
    if ":" not in config.sip.proxy:
        raise ConfigError(f"{source}: sip.proxy must be host:port")
    if config.sip.dtmf_mode not in ("rfc4733", "info"):
        raise ConfigError(f"{source}: sip.dtmf_mode must be 'rfc4733' or 'info'")
    if not 0 < config.sip.rtp_port_min < config.sip.rtp_port_max <= 65535:
        raise ConfigError(f"{source}: need 0 < sip.rtp_port_min < sip.rtp_port_max <= 65535")
    try:
        parse_networks(config.sip.allowed_sources)
    except ValueError as exc:
        raise ConfigError(f"{source}: sip.allowed_sources: {exc}") from None
    _validate_peers(config.peers, source)
    _validate_ice_servers(config.media.ice_servers, source)
    _validate_media_ports(config, source)
    _validate_session_timer(config, source)
    _validate_admin(config.admin, source)
    _validate_admission(config, source)


def _validate_admission(config: Config, source: str) -> None:
    adm = config.admission
    for name in ("max_setup_per_connection", "max_setup_per_address", "max_setup_total",
                 "max_calls_per_connection", "max_calls_per_address"):
        if getattr(adm, name) < 0:
            raise ConfigError(f"{source}: admission.{name} must be >= 0 (0: no limit)")
    if adm.wrong_roomkeys_per_minute < 1:
        raise ConfigError(f"{source}: admission.wrong_roomkeys_per_minute must be >= 1")
    if adm.wrong_roomkey_cooldown <= 0:
        raise ConfigError(f"{source}: admission.wrong_roomkey_cooldown must be > 0")
    if config.aps.require_agent_token and not config.aps.agent_token_secret_file:
        raise ConfigError(f"{source}: aps.require_agent_token needs aps.agent_token_secret_file")


def _validate_ice_servers(servers: list[IceServerConfig], source: str) -> None:
    # The pages and the workers' aiortc get this list: an entry either takes is one both take.
    if len(servers) > turn_credentials.MAX_SERVERS:
        raise ConfigError(f"{source}: media.ice_servers: at most "
                          f"{turn_credentials.MAX_SERVERS} entries")
    for i, s in enumerate(servers):
        try:
            turn_credentials.check_config_entry(s.urls, s.username, s.credential,
                                                s.secret_file, s.ttl)
        except turn_credentials.IceServerError as exc:
            raise ConfigError(f"{source}: media.ice_servers[{i}]: {exc}") from None


# RFC 7675 says 30 s; below a browser's check interval (about 5 s) calls would drop, so
# only tests go that low. Above a few minutes a dead browser would hold its channel.
CONSENT_TIMEOUT_MIN = 1.0
CONSENT_TIMEOUT_MAX = 300.0
# appliance/ice/tcp_writer.py's bounds on a send buffer (core imports nothing of ours): one
# frame of RFC 4571's largest (2 + 65535 bytes) must fit; 16 MiB is many seconds of video.
TCP_SEND_BUFFER_MIN = 2 + 65535
TCP_SEND_BUFFER_MAX = 16 * 1024 * 1024
TCP_CONNECTIONS_MAX = 65535  # each an open file of the worker's


def _validate_media_ports(config: Config, source: str) -> None:
    """The per-worker media ports fit in 1..65535 and take no port another listener of the
    box binds with the same protocol (UDP 443 beside a TCP 443 signalling port is fine)."""
    media = config.media
    if not TCP_SEND_BUFFER_MIN <= media.tcp_send_buffer <= TCP_SEND_BUFFER_MAX:
        raise ConfigError(f"{source}: media.tcp_send_buffer must be {TCP_SEND_BUFFER_MIN}.."
                          f"{TCP_SEND_BUFFER_MAX} bytes")
    for name in ("tcp_max_connections", "tcp_max_per_address"):
        if not 1 <= getattr(media, name) <= TCP_CONNECTIONS_MAX:
            raise ConfigError(f"{source}: media.{name} must be 1..{TCP_CONNECTIONS_MAX}")
    n = config.worker_count()
    sip = config.sip
    taken = {
        "udp": [(f"the SIP ports (sip.base_port + i: {sip.base_port}..{sip.base_port + n - 1})",
                 range(sip.base_port, sip.base_port + n)),
                (f"the SIP RTP range (sip.rtp_port_min..rtp_port_max: {sip.rtp_port_min}.."
                 f"{sip.rtp_port_max})", range(sip.rtp_port_min, sip.rtp_port_max + 1))],
        "tcp": [(f"signalling.port {config.signalling.port}",
                 range(config.signalling.port, config.signalling.port + 1)),
                (f"admin.port {config.admin.port}",
                 range(config.admin.port, config.admin.port + 1) if config.admin.port
                 else range(0))],
    }
    for proto in ("udp", "tcp"):
        key = f"{proto}_port"
        base = getattr(media, key)
        if base == 0:
            continue
        if not 1 <= base <= 65536 - n:
            raise ConfigError(
                f"{source}: media.{key} must be 0 (off) or 1..{65536 - n}: worker i listens "
                f"on {key} + i, and there are {n} workers")
        ports = range(base, base + n)
        for name, other in taken[proto]:
            if ports.start < other.stop and other.start < ports.stop:
                raise ConfigError(
                    f"{source}: media.{key} + i ({base}..{base + n - 1}, {proto.upper()}) "
                    f"overlaps {name}")


def _validate_session_timer(config: Config, source: str) -> None:
    sip = config.sip
    if not 1 <= sip.session_min_se <= 86400:
        raise ConfigError(f"{source}: sip.session_min_se must be 1..86400 (RFC 4028: >= 90)")
    if sip.session_expires != 0 and not sip.session_min_se <= sip.session_expires <= 86400:
        raise ConfigError(
            f"{source}: sip.session_expires must be 0 (off) or session_min_se..86400")
    if config.workers.dialog_bye_fallback <= 0:
        raise ConfigError(f"{source}: workers.dialog_bye_fallback must be > 0")


def _validate_admin(admin: AdminConfig, source: str) -> None:
    if admin.heartbeat_timeout <= 0:
        raise ConfigError(f"{source}: admin.heartbeat_timeout must be > 0")
    if admin.hung_restart_after < admin.heartbeat_timeout:
        raise ConfigError(f"{source}: admin.hung_restart_after must be >= heartbeat_timeout")


def _validate_signalling(sig: SignallingConfig, source: str) -> None:
    for name in ("max_connections", "max_connections_per_address", "send_queue"):
        if getattr(sig, name) < 0:
            raise ConfigError(f"{source}: signalling.{name} must be >= 0 (0 = no limit)")
    if sig.send_queue == 0:
        raise ConfigError(f"{source}: signalling.send_queue must be > 0")
    for name in ("handshake_timeout", "header_timeout", "idle_timeout"):
        if getattr(sig, name) <= 0:
            raise ConfigError(f"{source}: signalling.{name} must be > 0 (seconds)")


def _validate_peers(peers: PeersConfig, source: str) -> None:
    if peers.timeout <= 0:
        raise ConfigError(f"{source}: peers.timeout must be > 0")
    for name, peer in peers.peers.items():
        if not peer.endpoint:
            raise ConfigError(f"{source}: peers.peers.{name}.endpoint is missing")
        # A CURVE public key is 32 bytes, which Z85 writes as exactly 40 characters.
        if len(peer.public_key) != 40 or not set(peer.public_key) <= _Z85:
            raise ConfigError(
                f"{source}: peers.peers.{name}.public_key must be a 40-character Z85 key "
                "(what `appliance peer-key` prints on that appliance)"
            )


_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
