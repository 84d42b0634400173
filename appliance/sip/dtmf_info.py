"""DTMF as SIP INFO (application/dtmf-relay, and the bare application/dtmf), for PBXes
configured for it instead of RFC 4733 telephone-events on RTP."""

from __future__ import annotations

from .message import SipRequest, content_type

DTMF_KEYS = "0123456789*#ABCD"
DTMF_RELAY = "application/dtmf-relay"

# Some PBXes send the event code instead of the key (RFC 4733 numbering).
_EVENT_CODES = {str(i): key for i, key in enumerate(DTMF_KEYS)}


def dtmf_relay_body(key: str, duration_ms: int) -> bytes:
    if len(key) != 1 or key.upper() not in DTMF_KEYS:
        raise ValueError(f"not a DTMF key: {key!r}")
    if not 0 < duration_ms < 60_000:
        raise ValueError(f"bad DTMF duration: {duration_ms}")
    return f"Signal={key.upper()}\r\nDuration={duration_ms}\r\n".encode()


def parse_dtmf_info(request: SipRequest) -> tuple[str, int | None] | None:
    """(key, duration in ms) of an INFO carrying a key press, else None."""
    kind = content_type(request)
    try:
        text = request.body.decode("ascii")
    except UnicodeDecodeError:
        return None
    if kind == "application/dtmf":
        key = _key(text.strip())
        return (key, None) if key is not None else None
    if kind != DTMF_RELAY:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            fields[name.strip().lower()] = value.strip()
    key = _key(fields.get("signal", ""))
    if key is None:
        return None
    duration = fields.get("duration", "")
    return key, int(duration) if duration.isascii() and duration.isdigit() else None


def _key(text: str) -> str | None:
    if len(text) == 1 and text.upper() in DTMF_KEYS:
        return text.upper()
    return _EVENT_CODES.get(text)
