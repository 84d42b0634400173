"""The browser-facing call-control protocol (PROTOCOL.md): one msgspec struct per action.

Decoding is strict about the contract and lenient about the original's sloppy JSON:
- every key must be <= 16 bytes and every string value <= 128 bytes, except the SDP
  objects (`offer`, `answer`, `ice`) and `userdata` (<= 256);
- an integer field accepts a number or a numeric string of ASCII digits (`"channel":"4"`),
  and every integer field has a range (UINT is 0..2^32-1, as the slides say), so nothing
  decode returns can overflow the MessagePack bus to the workers;
- unknown keys are ignored (clients add their own), but must still respect the limits;
- nesting is bounded (`MAX_DEPTH`) and so is the frame (`MAX_FRAME_BYTES`).
Every frame from the network is hostile until proven otherwise: `decode` raises
`ProtocolError` and nothing else, whatever the bytes, carrying the Q.850-style cause and a
causestring an operator can read; the caller turns it into a `release` and keeps the
connection up.
Encoding always emits clean JSON with `"action"` first and no null fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, UnsetType

MAX_KEY_BYTES = 16
MAX_VALUE_BYTES = 128
MAX_USERDATA_BYTES = 256
MAX_FRAME_BYTES = 64 * 1024  # an SDP with many codecs and candidates stays far below this
# A legitimate frame nests three deep (frame > offer > its fields); anything far deeper is
# an attack on the parser's recursion (msgspec raises RecursionError near ~1000 levels).
MAX_DEPTH = 16
MAX_CAUSESTRING_BYTES = MAX_VALUE_BYTES  # our own releases keep the limits we impose
# Values that are not subject to the 128-byte limit (PROTOCOL.md "Message format").
_SDP_KEYS = frozenset({"offer", "answer", "ice"})
_LONG_VALUE_LIMITS = {"userdata": MAX_USERDATA_BYTES}
_SHORT_FIELD_LIMITS = {
    "ua_family": 64, "ua_version": 64, "ua_os": 64, "suid": 64, "module": 6, "token": 64,
}

# Integer ranges. UINT is the slides' unsigned 32-bit integer. A roomkey is issued by AP-S,
# which docs/aps-api.md lets use any integer that fits in 63 bits (the reference AP-S uses
# 12 digits); the appliance's AP-S client accepts the same range.
MAX_UINT = 2**32 - 1
MAX_ROOMKEY = 2**63 - 1
# caller/callee are "UINT" in the slides too, but they are phone numbers: the SIP From/To
# user parts. A 32-bit bound would refuse a customer's mobile number in international
# form (886912345678), so they get E.164's 15 digits (docs/decisions/0004).
MAX_PHONE_NUMBER = 10**15 - 1
MAX_LIFETIME_S = 86400  # a call longer than a day is a mistake, not a call
MAX_CAUSE = 127  # Q.850 causes are 7 bits
UInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_UINT)]
RoomKey = Annotated[int, msgspec.Meta(ge=0, le=MAX_ROOMKEY)]
PhoneNumber = Annotated[int, msgspec.Meta(ge=0, le=MAX_PHONE_NUMBER)]
Lifetime = Annotated[int, msgspec.Meta(ge=0, le=MAX_LIFETIME_S)]
Cause = Annotated[int, msgspec.Meta(ge=0, le=MAX_CAUSE)]
Flag = Annotated[int, msgspec.Meta(ge=0, le=1)]
MLineIndex = Annotated[int, msgspec.Meta(ge=0, le=65535)]

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
        causestring = _clip(causestring, MAX_CAUSESTRING_BYTES)
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
    sdpMLineIndex: MLineIndex | UnsetType = UNSET


class _Action(msgspec.Struct, tag_field="action"):
    """Base of every action: the call is identified by dialogid + ref.

    Optional fields default to UNSET, which msgspec never encodes, so a frame carries
    exactly the fields that were set (no nulls) while every set field, zero included,
    is written.
    """

    dialogid: UInt | UnsetType = UNSET
    ref: UInt | UnsetType = UNSET
    direction: ClassVar[str] = "both"


class Offer(_Action, tag="offer"):
    direction: ClassVar[str] = "to_ms"
    medium: UInt = 0
    ua_family: str = ""
    ua_version: str = ""
    ua_os: str = ""
    offer: SessionDescription | UnsetType = UNSET
    caller: PhoneNumber | UnsetType = UNSET
    callee: PhoneNumber | UnsetType = UNSET
    suid: str | UnsetType = UNSET
    uuid: str | UnsetType = UNSET
    userdata: str | UnsetType = UNSET
    roomkey: RoomKey | UnsetType = UNSET
    record: Flag = 0
    nickname: str | UnsetType = UNSET
    module: str = "User"
    lifetime: Lifetime = 0
    audio: str | UnsetType = UNSET
    protocol: str | UnsetType = UNSET
    location_ip: str | UnsetType = UNSET
    # The agent's credential (appliance/core/agent_token.py): AP-S issues it with the roomkey;
    # with `[aps] require_agent_token` an Agent offer without a valid one is refused.
    token: str | UnsetType = UNSET


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
    channel: UInt = 0
    ice: IceCandidate | UnsetType = UNSET


class DTLSconnect(_Action, tag="DTLSconnect"):
    direction: ClassVar[str] = "from_ms"
    channel: int = 0
    medium: str = "audio"


class Release(_Action, tag="release"):
    channel: UInt = 0
    cause: Cause = CAUSE_NORMAL
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
    channel: UInt = 0
    peerchannel: UInt = 0
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
    channel: UInt = 0
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
    """dialogid/ref as the frame carries them (a number or a numeric string), to echo in a
    refusal; None unless it is a valid UINT."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)  # isascii: "²".isdigit() is true, but int() refuses it
    if isinstance(value, int) and 0 <= value <= MAX_UINT:
        return value
    return None


