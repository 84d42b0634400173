"""The small SDP (RFC 4566 / RFC 3264 offer-answer) the SIP leg needs: one audio stream,
PCMU plus RFC 4733 telephone-events.

We offer in the INVITE and read the desk phone's answer (in a 183 for early media, in the
200), then answer whatever the phone re-offers later (hold with sendonly / inactive /
c=0.0.0.0, a new address after a transfer) from the same codec set.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
HOLD_ADDRESSES = ("0.0.0.0", "::")

# What the answerer says back to each offered direction (RFC 3264 §6.1), when it is
# itself willing to send and receive.
_ANSWER_DIRECTION = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}

_RTPMAP_RE = re.compile(r"([0-9]{1,3})\s+([^/\s]+)/([0-9]+)(?:/([0-9]+))?")


class SdpError(ValueError):
    pass


@dataclass
class Codec:
    payload_type: int
    name: str
    clock_rate: int
    channels: int | None = None
    fmtp: str | None = None

    def same_format(self, other: Codec) -> bool:
        return self.name.lower() == other.name.lower() and self.clock_rate == other.clock_rate


# Static payload types (RFC 3551) a peer may use without an rtpmap line.
_STATIC = {
    0: Codec(0, "PCMU", 8000),
    8: Codec(8, "PCMA", 8000),
    9: Codec(9, "G722", 8000),
    18: Codec(18, "G729", 8000),
}


@dataclass
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None = None
    direction: str | None = None  # None: as the session level says
    codecs: dict[int, Codec] = field(default_factory=dict)
    ptime: int | None = None

    @property
    def payload_types(self) -> list[int]:
        return [int(f) for f in self.formats if f.isdigit()]

    def codec(self, payload_type: int) -> Codec | None:
        return self.codecs.get(payload_type) or _STATIC.get(payload_type)

    @property
    def telephone_event_pt(self) -> int | None:
        for pt in self.payload_types:
            codec = self.codec(pt)
            if codec is not None and codec.name.lower() == "telephone-event":
                return pt
        return None


@dataclass
class SessionDescription:
    origin: str
    session_name: str
    connection: str | None
    direction: str
    media: list[MediaDescription]

    @property
    def audio(self) -> MediaDescription | None:
        for m in self.media:
            if m.media == "audio" and m.port != 0:
                return m
        return None

    def address_of(self, media: MediaDescription) -> str | None:
        return media.connection or self.connection

    def direction_of(self, media: MediaDescription) -> str:
        return media.direction or self.direction


@dataclass(frozen=True)
class AudioEndpoint:
    """The far end's audio, as the media plane needs it."""

    address: str
    port: int
    payload_types: list[int]
    codecs: dict[int, Codec]
    telephone_event_pt: int | None
    direction: str
    ptime: int | None

    @property
    def on_hold(self) -> bool:
        """The peer will not receive from us (RFC 3264 §8.4, and RFC 2543's c=0.0.0.0)."""
        return self.address in HOLD_ADDRESSES or self.direction in ("sendonly", "inactive")


def _connection_address(value: str) -> str:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"bad c= line: {value[:60]!r}")
    return parts[2].split("/", 1)[0]  # drop a multicast TTL


def parse_sdp(text: str) -> SessionDescription:
    origin = session_name = ""
    connection: str | None = None
    direction = "sendrecv"
    media: list[MediaDescription] = []
    seen_version = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"bad SDP line: {line[:60]!r}")
        kind, value = line[0], line[2:]
        current = media[-1] if media else None
        if kind == "v":
            if value.strip() != "0":
                raise SdpError("unsupported SDP version")
            seen_version = True
        elif kind == "o":
            origin = value
        elif kind == "s":
            session_name = value
        elif kind == "c":
            address = _connection_address(value)
            if current is None:
                connection = address
            else:
                current.connection = address
        elif kind == "m":
            media.append(_parse_m_line(value))
        elif kind == "a":
            name, _, arg = value.partition(":")
            if name in DIRECTIONS:
                if current is None:
                    direction = name
                else:
                    current.direction = name
            elif current is not None:
                _media_attribute(current, name, arg)
    if not seen_version:
        raise SdpError("no v= line")
    return SessionDescription(origin, session_name, connection, direction, media)


