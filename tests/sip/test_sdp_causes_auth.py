"""Unit tests of the small pure helpers: SDP, Q.850 causes, digest authentication, INFO."""

from __future__ import annotations

import pytest

from appliance.sip import causes
from appliance.sip.auth import (
    Credentials,
    DigestChallenge,
    answer_challenge,
    build_authorization,
    compute_response,
    parse_auth_params,
    parse_challenge,
)
from appliance.sip.dtmf_info import parse_dtmf_info
from appliance.sip.message import Headers, SipRequest, SipResponse
from appliance.sip.sdp import (
    LocalSdp,
    SdpError,
    audio_endpoint,
    build_answer,
    build_offer,
    parse_sdp,
)

# --------------------------------------------------------------------------- SDP


def test_offer_is_the_small_sdp_the_desk_phone_expects() -> None:
    offer = build_offer("127.0.0.1", 40000, session_id=7)
    assert offer == (
        "v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
    )
    assert "c=IN IP6 ::1" in build_offer("::1", 4000)


def test_parse_answer_with_media_level_connection_and_dynamic_dtmf() -> None:
    answer = (
        "v=0\no=phone 1 1 IN IP4 10.0.0.1\ns=call\nc=IN IP4 10.0.0.1\nt=0 0\n"
        "m=audio 5004 RTP/AVP 8 0 96\nc=IN IP4 10.0.0.2\na=rtpmap:96 telephone-event/8000\n"
        "a=fmtp:96 0-15\na=ptime:30\na=recvonly\n"
    )
    audio = audio_endpoint(answer)
    assert (audio.address, audio.port) == ("10.0.0.2", 5004)  # media level wins
    assert audio.payload_types == [8, 0, 96]
    assert audio.codecs[0].name == "PCMU" and audio.codecs[8].name == "PCMA"  # static
    assert audio.telephone_event_pt == 96 and audio.codecs[96].fmtp == "0-15"
    assert (audio.direction, audio.ptime, audio.on_hold) == ("recvonly", 30, False)


@pytest.mark.parametrize(
    ("extra", "connection", "on_hold"),
    [("a=sendonly", "127.0.0.1", True), ("a=inactive", "127.0.0.1", True),
     ("a=sendrecv", "0.0.0.0", True), ("a=sendrecv", "127.0.0.1", False)],
)  # fmt: skip
def test_hold_detection(extra: str, connection: str, on_hold: bool) -> None:
    sdp = f"v=0\r\nc=IN IP4 {connection}\r\nt=0 0\r\nm=audio 1000 RTP/AVP 0\r\n{extra}\r\n"
    assert audio_endpoint(sdp).on_hold is on_hold


def test_session_level_direction_applies_to_media() -> None:
    sdp = "v=0\r\nc=IN IP4 1.2.3.4\r\na=inactive\r\nt=0 0\r\nm=audio 1000 RTP/AVP 0\r\n"
    assert audio_endpoint(sdp).direction == "inactive"


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "v=1\r\n", "v=0\r\nm=audio x RTP/AVP 0\r\n", "v=0\r\nc=IN IP4\r\n",
     "v=0\r\nm=audio 99999 RTP/AVP 0\r\n", "v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtpmap:zz\r\n"],
)  # fmt: skip
def test_bad_sdp(text: str) -> None:
    with pytest.raises(SdpError):
        audio_endpoint(text)


def test_no_audio_or_no_address() -> None:
    with pytest.raises(SdpError):
        audio_endpoint("v=0\r\nc=IN IP4 1.1.1.1\r\nm=video 5 RTP/AVP 96\r\n")
    with pytest.raises(SdpError):
        audio_endpoint("v=0\r\nm=audio 5 RTP/AVP 0\r\n")


OURS = build_offer("127.0.0.1", 40000, session_id=9)


