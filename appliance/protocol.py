"""The browser-facing call-control protocol (PROTOCOL.md): one msgspec struct per action.

Decoding is strict about the contract and lenient about the original's sloppy JSON:
- every key must be <= 16 bytes and every string value <= 128 bytes, except the SDP
  objects (`offer`, `answer`, `ice`) and `userdata` (<= 256);
- an integer field accepts a number or a numeric string (`"channel":"4"`);
- unknown keys are ignored (clients add their own), but must still respect the limits.
Every problem raises `ProtocolError` carrying the Q.850-style cause and a causestring an
operator can read; the caller turns it into a `release` and keeps the connection up.
Encoding always emits clean JSON with `"action"` first and no null fields.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, UnsetType

MAX_KEY_BYTES = 16
MAX_VALUE_BYTES = 128
MAX_USERDATA_BYTES = 256
MAX_FRAME_BYTES = 64 * 1024  # an SDP with many codecs and candidates stays far below this
# Values that are not subject to the 128-byte limit (PROTOCOL.md "Message format").
_SDP_KEYS = frozenset({"offer", "answer", "ice"})
_LONG_VALUE_LIMITS = {"userdata": MAX_USERDATA_BYTES}
_SHORT_FIELD_LIMITS = {"ua_family": 64, "ua_version": 64, "ua_os": 64, "suid": 64, "module": 6}

# Q.850 causes used for protocol errors; the causestring names the exact problem.
CAUSE_NORMAL = 16
CAUSE_USER_BUSY = 17
CAUSE_NO_ANSWER = 19
CAUSE_CALL_REJECTED = 21
CAUSE_NO_CIRCUIT = 34
CAUSE_NETWORK_OUT_OF_ORDER = 38
CAUSE_TEMPORARY_FAILURE = 41
CAUSE_INVALID_MESSAGE = 95
CAUSE_MANDATORY_IE_MISSING = 96
CAUSE_MESSAGE_TYPE_NONEXISTENT = 97
CAUSE_MESSAGE_NOT_COMPATIBLE_WITH_STATE = 98
CAUSE_INVALID_IE_CONTENTS = 100
CAUSE_RECOVERY_ON_TIMER_EXPIRY = 102


class ProtocolError(Exception):
    """A frame the appliance refuses; becomes a `release` with this cause and causestring."""

    def __init__(
        self,
        cause: int,
        causestring: str,
        dialogid: int | None = None,
        ref: int | None = None,
    ) -> None:
        super().__init__(causestring)
        self.cause = cause
        self.causestring = causestring
        self.dialogid = dialogid
        self.ref = ref


class SessionDescription(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    sdp: str


class IceCandidate(msgspec.Struct):
    candidate: str
    sdpMid: str | UnsetType = UNSET
    sdpMLineIndex: int | UnsetType = UNSET


class _Action(msgspec.Struct, tag_field="action"):
    """Base of every action: the call is identified by dialogid + ref.

    Optional fields default to UNSET, which msgspec never encodes, so a frame carries
    exactly the fields that were set (no nulls) while every set field, zero included,
    is written.
    """

    dialogid: int | UnsetType = UNSET
    ref: int | UnsetType = UNSET
    direction: ClassVar[str] = "both"


class Offer(_Action, tag="offer"):
    direction: ClassVar[str] = "to_ms"
    medium: int = 0
    ua_family: str = ""
    ua_version: str = ""
    ua_os: str = ""
    offer: SessionDescription | UnsetType = UNSET
    caller: int | UnsetType = UNSET
    callee: int | UnsetType = UNSET
    suid: str | UnsetType = UNSET
    uuid: str | UnsetType = UNSET
    userdata: str | UnsetType = UNSET
    roomkey: int | UnsetType = UNSET
    record: int = 0
    nickname: str | UnsetType = UNSET
    module: str = "User"
    lifetime: int = 0
    audio: str | UnsetType = UNSET
    protocol: str | UnsetType = UNSET
    location_ip: str | UnsetType = UNSET


class Alert(_Action, tag="alert"):
    direction: ClassVar[str] = "from_ms"
    channel: int = 0


class Answer(_Action, tag="answer"):
    direction: ClassVar[str] = "from_ms"
    channel: int = 0
    medium: int = 0
    answer: SessionDescription | UnsetType = UNSET


class Ice(_Action, tag="ice"):
    # Normally from the MS; a browser may trickle its own candidates too.
    channel: int = 0
    ice: IceCandidate | UnsetType = UNSET


class DTLSconnect(_Action, tag="DTLSconnect"):
    direction: ClassVar[str] = "from_ms"
    channel: int = 0
    medium: str = "audio"


class Release(_Action, tag="release"):
    channel: int = 0
    cause: int = CAUSE_NORMAL
    causestring: str = "normal release"


class RecordStatus(_Action, tag="record_status"):
    direction: ClassVar[str] = "from_ms"
    channel: int = 0
    medium: int = 0
    status: str = "start"
    record_file: str = ""


class _Quality(_Action):
    direction: ClassVar[str] = "from_ms"
    channel: int = 0
    width: int = 0
    height: int = 0
    REMB: int = 0
    framerate: int = 0
    audio_bitrate: int = 0
    video_bitrate: int = 0
    jitter: int = 0
    packetloss: int = 0


class MyResolution(_Quality, tag="my_resolution"):
    pass


class PeerResolution(_Quality, tag="peer_resolution"):
    pass


class PeerData(_Action, tag="peerdata"):
    channel: int = 0
    peerchannel: int = 0
    type: str = "indication"
    medium: str = "audio"
    peerdata: str = ""
    value: str = ""
    nickname: str = ""
    userid: str = ""


class Message(_Action, tag="message"):
    direction: ClassVar[str] = "from_ms"
    channel: int = 0
    message: str = ""
    level: Literal["info", "notify", "warning", "error"] = "info"
    position: Literal["top", "bottom", "middle"] = "top"
    displaytime: int = 5


class DTMF(_Action, tag="DTMF"):
    channel: int = 0
    value: str = ""


Action = (
    Offer
    | Alert
    | Answer
    | Ice
    | DTLSconnect
    | Release
    | RecordStatus
    | MyResolution
    | PeerResolution
    | PeerData
    | Message
    | DTMF
)
ACTIONS: dict[str, type[_Action]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        Offer,
        Alert,
        Answer,
        Ice,
        DTLSconnect,
        Release,
        RecordStatus,
        MyResolution,
        PeerResolution,
        PeerData,
        Message,
        DTMF,
    )
}
# What a browser or app may send; the rest are the MS's to send.
INBOUND_ACTIONS = frozenset({"offer", "ice", "release", "peerdata", "DTMF"})
# Fields that must be present in the frame itself (a default is not enough).
MANDATORY_FIELDS: dict[str, tuple[str, ...]] = {
    "offer": ("dialogid", "ref", "medium", "ua_family", "ua_version", "ua_os", "offer"),
    "ice": ("dialogid", "ref", "ice"),
    "release": ("dialogid", "ref"),
    "peerdata": ("dialogid", "ref", "peerdata"),
    "DTMF": ("dialogid", "ref", "value"),
}
DTMF_KEYS = frozenset("0123456789*#")

_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()


def _as_uint(value: Any) -> int | None:
    """The original's integer fields come as numbers or numeric strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