def _clip(text: str, limit: int) -> str:
    """`text` cut to `limit` UTF-8 bytes, and always encodable (no lone surrogates)."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw.decode()
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def _too_deep(frame: dict[str, Any]) -> bool:
    """True if any container nests deeper than MAX_DEPTH (iterative: no recursion to blow)."""
    stack: list[tuple[Any, int]] = [(frame, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


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
    """Parse one WebSocket frame from a browser or app into its action struct.

    Raises `ProtocolError` and nothing else, for any input: a frame is the sender's
    problem, never the connection's."""
    try:
        return _decode(data)
    except ProtocolError:
        raise
    except Exception as exc:  # the last line of defence, see the docstring
        # Every failure we know of has its own causestring; this one means a new kind of
        # hostile frame (the fuzz tests assert it never happens), still only a bad frame.
        raise ProtocolError(
            CAUSE_INVALID_MESSAGE, f"undecodable frame ({type(exc).__name__})"
        ) from None


def _decode(data: bytes | str) -> Action:
    if isinstance(data, str):
        if len(data) > MAX_FRAME_BYTES:  # each character is at least one byte
            raise ProtocolError(
                CAUSE_INVALID_MESSAGE, f"frame too large (> {MAX_FRAME_BYTES} bytes)"
            )
        try:
            data = data.encode()
        except UnicodeEncodeError:
            raise ProtocolError(CAUSE_INVALID_MESSAGE, "malformed text: lone surrogate") from None
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(
            CAUSE_INVALID_MESSAGE, f"frame too large ({len(data)} > {MAX_FRAME_BYTES} bytes)"
        )
    try:
        frame = _json_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError too: a number out of float range
        raise ProtocolError(CAUSE_INVALID_MESSAGE, f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ProtocolError(CAUSE_INVALID_MESSAGE, "malformed JSON: invalid UTF-8") from None
    except RecursionError:
        raise ProtocolError(
            CAUSE_INVALID_MESSAGE, f"malformed JSON: nested deeper than {MAX_DEPTH}"
        ) from None
    if not isinstance(frame, dict):
        raise ProtocolError(CAUSE_INVALID_MESSAGE, "a frame must be a JSON object")
    dialogid = _as_uint(frame.get("dialogid"))
    ref = _as_uint(frame.get("ref"))
    if _too_deep(frame):
        raise ProtocolError(
            CAUSE_INVALID_MESSAGE, f"malformed JSON: nested deeper than {MAX_DEPTH}", dialogid,
            ref,
        )
    _check_limits(frame, dialogid, ref)
    action = frame.get("action")
    if action is None:
        raise ProtocolError(CAUSE_MANDATORY_IE_MISSING, "missing 'action'", dialogid, ref)
    if not isinstance(action, str):
        raise ProtocolError(
            CAUSE_INVALID_IE_CONTENTS,
            f"'action' must be a string, not {_json_type(action)}",
            dialogid,
            ref,
        )
    if action not in INBOUND_ACTIONS:
        known = "known" if action in ACTIONS else "unknown"
        raise ProtocolError(
            CAUSE_MESSAGE_TYPE_NONEXISTENT,
            f"{known} action '{action}' is not accepted from a client",
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
            CAUSE_INVALID_IE_CONTENTS, f"{action}: {_field_problem(exc)}", dialogid, ref
        ) from None
    _check_semantics(msg)
    return msg


_AT_FIELD = re.compile(r"^(?P<what>.*) - at `\$\.(?P<field>[^`]+)`$", re.DOTALL)


def _field_problem(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int` <= 4294967295 - at `$.dialogid`" as "'dialogid': Expected
    `int` <= 4294967295": the field first, so a truncated causestring still names it."""
    text = str(exc)
    match = _AT_FIELD.match(text)
    return f"'{match['field']}': {match['what']}" if match else text


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _check_semantics(msg: Action) -> None:
    """Rules msgspec's types cannot say (the integer ranges are in the field types)."""
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