@pytest.mark.parametrize(
    ("offered", "answered"),
    [("sendrecv", "sendrecv"), ("sendonly", "recvonly"), ("recvonly", "sendonly"),
     ("inactive", "inactive")],
)  # fmt: skip
def test_answer_mirrors_the_direction(offered: str, answered: str) -> None:
    offer = (
        "v=0\r\no=p 1 2 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
        f"m=audio 6000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na={offered}\r\n"
    )
    answer = build_answer(offer, OURS, session_version=2)
    assert answer is not None
    audio = audio_endpoint(answer)
    assert (audio.address, audio.port, audio.direction) == ("127.0.0.1", 40000, answered)
    assert "o=- 9 2 IN IP4 127.0.0.1" in answer


def test_answer_to_old_style_hold_does_not_send() -> None:
    offer = "v=0\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n"
    answer = build_answer(offer, OURS, session_version=2)
    assert answer is not None and audio_endpoint(answer).direction == "recvonly"


def test_answer_keeps_the_offers_numbering_and_rejects_other_streams() -> None:
    offer = (
        "v=0\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
        "m=video 7000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n"
        "m=audio 6000 RTP/AVP 8 0 118\r\na=rtpmap:118 telephone-event/8000\r\n"
    )
    answer = build_answer(offer, OURS, session_version=2)
    assert answer is not None
    session = parse_sdp(answer)
    assert [(m.media, m.port) for m in session.media] == [("video", 0), ("audio", 40000)]
    audio = audio_endpoint(session)
    assert audio.payload_types == [0, 118] and audio.telephone_event_pt == 118


def test_answer_none_when_nothing_in_common() -> None:
    only_dtmf = "v=0\r\nc=IN IP4 1.1.1.1\r\nt=0 0\r\nm=audio 6 RTP/AVP 101\r\n" + (
        "a=rtpmap:101 telephone-event/8000\r\n"
    )
    assert build_answer(only_dtmf, OURS, session_version=2) is None


def test_local_sdp_bumps_the_version_only_on_change() -> None:
    local = LocalSdp(OURS)
    offer = "v=0\r\nc=IN IP4 1.1.1.1\r\nt=0 0\r\nm=audio 6 RTP/AVP 0\r\na=sendonly\r\n"
    first = local.answer(offer)
    again = local.answer(offer)
    resumed = local.answer(offer.replace("sendonly", "sendrecv"))
    assert first is not None and again == first and "o=- 9 2 " in first
    assert resumed is not None and "o=- 9 3 " in resumed


# --------------------------------------------------------------------------- causes


@pytest.mark.parametrize(
    ("status", "cause", "text"),
    [(404, 1, "unallocated number"), (480, 18, "no user responding"), (486, 17, "user busy"),
     (603, 21, "call rejected"), (408, 102, "recovery on timer expiry"),
     (503, 41, "temporary failure"), (502, 38, "network out of order"), (600, 17, "user busy"),
     (604, 1, "unallocated number"), (484, 28, "invalid number format"),
     (487, 16, "normal call clearing"), (499, 21, "call rejected"), (599, 41, "temporary failure"),
     (699, 21, "call rejected")],
)  # fmt: skip
def test_sip_to_q850(status: int, cause: int, text: str) -> None:
    assert causes.cause_for_status(status) == cause
    assert causes.causestring(cause) == text


def test_q850_to_sip() -> None:
    assert causes.status_for_cause(17) == 486
    assert causes.status_for_cause(19) == 480
    assert causes.status_for_cause(34) == 503
    assert causes.status_for_cause(1) == 404
    assert causes.status_for_cause(16) is None  # clear with BYE / CANCEL
    assert causes.status_for_cause(250) == 500
    assert causes.causestring(19) == "no answer"


def test_reason_header() -> None:
    response = SipResponse(480, "Temporarily Unavailable", Headers())
    response.headers.add("Reason", 'SIP;cause=480, Q.850 ; cause = 19 ;text="No answer"')
    assert causes.cause_of_response(response) == (19, "no answer")
    response.headers.set("Reason", "Q.850;cause=999")
    assert causes.cause_of_response(response) == (18, "no user responding")
    assert causes.reason_header(17) == 'Q.850;cause=17;text="user busy"'


