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


class SignallingConfig(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "0.0.0.0"
    port: int = 4433
    tls_cert: str = ""  # empty: a self-signed pair is generated under data_dir/tls
    tls_key: str = ""


class WorkersConfig(msgspec.Struct, forbid_unknown_fields=True):
    count: int = 0  # 0: one media worker per CPU core this process may run on
    channels_per_worker: int = 50
    restart_delay: float = 0.2  # seconds before a dead worker is started again
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


class ApsConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8480"
    timeout: float = 2.0
    attempts: int = 3


class IceServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


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


class AdminConfig(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1"  # keep it off the public interface
    port: int = 9090  # /metrics (Prometheus) and /status (JSON); 0 disables
    degraded_lag_ms: float = 50.0  # a worker whose loop lag p99 stays above this...
    degraded_after: float = 5.0  # ...for this many seconds gets no new calls


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
    if ":" not in config.sip.proxy:
        raise ConfigError(f"{source}: sip.proxy must be host:port")
    if config.sip.dtmf_mode not in ("rfc4733", "info"):
        raise ConfigError(f"{source}: sip.dtmf_mode must be 'rfc4733' or 'info'")
    if not 0 < config.sip.rtp_port_min < config.sip.rtp_port_max <= 65535:
        raise ConfigError(f"{source}: need 0 < sip.rtp_port_min < sip.rtp_port_max <= 65535")
    _validate_peers(config.peers, source)


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
