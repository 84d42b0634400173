"""SIP message model, parser and serializer (RFC 3261 §7, §20, §25).

`parse()` is the only door from the network into the stack, so it is strict about shape,
bounded in size, and raises exactly one error type, `SipParseError`, on any input it
cannot accept: the agent drops (or answers 400) and carries on. It is lenient where
RFC 3261 asks receivers to be (bare LF line ends, folded lines, compact header names,
odd whitespace around separators, leading CRLF keep-alives).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

MAX_MESSAGE_SIZE = 64 * 1024  # far above any UDP datagram a PBX sends; bounds the work per packet
MAX_HEADERS = 256

# RFC 3261 §7.3.3 plus the compact forms of later RFCs a PBX may use.
COMPACT_FORMS = {
    "i": "Call-ID",
    "m": "Contact",
    "f": "From",
    "t": "To",
    "v": "Via",
    "l": "Content-Length",
    "c": "Content-Type",
    "k": "Supported",
    "e": "Content-Encoding",
    "s": "Subject",
    "o": "Event",
    "r": "Refer-To",
    "b": "Referred-By",
    "u": "Allow-Events",
    "x": "Session-Expires",
}

# Names whose canonical spelling is not plain Title-Case-By-Dash.
_SPECIAL_NAMES = {
    name.lower(): name
    for name in (
        "Call-ID",
        "CSeq",
        "WWW-Authenticate",
        "MIME-Version",
        "User-to-User",
        "RAck",
        "RSeq",
        "Min-SE",
        "P-Asserted-Identity",
        "P-Preferred-Identity",
        "SIP-ETag",
        "SIP-If-Match",
    )
}

# Headers whose comma-separated values are separate entries (§7.3.1). Each is split on
# parse so that "the top Via" or "the route set" is simply the list of entries.
LIST_HEADERS = frozenset({"via", "route", "record-route", "contact"})

# Headers a request or response may carry only once (RFC 4475 §3.1.2.x "multi" cases).
_SINGLE_HEADERS = ("Call-ID", "CSeq", "From", "To")

REASON_PHRASES = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "Version Not Supported",
    603: "Decline",
}

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE = re.compile(_TOKEN)
_RESPONSE_LINE_RE = re.compile(r"SIP/2\.0 ([1-6][0-9][0-9])(?: (.*))?", re.IGNORECASE)
_URI_SHAPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s]+")
_DIGITS_RE = re.compile(r"[0-9]+")
_CSEQ_RE = re.compile(r"([0-9]{1,10})\s+(" + _TOKEN + r")")
_VIA_PROTOCOL_RE = re.compile(
    r"\s*SIP\s*/\s*2\.0\s*/\s*(" + _TOKEN + r")\s+(.*)", re.IGNORECASE | re.DOTALL
)
_HOST_RE = re.compile(r"[A-Za-z0-9\-_.]+|\[[0-9A-Fa-f:.]+\]")
# RFC 3261 user part characters (unreserved / escaped / user-unreserved), minus ';' and '?'
# so a caller number can never smuggle URI parameters or headers into our messages.
USER_PART_RE = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,/%]+")
# Bytes that may not appear inside a header line once CR and LF are removed.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class SipParseError(ValueError):
    """Any input the parser or a header helper cannot accept.

    `partial` is the message as far as it was read when the start line and headers were
    fine but something else was not (a missing header, a short body): enough for an agent
    to answer a request with 400 instead of dropping it.
    """

    def __init__(self, message: str, partial: SipRequest | SipResponse | None = None) -> None:
        super().__init__(message)
        self.partial = partial


@lru_cache(maxsize=1024)  # every header of every datagram comes through here; bounded
def canonical_name(name: str) -> str:
    """The spelling a header name is stored and sent with ('CALL-ID', 'i' -> 'Call-ID')."""
    lower = name.lower()
    if lower in COMPACT_FORMS:
        return COMPACT_FORMS[lower]
    special = _SPECIAL_NAMES.get(lower)
    if special is not None:
        return special
    return "-".join(part[:1].upper() + part[1:] for part in lower.split("-"))


class Headers:
    """An ordered multi-map of header fields with case-insensitive names."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = []
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        self._items.append((canonical_name(name), value))

    def set(self, name: str, value: str) -> None:
        """Replace every field of this name by one, kept at the first one's position."""
        canon = canonical_name(name)
        for i, (n, _) in enumerate(self._items):
            if n == canon:
                self._items[i] = (canon, value)
                self._items = [
                    item for j, item in enumerate(self._items) if j <= i or item[0] != canon
                ]
                return
        self._items.append((canon, value))

    def remove(self, name: str) -> None:
        canon = canonical_name(name)
        self._items = [item for item in self._items if item[0] != canon]

    def get(self, name: str, default: str | None = None) -> str | None:
        canon = canonical_name(name)
        for n, v in self._items:
            if n == canon:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        canon = canonical_name(name)
        return [v for n, v in self._items if n == canon]

    def copy(self) -> Headers:
        new = Headers()
        new._items = list(self._items)
        return new

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass
class SipRequest:
    method: str
    uri: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""