# --------------------------------------------------------------------------- digest


def test_rfc2617_example() -> None:
    # RFC 2617 §3.5
    response = compute_response(
        algorithm="MD5", username="Mufasa", password="Circle Of Life",
        realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        method="GET", uri="/dir/index.html", qop="auth", nc="00000001", cnonce="0a4f113b",
    )  # fmt: skip
    assert response == "6629fae49393a05397450978507c4ef1"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
     ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1")],
)  # fmt: skip
def test_rfc7616_examples(algorithm: str, expected: str) -> None:
    # RFC 7616 §3.9.1
    response = compute_response(
        algorithm=algorithm, username="Mufasa", password="Circle of Life",
        realm="http-auth@example.org", nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        method="GET", uri="/dir/index.html", qop="auth", nc="00000001",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )  # fmt: skip
    assert response == expected


def test_rfc2069_style_without_qop_and_md5_sess() -> None:
    plain = compute_response(
        algorithm="MD5", username="u", password="p", realm="r", nonce="n", method="INVITE",
        uri="sip:a@b",
    )  # fmt: skip
    import hashlib

    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    assert plain == md5(f"{md5('u:r:p')}:n:{md5('INVITE:sip:a@b')}")
    sess = compute_response(
        algorithm="MD5-sess", username="u", password="p", realm="r", nonce="n",
        method="INVITE", uri="sip:a@b", qop="auth", nc="00000001", cnonce="c",
    )  # fmt: skip
    ha1 = md5(f"{md5('u:r:p')}:n:c")
    assert sess == md5(f"{ha1}:n:00000001:c:auth:{md5('INVITE:sip:a@b')}")


def test_challenge_parsing_and_authorization_value() -> None:
    challenge = parse_challenge(
        'Digest realm="asterisk", nonce="1a2b", opaque="xyz", algorithm=MD5, qop="auth,auth-int"'
    )
    assert challenge == DigestChallenge("asterisk", "1a2b", "MD5", ("auth", "auth-int"), "xyz")
    value = build_authorization(
        challenge, Credentials("100", "pw"), "INVITE", "sip:9333@pbx", cnonce="abc"
    )
    params = parse_auth_params(value.removeprefix("Digest "))
    assert params["qop"] == "auth" and params["cnonce"] == "abc" and params["opaque"] == "xyz"
    with pytest.raises(ValueError):
        parse_challenge('Basic realm="x"')


def test_answer_challenge_picks_a_usable_digest() -> None:
    response = SipResponse(407, "Proxy Authentication Required", Headers())
    response.headers.add("Proxy-Authenticate", 'Digest realm="r", nonce="n", algorithm=AKAv1-MD5')
    response.headers.add("Proxy-Authenticate", 'Digest realm="r", nonce="n2", algorithm=SHA-256')
    name, value = answer_challenge(response, Credentials("u", "p"), "INVITE", "sip:x@y") or ("", "")
    assert name == "Proxy-Authorization" and 'nonce="n2"' in value
    assert answer_challenge(SipResponse(403, "F"), Credentials("u", "p"), "INVITE", "sip:x") is None


# --------------------------------------------------------------------------- INFO DTMF


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n", ("5", 160)),
     ("application/dtmf-relay", b"Signal= 11\nDuration=x\n", ("#", None)),
     ("application/dtmf", b"*", ("*", None)),
     ("application/dtmf-relay", b"Signal=Z\r\n", None),
     ("text/plain", b"Signal=1", None)],
)  # fmt: skip
def test_parse_dtmf_info(content_type: str, body: bytes, expected: object) -> None:
    request = SipRequest("INFO", "sip:a@b", Headers([("Content-Type", content_type)]), body)
    assert parse_dtmf_info(request) == expected
