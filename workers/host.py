"""The narrow interfaces between a media worker and the calls it hosts.

The worker is the host: it owns the bus to the supervisor, the AP-S client, the SIP port
and the per-worker counters. A WebRTC leg sees it only as a `LegHost`, a call as a
`CallHost` (the way the SIP leg sees its call as a `SipLegOwner`); the worker sees each of
its calls only as a `Call`. `Worker` implements the hosts structurally. This module imports
no call module, so every call module may import it and none needs `workers.worker`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from appliance.core import protocol as p
from appliance.core.config import Config
from appliance.edges import bus
from appliance.edges.aps_client import VerifyResult
from appliance.edges.rtc_adapter import CandidatePolicy
from appliance.sip.endpoint import SipEndpoint
from workers.media_port import MediaPort


class Relayed(NamedTuple):
    """RTP packets a leg's fast path took from its browser and sent to it."""

    received: int = 0
    sent: int = 0


class Call(Protocol):
    """One channel's call, as the worker drives it."""

    @property
    def channel(self) -> int: ...
    @property
    def conn(self) -> int: ...  # the client connection the call belongs to

    def start(self) -> None: ...
    def client_action(self, action: p.Action) -> None: ...
    def connection_closed(self) -> None: ...
    def shutdown(self) -> None: ...
    async def wait_closed(self) -> None: ...
    def relayed(self) -> Relayed: ...  # what its live legs relayed so far


class LegHost(Protocol):
    """What one browser's WebRTC leg asks of the worker."""

    @property
    def config(self) -> Config: ...
    @property
    def candidate_policy(self) -> CandidatePolicy: ...
    @property
    def media_port(self) -> MediaPort | None: ...  # None: each call binds its own sockets

    def to_client(self, conn: int, action: p.Action) -> None: ...
    def call_connected(self, channel: int, setup_ms: float) -> None: ...
    def leg_released(self, normal: bool, relayed: Relayed) -> None: ...


class CallHost(LegHost, Protocol):
    """What a call (the customer's or the agent's) asks of the worker, beyond its legs."""

    @property
    def sip_endpoint(self) -> SipEndpoint | None: ...  # None: this worker has no SIP port

    def send(self, msg: bus.ToSupervisor) -> None: ...
    async def verify(self, *, channel: int, dialogid: int, ref: int, caller: int | None,
                     callee: int | None, userdata: str, suid: str | None,
                     module: str) -> VerifyResult: ...
    async def report_record_file(self, roomkey: int, record_file: str) -> None: ...
    async def report_answered(self, roomkey: int) -> None: ...
    async def report_released(self, roomkey: int, cause: int, causestring: str,
                              recorded: bool = False) -> None: ...
    def call_ended(self, call: Call) -> None: ...  # torn down: its channel is free
