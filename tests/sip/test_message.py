"""SIP message parser and serializer: round trips, leniencies, limits, torture, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.sip.message import (
    MAX_HEADERS,
    MAX_MESSAGE_SIZE,
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    build_response,
    parse,
    parse_cseq,
    parse_name_addr,
    parse_uri,
    parse_via,
    serialize,
    split_header_list,
    top_via,
)

INVITE = (
    b"INVITE sip:9333@pbx SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP ms-host:5060;rport;branch=z9hG4bK3NccFjavmH1ZD\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "5678" <sip:5678@ms-host>;tag=vFNec197SaU3S\r\n'
    b'To: "9333" <sip:9333@pbx>\r\n'
    b"Call-ID: 2020121556789333\r\n"
    b"CSeq: 2 INVITE\r\n"
    b"Contact: <sip:5678@ms-host:5060>\r\n"
    b"User-Agent: WebRTC Media Server 5.10\r\n"
    b"User-to-User: 54455354;encoding=hex\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 10\r\n"
    b"\r\n"
    b"v=0\r\n\r\nx\r\n"
)

RESPONSE = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5062;rport=5062;received=127.0.0.1;branch=z9hG4bKabc\r\n"
    b"From: <sip:5678@127.0.0.1>;tag=1\r\n"
    b"To: <sip:9333@127.0.0.1>;tag=2\r\n"
    b"Call-ID: abc\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def with_headers(*lines: str, body: bytes = b"", start: str = "OPTIONS sip:a@b SIP/2.0") -> bytes:
    base = [
        start,
        "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
        "From: <sip:a@b>;tag=1",
        "To: <sip:c@d>",
        "Call-ID: x",
        f"CSeq: 1 {start.split()[0]}" if not start.startswith("SIP/") else "CSeq: 1 INVITE",
    ]
    return ("\r\n".join([*base, *lines]) + "\r\n\r\n").encode() + body


# --------------------------------------------------------------------------- basics


def test_parse_the_original_invite() -> None:
    message = parse(INVITE)
    assert isinstance(message, SipRequest)
    assert message.method == "INVITE" and message.uri == "sip:9333@pbx"
    assert message.headers.get("user-to-user") == "54455354;encoding=hex"
    assert message.headers.get("CALL-ID") == "2020121556789333"
    assert message.body == b"v=0\r\n\r\nx\r\n"  # a blank line inside the body is body
    via = top_via(message)
    assert via.branch == "z9hG4bK3NccFjavmH1ZD" and via.rport is True and via.port == 5060
    sender = parse_name_addr(message.headers.get("From") or "")
    assert sender == NameAddr("sip:5678@ms-host", "5678", {"tag": "vFNec197SaU3S"})


def test_parse_response() -> None:
    message = parse(RESPONSE)
    assert isinstance(message, SipResponse)
    assert (message.status, message.reason) == (180, "Ringing")
    via = top_via(message)
    assert via.rport == 5062 and via.received == "127.0.0.1"


@pytest.mark.parametrize("raw", [INVITE, RESPONSE])
def test_round_trip(raw: bytes) -> None:
    message = parse(raw)
    again = parse(serialize(message))
    assert again == message
    assert serialize(again) == serialize(message)


def test_serializer_fixes_content_length_and_uses_canonical_names() -> None:
    request = SipRequest("MESSAGE", "sip:a@b", Headers([("call-id", "1"), ("cseq", "1 MESSAGE")]))
    request.headers.add("content-length", "999")
    request.headers.add("www-authenticate", 'Digest realm="x"')
    request.headers.add("user-to-user", "00;encoding=hex")
    request.body = b"hello"
    text = serialize(request).decode()
    assert "Call-ID: 1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 5\r\n" in text
    assert "WWW-Authenticate: " in text and "User-to-User: " in text
    assert text.endswith("\r\n\r\nhello")


def test_serializer_appends_content_length_when_missing() -> None:
    text = serialize(SipResponse(200, "OK", Headers([("Call-ID", "1")]))).decode()
    assert text == "SIP/2.0 200 OK\r\nCall-ID: 1\r\nContent-Length: 0\r\n\r\n"


def test_serializer_refuses_header_injection() -> None:
    request = SipRequest("INVITE", "sip:a@b", Headers([("User-to-User", "00\r\nEvil: 1")]))
    with pytest.raises(ValueError):
        serialize(request)


def test_compact_forms_are_expanded() -> None:
    raw = (
        b"INVITE sip:a@b SIP/2.0\r\n"
        b"v: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"f: <sip:a@b>;tag=1\r\nt: <sip:c@d>\r\ni: cid\r\nCSeq: 1 INVITE\r\n"
        b"m: <sip:a@h>\r\nc: application/sdp\r\nk: timer\r\ne: gzip\r\ns: hi\r\nl: 0\r\n\r\n"
    )
    headers = parse(raw).headers
    names = [name for name, _ in headers]
    assert names == [
        "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Type", "Supported",
        "Content-Encoding", "Subject", "Content-Length",
    ]  # fmt: skip
    assert headers.get("call-id") == "cid"


def test_repeated_and_comma_joined_list_headers_keep_their_order() -> None:
    raw = with_headers(
        "Via: SIP/2.0/UDP p2;branch=z9hG4bK2, SIP/2.0/UDP p3;branch=z9hG4bK3",
        'Record-Route: <sip:p1;lr>, <sip:p2;lr;x="a,b">',
        "Record-Route: <sip:p3;lr>",
        "Route: <sip:r1;lr>,<sip:r2;lr>",
        'Contact: "Doe, John" <sip:j@h>, <sip:k@h>',
    )
    headers = parse(raw).headers
    branches = [parse_via(v).branch for v in headers.get_all("Via")]
    assert branches == ["z9hG4bK1", "z9hG4bK2", "z9hG4bK3"]
    assert headers.get_all("Record-Route") == ["<sip:p1;lr>", '<sip:p2;lr;x="a,b">', "<sip:p3;lr>"]
    assert headers.get_all("Route") == ["<sip:r1;lr>", "<sip:r2;lr>"]
    assert parse_name_addr(headers.get_all("Contact")[0]).display_name == "Doe, John"


def test_folded_headers_are_unfolded() -> None:
    raw = with_headers("Subject: I know you're there,\r\n   pick up the phone\r\n\tand talk to me!")
    assert parse(raw).headers.get("Subject") == (
        "I know you're there, pick up the phone and talk to me!"
    )


def test_bare_lf_line_ends() -> None:
    raw = INVITE.replace(b"\r\n", b"\n")
    message = parse(raw.replace(b"Content-Length: 10", b"Content-Length: 7"))
    assert message.headers.get("Call-ID") == "2020121556789333"
    assert message.body == b"v=0\n\nx\n"


def test_leading_crlf_keepalives_are_skipped() -> None:
    assert isinstance(parse(b"\r\n\r\n" + RESPONSE), SipResponse)


def test_body_runs_to_the_end_without_content_length() -> None:
    raw = with_headers(body=b"abc\r\n\r\ndef")
    assert parse(raw).body == b"abc\r\n\r\ndef"


def test_bytes_after_content_length_are_discarded() -> None:
    raw = with_headers("Content-Length: 3", body=b"abcdef")
    assert parse(raw).body == b"abc"


def test_content_length_larger_than_body_is_an_error() -> None:
    with pytest.raises(SipParseError) as info:
        parse(with_headers("Content-Length: 50", body=b"short"))
    assert isinstance(info.value.partial, SipRequest)  # readable enough to answer 400


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "99999999999999999999", "²"])
def test_bad_content_length(value: str) -> None:
    with pytest.raises(SipParseError):
        parse(with_headers(f"Content-Length: {value}", body=b"x"))


def test_conflicting_content_lengths() -> None:
    with pytest.raises(SipParseError):
        parse(with_headers("Content-Length: 1", "l: 2", body=b"xy"))


def test_size_limit() -> None:
    big = with_headers(body=b"x" * (MAX_MESSAGE_SIZE + 1))
    with pytest.raises(SipParseError, match="larger than"):
        parse(big)


def test_header_count_limit() -> None:
    lines = [f"X-Filler-{i}: {i}" for i in range(MAX_HEADERS + 10)]
    with pytest.raises(SipParseError, match="header"):
        parse(with_headers(*lines))


def test_helpers() -> None:
    uri = parse_uri("sip:alice;day=tue@[2001:db8::1]:5070;transport=udp;lr?subject=hi")
    assert (uri.user, uri.host, uri.port) == ("alice;day=tue", "[2001:db8::1]", 5070)
    assert uri.params == {"transport": "udp", "lr": None} and uri.headers == "subject=hi"
    assert str(uri) == "sip:alice;day=tue@[2001:db8::1]:5070;transport=udp;lr?subject=hi"
    assert parse_uri("sips:example.com").scheme == "sips"
    assert parse_cseq("  0009   INVITE ").seq == 9
    na = parse_name_addr("sip:5678@host;tag=abc")  # addr-spec: ;tag belongs to the header
    assert (na.uri, na.tag) == ("sip:5678@host", "abc")
    na = parse_name_addr("Anonymous <sip:anonymous@anonymous.invalid>;tag=9")
    assert (na.display_name, na.tag) == ("Anonymous", "9")
    via = parse_via("SIP / 2.0 / udp  host.example ; branch = z9hG4bKx ; rport")
    assert (via.transport, via.host, via.branch) == ("UDP", "host.example", "z9hG4bKx")
    assert via.rport is True
    assert split_header_list('a, "b,c" <sip:x>, <sip:y;p=1,2>') == [
        "a", '"b,c" <sip:x>', "<sip:y;p=1,2>",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["", "sip:", "sip:@host", "sip:host:99999", "sip:host:x", "http://x", "sip:ho st"],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_build_response_copies_and_tags() -> None:
    request = parse(INVITE)
    assert isinstance(request, SipRequest)
    response = build_response(request, 486, to_tag="xyz")
    assert response.reason == "Busy Here"
    assert response.headers.get("To") == '"9333" <sip:9333@pbx>;tag=xyz'
    assert response.headers.get_all("Via") == request.headers.get_all("Via")
    assert build_response(request, 100, to_tag="xyz").headers.get("To") == '"9333" <sip:9333@pbx>'


# --------------------------------------------------------------------------- RFC 4475 style

# §3.1.1.1 "wsinv": a short tortuous INVITE. Valid: every oddity here is legal SIP.
WSINV = (
    "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n"
    "TO :\r\n"
    " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n"
    'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>\r\n'
    "  ;\r\n"
    "  tag = 98asjd8\r\n"
    "MaX-fOrWaRdS: 0068\r\n"
    "Call-ID: wsinv.ndaksdj@192.0.2.1\r\n"
    "Content-Length   : {length}\r\n"
    "cseq: 0009\r\n"
    "  INVITE\r\n"
    "Via  : SIP  /   2.0\r\n"
    " /UDP\r\n"
    "    192.0.2.2;branch=390skdjuw\r\n"
    "s :\r\n"
    "NewFangledHeader:   newfangled value\r\n"
    " continued newfangled value\r\n"
    "UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n"
    "Content-Type: application/sdp\r\n"
    "Route:\r\n"
    " <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\r\n"
    "v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n"
    "  branch  =   z9hG4bK9ikj8  ,\r\n"
    " SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n"
    " z9hG4bK30239\r\n"
    'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =\r\n'
    "      newvalue ;\r\n"
    "  secondparam ; q = 0.33\r\n"
    "\r\n"
    "{body}"
)
WSINV_BODY = (
    "v=0\r\no=mhandley 29739 7272939 IN IP4 192.0.2.3\r\ns=-\r\nc=IN IP4 192.0.2.4\r\n"
    "t=0 0\r\nm=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n"
)


def test_torture_wsinv() -> None:
    raw = WSINV.format(length=len(WSINV_BODY), body=WSINV_BODY).encode()
    message = parse(raw)
    assert isinstance(message, SipRequest)
    headers = message.headers
    assert parse_name_addr(headers.get("To") or "").tag == "1918181833n"
    sender = parse_name_addr(headers.get("From") or "")
    assert sender.display_name == 'J Rosenberg \\"' and sender.tag == "98asjd8"
    assert parse_cseq(headers.get("CSeq") or "").seq == 9
    vias = [parse_via(v) for v in headers.get_all("Via")]
    assert [v.branch for v in vias] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert [v.transport for v in vias] == ["UDP", "TCP", "UDP"]
    assert headers.get("Subject") == ""
    assert headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    contact = parse_name_addr(headers.get("Contact") or "")
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert message.body == WSINV_BODY.encode()


VALID_TORTURE = {
    # §3.1.1.2 intmeth: an unknown method full of token characters
    "intmeth": "!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)"
    "&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0",
    # §3.1.1.7 lwsdisp: no space between display name and <
    "lwsdisp": "OPTIONS sip:user@example.com SIP/2.0",
    # §3.1.1.10 semiuri: a semicolon in the user part
    "semiuri": "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0",
    # §3.1.1.12 unksm: an unknown URI scheme is still a URI
    "unksm": "OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0",
    # §3.1.1.5 escnull: an escaped NUL in a URI is fine, a raw one is not
    "escnull": "REGISTER sip:example.com SIP/2.0",
}


@pytest.mark.parametrize("name", sorted(VALID_TORTURE))
def test_torture_valid(name: str) -> None:
    start = VALID_TORTURE[name]
    method = start.split(" ", 1)[0]
    raw = (
        f"{start}\r\n"
        "Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bK23d\r\n"
        "From: caller<sip:caller@example.com>;tag=323\r\n"
        "To: <sip:null-%00-null@example.com>\r\n"
        f"Call-ID: {name}.0ha0isndaksdj\r\n"
        f"CSeq: 8 {method}\r\n"
        "Max-Forwards: 70\r\n\r\n"
    ).encode()
    message = parse(raw)
    assert isinstance(message, SipRequest) and message.method == method


def test_torture_responses_without_reason_or_with_utf8_reason() -> None:
    base = RESPONSE.split(b"\r\n", 1)[1]
    assert parse(b"SIP/2.0 100 \r\n" + base).reason == ""  # type: ignore[union-attr]
    assert parse(b"SIP/2.0 100\r\n" + base).reason == ""  # type: ignore[union-attr]
    reason = "Привет Мир".encode()
    assert parse(b"SIP/2.0 200 " + reason + b"\r\n" + base).reason == "Привет Мир"  # type: ignore[union-attr]


INVALID_TORTURE = {
    "badvers": INVITE.replace(b"sip:9333@pbx SIP/2.0", b"sip:9333@pbx SIP/7.0"),
    "ltgtruri": INVITE.replace(b"INVITE sip:9333@pbx", b"INVITE <sip:9333@pbx>"),
    "lwsruri": INVITE.replace(b"INVITE sip:9333@pbx", b"INVITE sip:9333@pbx; lr"),
    "lwsstart": INVITE.replace(b"INVITE sip:9333@pbx SIP", b"INVITE  sip:9333@pbx  SIP"),
    "trws": INVITE.replace(b"SIP/2.0\r\n", b"SIP/2.0 \r\n", 1),
    "mismatch01": INVITE.replace(b"CSeq: 2 INVITE", b"CSeq: 2 OPTIONS"),
    "quotbal": INVITE.replace(b'To: "9333" <sip:9333@pbx>', b'To: "9333 <sip:9333@pbx>'),
    "multi01": INVITE.replace(b"Call-ID: 2020", b"Call-ID: other\r\nCall-ID: 2020"),
    "ncl": INVITE.replace(b"Content-Length: 10", b"Content-Length: -999"),
    "scalar02": INVITE.replace(b"Content-Length: 10", b"Content-Length: 1" + b"0" * 30),
    "clerr": INVITE.replace(b"Content-Length: 10", b"Content-Length: 9999"),
    "nocseq": INVITE.replace(b"CSeq: 2 INVITE\r\n", b""),
    "novia": INVITE.replace(b"Via: SIP/2.0/UDP ms-host:5060;rport;branch=z9hG4bK3NccFjavmH1ZD\r\n",
                            b""),
    "badvia": INVITE.replace(b"Via: SIP/2.0/UDP ms-host:5060", b"Via: SIP/2.0/UDP ms-host:50x60"),
    "hugecseq": INVITE.replace(b"CSeq: 2 INVITE", b"CSeq: 4294967296 INVITE"),
    "rawnul": INVITE.replace(b"User-Agent: WebRTC", b"User-Agent: Web\x00RTC"),
    "badstatus": RESPONSE.replace(b"SIP/2.0 180 Ringing", b"SIP/2.0 18 Ringing"),
    "status999": RESPONSE.replace(b"SIP/2.0 180 Ringing", b"SIP/2.0 999 Ringing"),
    "noheadercolon": INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards 70"),
    "badheadername": INVITE.replace(b"Max-Forwards: 70", b"Max Forwards: 70"),
    "foldfirst": INVITE.replace(b"SIP/2.0\r\nVia", b"SIP/2.0\r\n Via"),
    "empty": b"",
    "onlycrlf": b"\r\n\r\n",
    "binary": bytes(range(256)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(INVALID_TORTURE))
def test_torture_invalid(name: str) -> None:
    with pytest.raises(SipParseError):
        parse(INVALID_TORTURE[name])


# --------------------------------------------------------------------------- fuzzing

SEEDS = [INVITE, RESPONSE, WSINV.format(length=len(WSINV_BODY), body=WSINV_BODY).encode()]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_parse_error(data: bytes) -> None:
    try:
        message = parse(data)
    except SipParseError:
        return
    # Whatever parses must serialize, and re-parse to the same message (but for the
    # Content-Length the serializer adds when the datagram had none).
    wire = serialize(message)
    again = parse(wire)
    assert serialize(again) == wire
    message.headers.remove("Content-Length")
    again.headers.remove("Content-Length")
    assert again == message


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_parse_error(data: bytes) -> None:
    _parse_or_parse_error(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            token = draw(
                st.sampled_from(
                    [b"\r\n", b"\n", b" ", b":", b";", b",", b'"', b"<", b">", b"\x00",
                     b"\r\n ", b"=", b"@", b"%", b"[", b"]", b"\xff", b"SIP/2.0"]
                )
            )  # fmt: skip
            data[pos:pos] = token
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_messages_only_raise_parse_error(data: bytes) -> None:
    _parse_or_parse_error(data)


_TOKEN_TEXT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
    min_size=1,
    max_size=12,
)
_VALUE_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters=",\x7f"),
    max_size=30,
).map(lambda s: s.strip(" "))


@FUZZ
@given(
    method=_TOKEN_TEXT,
    user=_TOKEN_TEXT,
    extra=st.lists(st.tuples(_TOKEN_TEXT.map(lambda s: "X-" + s), _VALUE_TEXT), max_size=6),
    body=st.binary(max_size=200),
)
def test_serialize_then_parse_is_identity(
    method: str, user: str, extra: list[tuple[str, str]], body: bytes
) -> None:
    request = SipRequest(method, f"sip:{user}@example.com")
    headers = request.headers
    headers.add("Via", "SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bKabc")
    headers.add("From", f"<sip:{user}@example.com>;tag=1")
    headers.add("To", "<sip:x@example.com>")
    headers.add("Call-ID", "cid")
    headers.add("CSeq", f"1 {method}")
    for name, value in extra:
        headers.add(name, value)
    headers.add("Content-Length", str(len(body)))
    request.body = body
    assert parse(serialize(request)) == request