def _check_limits(frame: dict[str, Any], dialogid: int | None, ref: int | None) -> None:
    for key, value in frame.items():
        if len(key.encode()) > MAX_KEY_BYTES:
            raise ProtocolError(
                CAUSE_INVALID_IE_CONTENTS,
                f"key '{key[:20]}' too long ({len(key.encode())} > {MAX_KEY_BYTES} bytes)",
                dialogid,
                ref,
            )
        if key in _SDP_KEYS:
            continue
        limit = _LONG_VALUE_LIMITS.get(key, _SHORT_FIELD_LIMITS.get(key, MAX_VALUE_BYTES))
        if isinstance(value, str):
            size = len(value.encode())
        elif isinstance(value, dict | list):
            size = len(_json_encoder.encode(value))
        else:
            continue
        if size > limit:
            raise ProtocolError(
                CAUSE_INVALID_IE_CONTENTS,
                f"value of '{key}' too long ({size} > {limit} bytes)",
                dialogid,
                ref,
            )


def decode(data: bytes | str) -> Action:
    """Parse one WebSocket frame from a browser or app into its action struct."""
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(
            CAUSE_INVALID_MESSAGE, f"frame too large ({len(data)} > {MAX_FRAME_BYTES} bytes)"
        )
    try:
        frame = _json_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(CAUSE_INVALID_MESSAGE, f"malformed JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError(CAUSE_INVALID_MESSAGE, "a frame must be a JSON object")
    dialogid = _as_uint(frame.get("dialogid"))
    ref = _as_uint(frame.get("ref"))
    _check_limits(frame, dialogid, ref)
    action = frame.get("action")
    if action is None:
        raise ProtocolError(CAUSE_MANDATORY_IE_MISSING, "missing 'action'", dialogid, ref)
    if not isinstance(action, str) or action not in INBOUND_ACTIONS:
        what = action if isinstance(action, str) else type(action).__name__
        known = "known" if action in ACTIONS else "unknown"
        raise ProtocolError(
            CAUSE_MESSAGE_TYPE_NONEXISTENT,
            f"{known} action '{what}' is not accepted from a client",
            dialogid,
            ref,
        )
    for field in MANDATORY_FIELDS.get(action, ()):
        if field not in frame:
            raise ProtocolError(
                CAUSE_MANDATORY_IE_MISSING,
                f"{action}: missing mandatory field '{field}'",
                dialogid,
                ref,
            )
    try:
        msg = msgspec.convert(frame, type=Action, strict=False)
    except msgspec.ValidationError as exc:
        raise ProtocolError(
            CAUSE_INVALID_IE_CONTENTS, f"{action}: {exc}", dialogid, ref
        ) from None
    _check_semantics(msg)
    return msg


def _check_semantics(msg: Action) -> None:
    """Rules msgspec's types cannot say."""
    for name in ("dialogid", "ref"):
        value = getattr(msg, name)
        if value is not UNSET and value < 0:
            raise ProtocolError(
                CAUSE_INVALID_IE_CONTENTS, f"'{name}' must be an unsigned integer", msg.dialogid,
                msg.ref,
            )
    if isinstance(msg, Offer):
        if msg.medium not in (0, 2):
            raise ProtocolError(
                CAUSE_INVALID_IE_CONTENTS,
                f"offer: medium must be 0 (audio) or 2 (video), not {msg.medium}",
                msg.dialogid,
                msg.ref,
            )
        if msg.module not in ("User", "Agent"):
            raise ProtocolError(
                CAUSE_INVALID_IE_CONTENTS,
                f"offer: module must be 'User' or 'Agent', not '{msg.module}'",
                msg.dialogid,
                msg.ref,
            )
        if msg.offer is UNSET or msg.offer.type != "offer" or not msg.offer.sdp.startswith("v=0"):
            raise ProtocolError(
                CAUSE_INVALID_IE_CONTENTS, "offer: 'offer' must be {type: offer, sdp: v=0...}",
                msg.dialogid, msg.ref,
            )
        if msg.module == "Agent" and msg.roomkey is UNSET:
            raise ProtocolError(
                CAUSE_MANDATORY_IE_MISSING, "offer: module Agent needs a roomkey",
                msg.dialogid, msg.ref,
            )
        if msg.audio is not UNSET and msg.audio.upper() not in ("PCMU", "OPUS"):
            raise ProtocolError(
                CAUSE_INVALID_IE_CONTENTS, f"offer: audio must be PCMU or OPUS, not '{msg.audio}'",
                msg.dialogid, msg.ref,
            )
    elif isinstance(msg, DTMF) and (len(msg.value) != 1 or msg.value not in DTMF_KEYS):
        raise ProtocolError(
            CAUSE_INVALID_IE_CONTENTS, f"DTMF: value must be one of 0-9 * #, not '{msg.value}'",
            msg.dialogid, msg.ref,
        )


def encode(msg: Action) -> bytes:
    """Clean JSON for the wire: action first, no nulls."""
    return _json_encoder.encode(msg)


def release_for(err: ProtocolError, channel: int = 0) -> Release:
    return Release(
        dialogid=UNSET if err.dialogid is None else err.dialogid,
        ref=UNSET if err.ref is None else err.ref,
        channel=channel,
        cause=err.cause,
        causestring=err.causestring,
    )


def medium_name(medium: int) -> str:
    """DTLSconnect and peerdata name the medium; offer and answer number it."""
    return "video" if medium == 2 else "audio"
