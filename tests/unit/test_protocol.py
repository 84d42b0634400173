"""The browser protocol structs: every action round-trips, limits and leniency hold."""

import msgspec
import pytest

from appliance.core import protocol as p

SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def offer_frame(**extra: object) -> dict[str, object]:
    frame: dict[str, object] = {
        "action": "offer",
        "dialogid": 13290721,
        "ref": 2392510,
        "medium": 2,
        "ua_family": "Chrome",
        "ua_version": "80",
        "ua_os": "Windows 10",
        "offer": {"type": "offer", "sdp": SDP},
    }
    frame.update(extra)
    return frame


def enc(frame: object) -> bytes:
    return msgspec.json.encode(frame)


def refused(frame: object) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.decode(frame if isinstance(frame, bytes | str) else enc(frame))
    return info.value


SAMPLES: list[p._Action] = [
    p.Offer(dialogid=1, ref=2, medium=2, ua_family="Chrome", ua_version="80", ua_os="Linux",
            offer=p.SessionDescription("offer", SDP), caller=5678, callee=9333,
            userdata='{"id":"A1"}', record=1, module="User", lifetime=600, audio="PCMU",
            suid="s-1", nickname="Ann", location_ip=""),
    p.Alert(dialogid=1, ref=2, channel=4),
    p.Answer(dialogid=1, ref=2, channel=4, medium=0, answer=p.SessionDescription("answer", SDP)),
    p.Ice(dialogid=1, ref=2, channel=4,
          ice=p.IceCandidate("candidate:1 1 udp 2113929727 127.0.0.1 30003 typ host", "0", 0)),
    p.DTLSconnect(dialogid=1, ref=2, channel=4, medium="audio"),
    p.Release(dialogid=1, ref=2, channel=4, cause=16, causestring="normal release"),
    p.RecordStatus(dialogid=1, ref=2, channel=4, medium=0, status="start",
                   record_file="audio/20200405/13290723392510_004.wav"),
    p.MyResolution(dialogid=1, ref=2, channel=4, width=640, height=480, REMB=500, framerate=30,
                   audio_bitrate=20, video_bitrate=800, jitter=20, packetloss=0),
    p.PeerResolution(dialogid=1, ref=2, channel=66, audio_bitrate=63, jitter=58, packetloss=3),
    p.PeerData(dialogid=1, ref=2, channel=4, peerchannel=66, medium="audio", type="indication",
               peerdata="Join", value="width=0000;height=0000"),
    p.Message(dialogid=1, ref=2, channel=5, message="503 congested", level="warning",
              position="top", displaytime=5),
    p.DTMF(dialogid=1, ref=2, channel=5, value="1"),
]


@pytest.mark.parametrize("action", SAMPLES, ids=lambda a: type(a).__name__)
def test_every_action_round_trips(action: p._Action) -> None:
    wire = p.encode(action)
    assert wire.startswith(b'{"action":"')  # action first, as in the original
    assert b"null" not in wire
    back = msgspec.json.decode(wire, type=p.Action)
    assert back == action
    if type(action).__struct_config__.tag in p.INBOUND_ACTIONS:
        assert p.decode(wire) == action


def test_every_action_has_a_sample() -> None:
    assert {type(a).__struct_config__.tag for a in SAMPLES} == set(p.ACTIONS)


def test_numeric_strings_are_accepted_for_integers() -> None:
    offer = p.decode(enc(offer_frame(dialogid="13290721", medium="2", caller="5678")))
    assert isinstance(offer, p.Offer)
    assert (offer.dialogid, offer.medium, offer.caller) == (13290721, 2, 5678)
    rel = p.decode('{"action":"release","dialogid":1,"ref":"2","channel":"4","cause":"16"}')
    assert isinstance(rel, p.Release) and rel.channel == 4 and rel.cause == 16


def test_release_with_channel_zero_keeps_every_field() -> None:
    wire = p.encode(p.Release(channel=0, cause=34, causestring="no circuit available"))
    assert wire == (
        b'{"action":"release","channel":0,"cause":34,"causestring":"no circuit available"}'
    )


def test_unknown_keys_are_ignored() -> None:
    assert isinstance(p.decode(enc(offer_frame(extra_field="x"))), p.Offer)


