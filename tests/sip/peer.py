"""Hand-written peer messages for driving the sans-IO SIP objects in tests."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.sip.call import OutgoingCall
from appliance.sip.events import CallEvent
from appliance.sip.message import (
    SipRequest,
    SipResponse,
    build_response,
    parse,
    serialize,
)
from appliance.sip.sdp import build_offer

LOCAL = ("127.0.0.1", 5062)
PROXY = ("127.0.0.1", 5080)
PEER_CONTACT = "<sip:9333@127.0.0.1:5090>"
OFFER = build_offer("127.0.0.1", 40000, session_id=4242)
ANSWER_SDP = (
    "v=0\r\n"
    "o=desk 77 1 IN IP4 127.0.0.2\r\n"
    "s=-\r\n"
    "c=IN IP4 127.0.0.2\r\n"
    "t=0 0\r\n"
    "m=audio 30000 RTP/AVP 0 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=sendrecv\r\n"
)
UUI = ("User-to-User", "7b22726f6f6d6b6579223a317d;encoding=hex")


def make_call(**overrides: object) -> OutgoingCall:
    args: dict[str, object] = {
        "local": LOCAL,
        "proxy": PROXY,
        "caller": "5678",
        "callee": "9333",
        "local_sdp": OFFER,
        "user_agent": "WebRTC Media Server 1.0",
        "extra_headers": [UUI],
    }
    args.update(overrides)
    return OutgoingCall(**args)  # type: ignore[arg-type]


def sent(obj: object) -> list[SipRequest | SipResponse]:
    """Parse everything `obj` (a call or an agent) wants to send."""
    return [parse(data) for data, _ in obj.datagrams_to_send()]  # type: ignore[attr-defined]


def sent_with_dest(obj: object) -> list[tuple[SipRequest | SipResponse, tuple[str, int]]]:
    return [(parse(data), addr) for data, addr in obj.datagrams_to_send()]  # type: ignore[attr-defined]


def events(call: OutgoingCall) -> list[CallEvent]:
    out = []
    while (event := call.next_event()) is not None:
        out.append(event)
    return out


def reply(
    request: SipRequest,
    status: int,
    *,
    to_tag: str | None = "desk1",
    sdp: str | None = None,
    contact: str | None = PEER_CONTACT,
    record_route: Iterable[str] = (),
    headers: Iterable[tuple[str, str]] = (),
    reason: str | None = None,
) -> bytes:
    extra: list[tuple[str, str]] = [("Record-Route", rr) for rr in record_route]
    if contact and status > 100:
        extra.append(("Contact", contact))
    extra.extend(headers)
    body = b""
    if sdp is not None:
        extra.append(("Content-Type", "application/sdp"))
        body = sdp.encode()
    response = build_response(
        request, status, reason, to_tag=to_tag if status > 100 else None, headers=extra, body=body
    )
    return serialize(response)


def in_dialog_request(
    invite: SipRequest,
    response_to_tag: str,
    method: str,
    cseq: int,
    *,
    branch: str = "z9hG4bKpeer1",
    sdp: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    content_type: str | None = None,
) -> bytes:
    """A request from the desk phone inside the dialog the INVITE created."""
    local_from = invite.headers.get("From") or ""
    remote_to = invite.headers.get("To") or ""
    request = SipRequest(method, invite.headers.get("Contact", "").strip("<>"))  # type: ignore[union-attr]
    h = request.headers
    h.add("Via", f"SIP/2.0/UDP 127.0.0.1:5090;rport;branch={branch}")
    h.add("Max-Forwards", "70")
    h.add("From", f"{remote_to};tag={response_to_tag}")
    h.add("To", local_from)
    h.add("Call-ID", invite.headers.get("Call-ID") or "")
    h.add("CSeq", f"{cseq} {method}")
    h.add("Contact", PEER_CONTACT)
    for name, value in headers:
        h.add(name, value)
    if sdp is not None:
        h.add("Content-Type", "application/sdp")
        request.body = sdp.encode()
    elif body is not None:
        if content_type:
            h.add("Content-Type", content_type)
        request.body = body
    return serialize(request)
