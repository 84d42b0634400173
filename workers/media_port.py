"""The worker's one WebRTC media port (issue 12), as the worker and its legs see it.

With `[media] udp_port` 0 (the default) a worker has none, and every call binds its own
UDP sockets from port_min..port_max through aioice, as before. Otherwise worker i listens
on udp_port + i (and tcp_port + i, ICE-TCP, when tcp_port is set) for all of its calls and
answers each as ICE-lite (appliance/edges/lite_transport.py). This module owns what the
worker does with that port: open it from the config (a port that cannot bind is an
operator-readable error and a refusal cause for each call, never a crash loop), say
whether a call can use it, attach a call's peer connection to it, turn its counters into
`bus.WorkerStats` fields, and put a transport's failure into words an operator reads in a
release.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiortc import RTCPeerConnection
from msgspec import UNSET

from appliance import native
from appliance.core import protocol as p
from appliance.core.config import MediaConfig
from appliance.edges.lite_transport import (
    LiteConnection,
    LiteSettings,
    WorkerMediaPort,
    use_lite_transport,
)
from appliance.edges.rtc_adapter import HostAddress
from workers.call_state import Event

log = logging.getLogger("appliance.worker")

# bus.WorkerStats field <- WorkerMediaPort.stats() key. Checks answered with a success
# (not every parsed check: strangers' count elsewhere); TCP connections accepted (the
# refused are the port's own business); frames not sent towards a TCP reader.
STATS_KEYS = {
    "ice_checks": "valid_checks",
    "ice_consent_failures": "consent_lost",
    "ice_tcp_connections": "tcp_accepted",
    "ice_tcp_drops": "tcp_frames_dropped",
    "ice_tcp_refused": "tcp_refused",
    "native_loop": "native_loop",  # a gauge: 1 while the native loop drains the UDP port
}


@dataclass(frozen=True)
class PortPlan:
    """Which ports worker `index` listens on: bases + index (config.py validated them)."""

    udp: int
    tcp: int  # 0: no ICE-TCP

    @classmethod
    def for_worker(cls, media: MediaConfig, index: int) -> PortPlan | None:
        if media.udp_port == 0:
            return None  # today's per-call aioice sockets
        return cls(media.udp_port + index, media.tcp_port + index if media.tcp_port else 0)

    def describe(self) -> str:
        return f"UDP {self.udp}" + (f" and TCP {self.tcp}" if self.tcp else "")


def lite_settings(media: MediaConfig) -> LiteSettings:
    """The config's knobs for the port (config.py validated them; LiteSettings checks its
    own bounds again). The rest stay LiteSettings' defaults: its connect_timeout (30 s)
    is longer than media.dtls_timeout, so the leg's "Connect Timeout" comes first."""
    return LiteSettings(consent_timeout=media.consent_timeout,
                        tcp_send_buffer=media.tcp_send_buffer,
                        max_tcp_connections=media.tcp_max_connections,
                        max_tcp_per_address=media.tcp_max_per_address,
                        native_loop=media.native_loop)


def packet_path(port: WorkerMediaPort, settings: LiteSettings) -> str:
    """Which packet path drains the UDP port, for the operator's log."""
    if port.native_loop:
        return f"native packet loop ({native.module().LIBSRTP_VERSION})"
    if not settings.native_loop:
        return "pure-Python packet path (media.native_loop = false)"
    return f"pure-Python packet path: {native.WHY_NOT}"


def wants_tcp(offer: p.Offer) -> bool:
    """`protocol: "TCP"` in the offer (PROTOCOL.md): RTP over TCP only. Anything else, or
    nothing, is the default UDP (with TCP announced beside it as the fall-back)."""
    return offer.protocol is not UNSET and offer.protocol.strip().upper() == "TCP"


def describe_failure(reason: str | None, consent_timeout: float) -> str:
    """A LiteConnection's `failure` as the release's detail: what happened, for the
    operator reading the CDR or the log, then the transport's own words."""
    if reason is None:
        return "DTLS failed"  # ICE was fine: the handshake or the DTLS transport failed
    if reason == "consent expired":
        return (f"the browser's network went away (no ICE consent check for "
                f"{consent_timeout:g} s)")
    if reason == "no nomination":
        return "the browser never completed ICE (no nomination)"
    if "port closed" in reason:
        return "the worker's media port closed"
    return f"ICE-lite: {reason}"


class MediaPort:
    """The worker's port, or why it has none although the config asks for one."""

    def __init__(self, plan: PortPlan, port: WorkerMediaPort | None, error: str,
                 settings: LiteSettings) -> None:
        self.plan = plan
        self.port = port
        self.error = error  # why `port` is None
        self.settings = settings
        self._final: dict[str, int] = {}  # the counters at close: reports stay monotonic
        self._final_native = (0, 0)

    @property
    def consent_timeout(self) -> float:
        return float(self.settings.consent_timeout)

    @classmethod
    async def open(cls, plan: PortPlan, addresses: Sequence[HostAddress],
                   settings: LiteSettings, index: int) -> MediaPort:
        try:
            port = await WorkerMediaPort.open(addresses, plan.udp, plan.tcp, settings)
        except (OSError, ValueError) as exc:
            where = ", ".join(a.bind for a in addresses)
            error = f"cannot listen for WebRTC media on {where} {plan.describe()}: {exc}"
            log.error("worker %d: %s; every call placed on this worker is released "
                      "\"media port unavailable\" until it restarts with the port free",
                      index, error)
            return cls(plan, None, error, settings)
        log.info("worker %d: WebRTC media on %s (ICE-lite, consent %g s); %s", index,
                 plan.describe(), settings.consent_timeout, packet_path(port, settings))
        return cls(plan, port, "", settings)

    def refusal(self, tcp_only: bool) -> Event | None:
        """Why a call cannot be answered on this port (the event that releases it)."""
        if self.port is None:
            return Event.MEDIA_PORT_DOWN
        if tcp_only and not self.plan.tcp:
            return Event.NO_TCP
        return None

    async def attach(self, pc: RTCPeerConnection, *, tcp_only: bool) -> list[LiteConnection]:
        """Put `pc`'s ICE on the port: after setRemoteDescription, before the answer."""
        assert self.port is not None
        return await use_lite_transport(pc, self.port, tcp_only=tcp_only)

    def stats(self) -> dict[str, int]:
        """The bus.WorkerStats fields of this port (none without one: their defaults)."""
        if self.port is None:
            return self._final
        raw = self.port.stats()
        return {field: int(raw[key]) for field, key in STATS_KEYS.items()}

    def native_packets(self) -> tuple[int, int]:
        """(received, sent) RTP packets the native loop relayed without Python."""
        if self.port is None:
            return self._final_native
        raw = self.port.stats()
        return int(raw["native_routed_in"]), int(raw["native_relayed"])

    def close(self) -> None:
        """At the worker's shutdown, after its calls (their connections leave the port)."""
        self._final = self.stats()
        self._final_native = self.native_packets()
        port, self.port = self.port, None
        if port is not None:
            port.close()