def _parse_m_line(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 3:
        raise SdpError(f"bad m= line: {value[:60]!r}")
    port_text = parts[1].split("/", 1)[0]
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise SdpError(f"bad media port: {parts[1][:20]!r}")
    return MediaDescription(parts[0], int(port_text), parts[2], parts[3:])


def _media_attribute(media: MediaDescription, name: str, arg: str) -> None:
    if name == "rtpmap":
        match = _RTPMAP_RE.fullmatch(arg.strip())
        if match is None:
            raise SdpError(f"bad rtpmap: {arg[:60]!r}")
        pt = int(match.group(1))
        channels = int(match.group(4)) if match.group(4) else None
        fmtp = media.codecs[pt].fmtp if pt in media.codecs else None
        media.codecs[pt] = Codec(pt, match.group(2), int(match.group(3)), channels, fmtp)
    elif name == "fmtp":
        pt_text, _, params = arg.strip().partition(" ")
        if pt_text.isascii() and pt_text.isdigit():
            pt = int(pt_text)
            codec = media.codecs.get(pt) or _STATIC.get(pt)
            if codec is not None:
                media.codecs[pt] = Codec(
                    pt, codec.name, codec.clock_rate, codec.channels, params.strip()
                )
    elif name == "ptime" and arg.strip().isascii() and arg.strip().isdigit():
        media.ptime = int(arg.strip())


def audio_endpoint(sdp: str | SessionDescription) -> AudioEndpoint:
    """The audio address, port, codecs and direction of an answer or offer."""
    session = parse_sdp(sdp) if isinstance(sdp, str) else sdp
    audio = session.audio
    if audio is None:
        raise SdpError("no active audio stream")
    address = session.address_of(audio)
    if address is None:
        raise SdpError("no connection address for the audio stream")
    return AudioEndpoint(
        address=address,
        port=audio.port,
        payload_types=audio.payload_types,
        codecs={pt: c for pt in audio.payload_types if (c := audio.codec(pt)) is not None},
        telephone_event_pt=audio.telephone_event_pt,
        direction=session.direction_of(audio),
        ptime=audio.ptime,
    )


def _ip_kind(address: str) -> str:
    return "IP6" if ":" in address else "IP4"


def build_offer(
    address: str,
    port: int,
    *,
    session_id: int | None = None,
    session_version: int = 1,
    username: str = "-",
    session_name: str = "-",
    telephone_event_pt: int = 101,
    ptime: int = 20,
    direction: str = "sendrecv",
) -> str:
    """Our offer: PCMU and telephone-event 0-16 on one audio stream."""
    if direction not in DIRECTIONS:
        raise ValueError(f"bad direction {direction!r}")
    sid = session_id if session_id is not None else secrets.randbits(62)
    kind = _ip_kind(address)
    lines = [
        "v=0",
        f"o={username} {sid} {session_version} IN {kind} {address}",
        f"s={session_name}",
        f"c=IN {kind} {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP 0 {telephone_event_pt}",
        "a=rtpmap:0 PCMU/8000",
        f"a=rtpmap:{telephone_event_pt} telephone-event/8000",
        f"a=fmtp:{telephone_event_pt} 0-16",
        f"a=ptime:{ptime}",
        f"a={direction}",
    ]
    return "\r\n".join(lines) + "\r\n"


def build_answer(
    offer: str | SessionDescription,
    local: str | SessionDescription,
    *,
    session_version: int,
) -> str | None:
    """Answer a (re-)offer from our own SDP's address, port and codecs (RFC 3264 §6).

    Keeps one m-line per offered m-line (rejecting all but the first usable audio with port
    0), takes the offer's payload type numbers for the codecs we share, and mirrors the
    direction (an offer to hold, sendonly, gets recvonly). None: nothing in common (488).
    """
    remote = parse_sdp(offer) if isinstance(offer, str) else offer
    ours = parse_sdp(local) if isinstance(local, str) else local
    our_audio = ours.audio
    if our_audio is None:
        raise SdpError("our own SDP has no audio stream")
    our_address = ours.address_of(our_audio) or "0.0.0.0"
    our_codecs = [c for pt in our_audio.payload_types if (c := our_audio.codec(pt)) is not None]
    kind = _ip_kind(our_address)
    origin = ours.origin.split()
    username, sid = (origin[0], origin[1]) if len(origin) >= 2 else ("-", "0")
    lines = [
        "v=0",
        f"o={username} {sid} {session_version} IN {kind} {our_address}",
        f"s={ours.session_name or '-'}",
        f"c=IN {kind} {our_address}",
        "t=0 0",
    ]
    accepted = False
    for m in remote.media:
        shared = [] if accepted or m.media != "audio" or m.port == 0 else _shared(m, our_codecs)
        if not shared:
            fmt = m.formats[0] if m.formats else "0"
            lines.append(f"m={m.media} 0 {m.proto} {fmt}")
            continue
        accepted = True
        formats = " ".join(str(c.payload_type) for c in shared)
        lines.append(f"m=audio {our_audio.port} {m.proto} {formats}")
        for codec in shared:
            channels = f"/{codec.channels}" if codec.channels else ""
            lines.append(f"a=rtpmap:{codec.payload_type} {codec.name}/{codec.clock_rate}{channels}")
            if codec.fmtp:
                lines.append(f"a=fmtp:{codec.payload_type} {codec.fmtp}")
        if our_audio.ptime:
            lines.append(f"a=ptime:{our_audio.ptime}")
        lines.append(f"a={_answer_direction(remote, m, ours.direction_of(our_audio))}")
    if not accepted:
        return None
    return "\r\n".join(lines) + "\r\n"


def _shared(offered: MediaDescription, ours: list[Codec]) -> list[Codec]:
    """Offered codecs we also have, in the offer's order and numbering; telephone-event
    alone is no audio codec, so it does not make a stream acceptable."""
    shared: list[Codec] = []
    for pt in offered.payload_types:
        theirs = offered.codec(pt)
        if theirs is None:
            continue
        mine = next((c for c in ours if c.same_format(theirs)), None)
        if mine is not None:
            shared.append(Codec(pt, mine.name, mine.clock_rate, mine.channels, mine.fmtp))
    if all(c.name.lower() == "telephone-event" for c in shared):
        return []
    return shared


def _answer_direction(remote: SessionDescription, m: MediaDescription, ours: str) -> str:
    offered = remote.direction_of(m)
    if remote.address_of(m) in HOLD_ADDRESSES and offered in ("sendrecv", "sendonly"):
        offered = "sendonly"  # RFC 2543 hold: it will not receive, whatever it says
    wanted = _ANSWER_DIRECTION.get(offered, "sendrecv")
    # Intersect with what we ourselves are willing to do.
    we_send = ours in ("sendrecv", "sendonly") and wanted in ("sendrecv", "sendonly")
    we_recv = ours in ("sendrecv", "recvonly") and wanted in ("sendrecv", "recvonly")
    return {
        (True, True): "sendrecv",
        (True, False): "sendonly",
        (False, True): "recvonly",
        (False, False): "inactive",
    }[(we_send, we_recv)]


class LocalSdp:
    """Our side of the SDP over one call: the o= version goes up whenever what we send
    changes (RFC 3264 §8), and stays when we send the same description again."""

    def __init__(self, sdp: str) -> None:
        self.session = parse_sdp(sdp)
        if self.session.audio is None:
            raise SdpError("the local SDP needs an audio stream")
        self._current = sdp
        # What we offer when asked for an offer: our own description, sendrecv.
        self._wanted = _sendrecv(sdp)
        origin = self.session.origin.split()
        self._version = int(origin[2]) if len(origin) >= 3 and origin[2].isdigit() else 0

    @property
    def current(self) -> str:
        """Our last SDP: the offer to put in a 2xx when a re-INVITE carries none."""
        return self._current

    def offer(self) -> str:
        """A fresh offer, for a re-INVITE (or UPDATE) that carries none.

        RFC 6337 §5.3: the offer says what we want, not what the last exchange left. That is
        always sendrecv with our address, port and codecs: repeating the `recvonly` of our
        answer to a hold would have the PBX answer `sendonly`, and the call would stay on
        hold towards the phone after the PBX meant to resume it. The o= version goes up
        when this differs from what we sent last."""
        candidate = _with_version(self._wanted, self._version)
        if _without_origin(candidate) != _without_origin(self._current):
            self._version += 1
            candidate = _with_version(self._wanted, self._version)
        self._current = candidate
        return candidate

    def answer(self, offer: str) -> str | None:
        """Our answer to a re-offer (None when nothing is in common, i.e. 488)."""
        candidate = build_answer(offer, self.session, session_version=self._version)
        if candidate is None:
            return None
        if _without_origin(candidate) != _without_origin(self._current):
            self._version += 1
            candidate = build_answer(offer, self.session, session_version=self._version)
            assert candidate is not None
        self._current = candidate
        return candidate


def _sendrecv(sdp: str) -> str:
    """`sdp` with every direction attribute made sendrecv (and the line ends CRLF)."""
    lines = [
        "a=sendrecv" if line.strip() in {f"a={d}" for d in DIRECTIONS} else line
        for line in sdp.replace("\r\n", "\n").split("\n")
        if line.strip()
    ]
    return "\r\n".join(lines) + "\r\n"


def _with_version(sdp: str, version: int) -> str:
    """`sdp` with `version` as the o= line's session version (RFC 4566 §5.2)."""
    lines = sdp.split("\r\n")
    for i, line in enumerate(lines):
        fields = line[2:].split(" ")
        if line.startswith("o=") and len(fields) >= 3:
            fields[2] = str(version)
            lines[i] = "o=" + " ".join(fields)
            break
    return "\r\n".join(lines)


def _without_origin(sdp: str) -> str:
    return "\n".join(line for line in sdp.splitlines() if not line.startswith("o="))