@dataclass
class SipResponse:
    status: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""


SipMessage = SipRequest | SipResponse


# --------------------------------------------------------------------------- parsing


def parse(data: bytes) -> SipRequest | SipResponse:
    """Parse one datagram. Raises SipParseError, and only that, on anything unacceptable."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SipParseError("not bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE_SIZE:
        raise SipParseError(f"message larger than {MAX_MESSAGE_SIZE} bytes")
    lines, body = _split_head(data)
    if not lines:
        raise SipParseError("empty message")
    start, *header_lines = (_decode_line(line) for line in lines)
    message = _parse_start_line(start)
    message.headers = _parse_header_lines(header_lines)
    message.body = _bounded_body(message, body)
    _check_semantics(message)
    return message


def _split_head(data: bytes) -> tuple[list[bytes], bytes]:
    """Lines of the start line and headers, and the bytes after the empty line."""
    pos, size = 0, len(data)
    # §7.5: CRLFs before the start line (keep-alives) are ignored.
    while pos < size and data[pos] in b"\r\n":
        pos += 1
    lines: list[bytes] = []
    while pos < size:
        end = data.find(b"\n", pos)
        if end < 0:
            # No empty line at all: accept a message that simply ends after its headers.
            line, pos = data[pos:], size
        else:
            line, pos = data[pos:end], end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return lines, data[pos:]
        lines.append(line)
        if len(lines) > MAX_HEADERS + 1:
            raise SipParseError(f"more than {MAX_HEADERS} header lines")
    return lines, b""


def _decode_line(line: bytes) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        # Some PBXes send display names in a legacy 8-bit charset; keep them readable.
        text = line.decode("latin-1")
    if _CONTROL_RE.search(text):
        raise SipParseError("control character in a header line")
    return text


def _parse_start_line(line: str) -> SipRequest | SipResponse:
    if line[:4].upper() == "SIP/":
        match = _RESPONSE_LINE_RE.fullmatch(line)
        if match is None:
            raise SipParseError(f"bad status line: {line[:80]!r}")
        return SipResponse(int(match.group(1)), match.group(2) or "")
    parts = line.split(" ")
    if len(parts) != 3:
        raise SipParseError(f"bad request line: {line[:80]!r}")
    method, uri, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise SipParseError(f"bad method: {method[:40]!r}")
    if not _URI_SHAPE_RE.fullmatch(uri):
        raise SipParseError(f"bad Request-URI: {uri[:80]!r}")
    if version.upper() != "SIP/2.0":
        raise SipParseError(f"unsupported version: {version[:20]!r}")
    return SipRequest(method, uri)


def _parse_header_lines(lines: list[str]) -> Headers:
    unfolded: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not unfolded:
                raise SipParseError("continuation line before any header")
            unfolded[-1] = unfolded[-1].rstrip(" \t") + " " + line.strip(" \t")
        else:
            unfolded.append(line)
    headers = Headers()
    for line in unfolded:
        name, sep, value = line.partition(":")
        name = name.rstrip(" \t")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise SipParseError(f"bad header line: {line[:80]!r}")
        value = value.strip(" \t")
        if canonical_name(name).lower() in LIST_HEADERS:
            for item in split_header_list(value):
                headers.add(name, item)
        else:
            headers.add(name, value)
    if len(headers) > MAX_HEADERS:
        raise SipParseError(f"more than {MAX_HEADERS} headers")
    return headers


def _bounded_body(message: SipRequest | SipResponse, body: bytes) -> bytes:
    values = message.headers.get_all("Content-Length")
    if not values:
        return body  # §18.3: over UDP the body runs to the end of the datagram
    if len(set(values)) > 1:
        raise SipParseError("conflicting Content-Length headers", message)
    if not _DIGITS_RE.fullmatch(values[0]) or len(values[0]) > 10:
        raise SipParseError(f"bad Content-Length: {values[0][:20]!r}", message)
    length = int(values[0])
    if length > len(body):
        raise SipParseError("Content-Length larger than the body received", message)
    # §18.3: bytes past Content-Length in a datagram are discarded.
    return body[:length]


def _check_semantics(message: SipRequest | SipResponse) -> None:
    headers = message.headers
    for name in _SINGLE_HEADERS:
        count = len(headers.get_all(name))
        if count != 1:
            problem = "missing" if count == 0 else "repeated"
            raise SipParseError(f"{problem} {name} header", message)
    if not headers.get_all("Via"):
        raise SipParseError("missing Via header", message)
    try:
        method = parse_cseq(headers.get("CSeq") or "").method
        parse_via(headers.get_all("Via")[0])
        parse_name_addr(headers.get("From") or "")
        parse_name_addr(headers.get("To") or "")
    except SipParseError as exc:
        raise SipParseError(str(exc), message) from None
    if not headers.get("Call-ID"):
        raise SipParseError("empty Call-ID", message)
    if isinstance(message, SipRequest) and method != message.method:
        raise SipParseError("CSeq method does not match the request method", message)


# --------------------------------------------------------------------------- serializing


def serialize(message: SipRequest | SipResponse) -> bytes:
    """Bytes on the wire: canonical names, CRLF line ends, a Content-Length that fits the body."""
    if isinstance(message, SipRequest):
        start = f"{message.method} {message.uri} SIP/2.0"
    else:
        start = f"SIP/2.0 {message.status} {message.reason}".rstrip(" ")
    # A CR or LF smuggled in through a caller-supplied value would forge headers.
    _check_no_controls(start)
    lines = [start]
    wrote_length = False
    for name, value in message.headers:
        if name == "Content-Length":
            if not wrote_length:
                lines.append(f"Content-Length: {len(message.body)}")
                wrote_length = True
            continue
        _check_no_controls(name)
        _check_no_controls(value)
        lines.append(f"{name}: {value}")
    if not wrote_length:
        lines.append(f"Content-Length: {len(message.body)}")
    return "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + message.body


def _check_no_controls(text: str) -> None:
    if _CONTROL_RE.search(text):
        raise ValueError(f"control character in a SIP header: {text[:40]!r}")


def validate_header(name: str, value: str) -> None:
    """Raise ValueError unless (name, value) can go on the wire as one header line."""
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"not a header name: {name[:40]!r}")
    _check_no_controls(value)


# --------------------------------------------------------------------------- header helpers


def _split_top_level(text: str, sep: str, angles: bool) -> tuple[list[str], bool]:
    """Split at `sep` outside quoted strings (and, with `angles`, outside <...>).
    Returns the parts and whether a quoted string was left open."""
    parts: list[str] = []
    current: list[str] = []
    in_quotes = escaped = False
    depth = 0
    for ch in text:
        if in_quotes:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif angles and ch == "<":
            depth += 1
        elif angles and ch == ">":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts, in_quotes


def split_header_list(value: str) -> list[str]:
    """Split a comma-separated header value, ignoring commas in quotes and in <...>."""
    parts, _ = _split_top_level(value, ",", angles=True)
    return [item for part in parts if (item := part.strip(" \t"))]


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, unterminated = _split_top_level(text, sep, angles=False)
    if unterminated:
        raise SipParseError("unterminated quoted string")
    return parts


def parse_params(text: str) -> dict[str, str | None]:
    """';name=value;flag' -> {'name': 'value', 'flag': None}; names lower-cased."""
    params: dict[str, str | None] = {}
    for part in _split_outside_quotes(text, ";"):
        part = part.strip(" \t")
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip(" \t").lower()
        if not _TOKEN_RE.fullmatch(name):
            raise SipParseError(f"bad parameter: {part[:40]!r}")
        params[name] = value.strip(" \t") if sep else None
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class SipUri:
    """A sip: or sips: URI (§19.1). Other schemes are carried as opaque strings."""

    host: str
    user: str | None = None
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    scheme: str = "sip"
    password: str | None = None
    headers: str = ""

    def __str__(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user
            if self.password is not None:
                userinfo += ":" + self.password
            userinfo += "@"
        port = f":{self.port}" if self.port is not None else ""
        tail = f"?{self.headers}" if self.headers else ""
        return f"{self.scheme}:{userinfo}{self.host}{port}{format_params(self.params)}{tail}"


def parse_uri(text: str) -> SipUri:
    scheme, sep, rest = text.strip().partition(":")
    if not sep or scheme.lower() not in ("sip", "sips"):
        raise SipParseError(f"not a sip URI: {text[:80]!r}")
    rest, _, headers = rest.partition("?")
    user = password = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, _, pw = userinfo.partition(":")
        password = pw if ":" in userinfo else None
        if not user:
            raise SipParseError(f"empty user in URI: {text[:80]!r}")
    hostport, _, params = rest.partition(";")
    host, port = _parse_hostport(hostport)
    return SipUri(
        host=host,
        user=user,
        port=port,
        params=parse_params(params),
        scheme=scheme.lower(),
        password=password,
        headers=headers,
    )


def format_hostport(host: str, port: int | None = None) -> str:
    """host[:port] as our URIs and Via show it: an IPv6 address as a reference in brackets
    (§25.1), and no port when it is the default one."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return shown if port in (None, 5060) else f"{shown}:{port}"