def test_key_longer_than_16_bytes_is_refused() -> None:
    err = refused(offer_frame(**{"a_seventeen_bytes": 1}))
    assert err.cause == p.CAUSE_INVALID_IE_CONTENTS
    assert "too long" in err.causestring and "a_seventeen_byte" in err.causestring
    assert (err.dialogid, err.ref) == (13290721, 2392510)


def test_sixteen_byte_key_is_fine() -> None:
    assert isinstance(p.decode(enc(offer_frame(**{"k" * 16: 1}))), p.Offer)


def test_value_longer_than_128_bytes_is_refused() -> None:
    err = refused(offer_frame(nickname="x" * 129))
    assert err.cause == p.CAUSE_INVALID_IE_CONTENTS and "'nickname'" in err.causestring
    assert isinstance(p.decode(enc(offer_frame(nickname="x" * 128))), p.Offer)


def test_limits_count_bytes_not_characters() -> None:
    assert isinstance(p.decode(enc(offer_frame(nickname="名" * 42))), p.Offer)  # 126 bytes
    refused(offer_frame(nickname="名" * 43))  # 129 bytes


def test_userdata_may_be_256_bytes_and_sdp_is_exempt() -> None:
    big_sdp = SDP + "a=x-filler:" + "y" * 2000 + "\r\n"
    offer = p.decode(enc(offer_frame(userdata="u" * 256, offer={"type": "offer", "sdp": big_sdp})))
    assert isinstance(offer, p.Offer)
    refused(offer_frame(userdata="u" * 257))


def test_short_fields_have_their_own_limits() -> None:
    refused(offer_frame(ua_os="o" * 65))
    refused(offer_frame(module="Userxxx"))


@pytest.mark.parametrize(
    ("frame", "cause", "text"),
    [
        (b"{not json", p.CAUSE_INVALID_MESSAGE, "malformed JSON"),
        (b"[1,2]", p.CAUSE_INVALID_MESSAGE, "JSON object"),
        (b'{"dialogid":1}', p.CAUSE_MANDATORY_IE_MISSING, "missing 'action'"),
        (b'{"action":"dance","dialogid":1,"ref":2}', p.CAUSE_MESSAGE_TYPE_NONEXISTENT, "dance"),
        (b'{"action":"alert","dialogid":1,"ref":2}', p.CAUSE_MESSAGE_TYPE_NONEXISTENT, "alert"),
        (b'{"action":"ice","dialogid":1}', p.CAUSE_MANDATORY_IE_MISSING, "'ref'"),
        (b'{"action":"DTMF","dialogid":1,"ref":2,"value":"A"}', p.CAUSE_INVALID_IE_CONTENTS,
         "DTMF"),
        (b'{"action":"release","dialogid":"x","ref":2}', p.CAUSE_INVALID_IE_CONTENTS,
         "dialogid"),
    ],
)
def test_bad_frames_get_a_cause_and_causestring(frame: bytes, cause: int, text: str) -> None:
    err = refused(frame)
    assert err.cause == cause
    assert text in err.causestring
    release = p.release_for(err)
    assert release.cause == cause and release.channel == 0


def test_offer_missing_mandatory_field_is_named() -> None:
    frame = offer_frame()
    del frame["ua_os"]
    err = refused(frame)
    assert err.cause == p.CAUSE_MANDATORY_IE_MISSING and "'ua_os'" in err.causestring


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ({"medium": 1}, "medium"),
        ({"module": "Boss"}, "module"),
        ({"module": "Agent"}, "roomkey"),
        ({"audio": "G729"}, "audio"),
        ({"offer": {"type": "answer", "sdp": SDP}}, "'offer'"),
    ],
)
def test_offer_semantics(extra: dict[str, object], text: str) -> None:
    assert text in refused(offer_frame(**extra)).causestring


def test_release_for_echoes_known_ids() -> None:
    err = refused(offer_frame(nickname="x" * 200))
    wire = p.encode(p.release_for(err))
    assert b'"dialogid":13290721' in wire and b'"ref":2392510' in wire


def test_frame_size_is_bounded() -> None:
    err = refused(b"{" + b" " * (p.MAX_FRAME_BYTES + 1) + b"}")
    assert err.cause == p.CAUSE_INVALID_MESSAGE and "too large" in err.causestring
