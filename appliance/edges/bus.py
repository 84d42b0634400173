"""The narrow typed channel between the supervisor and its media workers.

msgspec structs encoded as MessagePack over ZeroMQ (ROUTER in the supervisor, one DEALER
per worker whose identity is `worker_identity(index)`). JSON exists only at the browser
edge; here the protocol structs travel already parsed.
"""

from __future__ import annotations

import msgspec

from appliance.core import protocol
from appliance.sip.snapshot import DialogSnapshot


class _Msg(msgspec.Struct, tag_field="t", array_like=True):
    pass


# -- supervisor -> worker ---------------------------------------------------------------


class StartCall(_Msg, tag="start"):
    """A validated `offer` placed on this worker's `channel`, from WebSocket `conn`."""

    conn: int
    channel: int
    offer: protocol.Offer


class ClientAction(_Msg, tag="client"):
    """ice / release / peerdata / DTMF from the browser for a call on `channel`."""

    conn: int
    channel: int
    action: protocol.Action


class ConnectionClosed(_Msg, tag="closed"):
    """The browser's WebSocket went away: its calls are released at once."""

    conn: int
    channels: list[int]


class DuplicateLogin(_Msg, tag="dup_login"):
    """A peer appliance says this room's customer logged in again there (Flow 3): show
    `message` to both parties of the room."""

    roomkey: int
    message: str


class Shutdown(_Msg, tag="shutdown"):
    cause: int
    causestring: str


class ByeDialogs(_Msg, tag="bye_dialogs"):
    """The confirmed SIP dialogs of this worker's dead predecessor: send each a BYE (from
    the same SIP port) so no desk phone stays in a call nobody carries."""

    dialogs: list[DialogSnapshot]


# -- worker -> supervisor ---------------------------------------------------------------


class Hello(_Msg, tag="hello"):
    index: int
    pid: int


class ToClient(_Msg, tag="to_client"):
    conn: int
    action: protocol.Action


class RoomOpened(_Msg, tag="room"):
    """The User call on `channel` owns `roomkey`: the Agent leg must land on this worker."""

    channel: int
    roomkey: int


class NotifyPeer(_Msg, tag="notify_peer"):
    """AP-S's verify answer carried a duplicate-login notify: appliance `ms` holds the
    identity's earlier call `roomkey`. The supervisor passes it on; the call never waits."""

    ms: str
    roomkey: int
    message: str


class CallConnected(_Msg, tag="connected"):
    """The leg on `channel` is DTLS-connected: its setup is over (admission control counts
    calls in setup per client)."""

    channel: int


class ChannelFreed(_Msg, tag="freed"):
    channel: int


class DialogUp(_Msg, tag="dialog_up"):
    """A confirmed SIP dialog of worker `index` (new, or its CSeq/target/routes changed):
    what a BYE needs if the worker dies (appliance/sip/snapshot.py)."""

    index: int
    snapshot: DialogSnapshot


class DialogDown(_Msg, tag="dialog_down"):
    """The dialog `call_id` of worker `index` is over: nothing to BYE any more."""

    index: int
    call_id: str


class ShutdownDone(_Msg, tag="shutdown_done"):
    index: int


class RecordingEnded(_Msg, tag="recording_ended"):
    """A recorded call hung up: its captures are complete, the Convertor may run."""

    job_path: str


class WorkerStats(_Msg, tag="stats"):
    """A worker's health, twice a second: what /metrics and `appliance status` show, and the
    heartbeat the supervisor judges the worker alive by (supervisor/liveness.py)."""

    index: int
    pid: int
    calls: int  # live legs on this worker
    calls_placed: int
    calls_failed: int  # ended by anything but a normal hang-up
    loop_lag_p50_ms: float
    loop_lag_p99_ms: float
    packets_received: int  # relayed RTP in from browsers (cumulative)
    packets_sent: int  # relayed RTP out to browsers (cumulative)
    decoders_created: int  # media decoders aiortc created: must stay 0
    # SIP datagrams refused (source not allowed), unparsable, and answers held back by the
    # rate limit, since the worker started (appliance/sip/agent.py).
    sip_refused_source: int = 0
    sip_parse_errors: int = 0
    sip_replies_limited: int = 0
    # Media datagrams dropped since the worker started (appliance/media/datagrams.py):
    # phone-side RTP/RTCP not from the SDP's address, empty or > 1500 B, failed SRTP
    # unprotect, and those a handler could not use.
    rtp_refused_source: int = 0
    media_oversized: int = 0
    media_unprotect_failed: int = 0
    media_malformed: int = 0
    # The worker's one WebRTC media port (media.udp_port, issue 12), since it opened; all 0
    # without one: connectivity checks answered, calls released because their browser
    # stopped checking (RFC 7675 consent), ICE-TCP connections accepted, and media frames
    # dropped whole towards TCP readers too slow for their send buffer.
    ice_checks: int = 0
    ice_consent_failures: int = 0
    ice_tcp_connections: int = 0
    ice_tcp_drops: int = 0
    ice_tcp_refused: int = 0  # connections over media.tcp_max_connections / _per_address
    native_loop: int = 0  # 1 while appliance.native's loop drains the worker's UDP port


ToWorker = StartCall | ClientAction | ConnectionClosed | DuplicateLogin | Shutdown | ByeDialogs
ToSupervisor = (
    Hello | ToClient | RoomOpened | NotifyPeer | ChannelFreed | ShutdownDone | WorkerStats
    | RecordingEnded | CallConnected | DialogUp | DialogDown
)

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_supervisor = msgspec.msgpack.Decoder(ToSupervisor)


def encode(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_to_supervisor(data: bytes) -> ToSupervisor:
    return _to_supervisor.decode(data)


def worker_identity(index: int) -> bytes:
    return f"w{index}".encode()