def _parse_hostport(text: str) -> tuple[str, int | None]:
    text = text.strip(" \t")
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"unterminated IPv6 reference: {text[:80]!r}")
        host, rest = text[: end + 1], text[end + 1 :].strip(" \t")
        if rest and not rest.startswith(":"):
            raise SipParseError(f"junk after host: {text[:80]!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, after = text.partition(":")
        host = host.strip(" \t")
        port_text = after if sep else None
    if not _HOST_RE.fullmatch(host):
        raise SipParseError(f"bad host: {host[:80]!r}")
    if port_text is None:
        return host, None
    port_text = port_text.strip(" \t")
    if not _DIGITS_RE.fullmatch(port_text) or len(port_text) > 5 or int(port_text) > 65535:
        raise SipParseError(f"bad port in {text[:80]!r}")
    return host, int(port_text)


@dataclass
class NameAddr:
    """From, To, Contact, Route, Record-Route values: [display] <uri> *(;param)."""

    uri: str
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def with_tag(self, tag: str) -> NameAddr:
        return NameAddr(self.uri, self.display_name, {**self.params, "tag": tag})

    def without_params(self) -> NameAddr:
        return NameAddr(self.uri, self.display_name)

    def __str__(self) -> str:
        display = f"{quote(self.display_name)} " if self.display_name is not None else ""
        return f"{display}<{self.uri}>{format_params(self.params)}"


def parse_name_addr(text: str) -> NameAddr:
    text = text.strip(" \t")
    if not text:
        raise SipParseError("empty name-addr")
    display: str | None = None
    rest = text
    if text.startswith('"'):
        end = _closing_quote(text)
        display = unquote(text[: end + 1])
        rest = text[end + 1 :].lstrip(" \t")
        if not rest.startswith("<"):
            raise SipParseError(f"quoted display name without <uri>: {text[:80]!r}")
    lt = rest.find("<")
    semi = rest.find(";")
    if lt >= 0 and (semi < 0 or lt < semi or display is not None):
        if display is None:
            words = rest[:lt].strip(" \t")
            display = words or None
        gt = rest.find(">", lt)
        if gt < 0:
            raise SipParseError(f"unterminated <uri>: {text[:80]!r}")
        uri = rest[lt + 1 : gt].strip(" \t")
        params = rest[gt + 1 :].strip(" \t")
        if params and not params.startswith(";"):
            raise SipParseError(f"junk after <uri>: {text[:80]!r}")
    else:
        # addr-spec form: parameters after the URI belong to the header, not the URI.
        uri, _, params = rest.partition(";")
        uri = uri.strip(" \t")
        if not uri or " " in uri or "<" in uri or ">" in uri:
            raise SipParseError(f"bad addr-spec: {text[:80]!r}")
    if not _URI_SHAPE_RE.fullmatch(uri):
        raise SipParseError(f"bad URI: {uri[:80]!r}")
    return NameAddr(uri, display, parse_params(params))


def _closing_quote(text: str) -> int:
    escaped = False
    for i in range(1, len(text)):
        ch = text[i]
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return i
    raise SipParseError("unterminated quoted string")


@dataclass
class Via:
    host: str
    port: int | None = None
    transport: str = "UDP"
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | bool | None:
        """None: not asked for; True: asked for (empty); an int: filled in by the server."""
        if "rport" not in self.params:
            return None
        value = self.params["rport"]
        if value is None or value == "":
            return True
        return int(value) if _DIGITS_RE.fullmatch(value) else True

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"SIP/2.0/{self.transport} {self.host}{port}{format_params(self.params)}"


def parse_via(text: str) -> Via:
    match = _VIA_PROTOCOL_RE.fullmatch(text)
    if match is None:
        raise SipParseError(f"bad Via: {text[:80]!r}")
    transport, rest = match.groups()
    sent_by, _, params = rest.partition(";")
    host, port = _parse_hostport(sent_by)
    return Via(host, port, transport.upper(), parse_params(params))


@dataclass(frozen=True)
class CSeq:
    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_cseq(text: str) -> CSeq:
    match = _CSEQ_RE.fullmatch(text.strip(" \t"))
    if match is None:
        raise SipParseError(f"bad CSeq: {text[:40]!r}")
    seq = int(match.group(1))
    if seq >= 2**31:
        raise SipParseError("CSeq number too large")
    return CSeq(seq, match.group(2))


# --------------------------------------------------------------------------- accessors


def top_via(message: SipRequest | SipResponse) -> Via:
    values = message.headers.get_all("Via")
    if not values:
        raise SipParseError("no Via")
    return parse_via(values[0])


def cseq_of(message: SipRequest | SipResponse) -> CSeq:
    return parse_cseq(message.headers.get("CSeq") or "")


def tag_of(message: SipRequest | SipResponse, header: str) -> str | None:
    value = message.headers.get(header)
    if value is None:
        return None
    try:
        return parse_name_addr(value).tag
    except SipParseError:
        return None


def content_type(message: SipRequest | SipResponse) -> str:
    value = message.headers.get("Content-Type") or ""
    return value.split(";", 1)[0].strip(" \t").lower()


def sdp_body(message: SipRequest | SipResponse) -> str | None:
    """The SDP carried by a message, if any (Content-Type application/sdp, non-empty)."""
    if not message.body.strip() or content_type(message) not in ("application/sdp", ""):
        return None
    try:
        return message.body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> SipResponse:
    """A response to `request` (§8.2.6.2): Via, From, Call-ID, CSeq copied; To tagged."""
    response = SipResponse(status, REASON_PHRASES.get(status, "") if reason is None else reason)
    out = response.headers
    for via in request.headers.get_all("Via"):
        out.add("Via", via)
    out.add("From", request.headers.get("From") or "")
    to = request.headers.get("To") or ""
    if to_tag is not None and status > 100:
        try:
            if parse_name_addr(to).tag is None:
                to = f"{to};tag={to_tag}"
        except SipParseError:
            pass
    out.add("To", to)
    out.add("Call-ID", request.headers.get("Call-ID") or "")
    out.add("CSeq", request.headers.get("CSeq") or "")
    for name, value in headers:
        out.add(name, value)
    response.body = body
    return response
