"""RFC 3261 §12 dialog state for the UAC side, and the in-dialog requests built from it.

A dialog is what lets a later request (ACK for a 2xx, BYE, INFO) reach the same desk phone
through the same proxies: the remote target from the peer's Contact, the route set from
Record-Route (reversed, because we are the UAC), both tags and both CSeq spaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from .message import (
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    build_response,
    cseq_of,
    parse_name_addr,
    parse_uri,
)
from .transaction import Addr

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE"
ACCEPT = "application/sdp, application/dtmf-relay, application/dtmf"


def new_tag() -> str:
    """A From/To tag of ours (§19.3): random, so a dialog's identity cannot be guessed."""
    return secrets.token_hex(6)


@dataclass
class Dialog:
    call_id: str
    local: NameAddr  # our From, with our tag
    remote: NameAddr  # their To, with their tag
    local_seq: int
    remote_target: str
    route_set: list[str] = field(default_factory=list)
    local_contact: str = ""
    remote_seq: int | None = None
    confirmed: bool = False

    @property
    def local_tag(self) -> str:
        return self.local.tag or ""

    @property
    def remote_tag(self) -> str:
        return self.remote.tag or ""

    @classmethod
    def from_uac_response(cls, request: SipRequest, response: SipResponse) -> Dialog:
        """§12.1.2: the dialog a 1xx-with-tag (early) or 2xx (confirmed) response creates."""
        dialog = cls(
            call_id=request.headers.get("Call-ID") or "",
            local=parse_name_addr(request.headers.get("From") or ""),
            remote=parse_name_addr(response.headers.get("To") or ""),
            local_seq=cseq_of(request).seq,
            remote_target=request.uri,
            local_contact=request.headers.get("Contact") or "",
        )
        dialog.update_from_response(response)
        return dialog

    def update_from_response(self, response: SipResponse) -> None:
        """§12.1.2 / §13.2.2.4: a 2xx (re)computes the route set and the remote target."""
        self.route_set = list(reversed(response.headers.get_all("Record-Route")))
        self._refresh_target(response.headers.get("Contact"))
        if 200 <= response.status < 300:
            self.confirmed = True

    def target_refresh(self, request: SipRequest) -> None:
        """§12.2.2: a re-INVITE or UPDATE may move the remote target."""
        self._refresh_target(request.headers.get("Contact"))

    def _refresh_target(self, contact: str | None) -> None:
        if not contact:
            return
        # A Contact we cannot read keeps the old target rather than losing the dialog.
        with contextlib.suppress(SipParseError):
            self.remote_target = parse_name_addr(contact).uri

    def matches(self, request: SipRequest) -> bool:
        """Whether an incoming request is in this dialog (their From tag, our To tag)."""
        try:
            from_tag = parse_name_addr(request.headers.get("From") or "").tag
            to_tag = parse_name_addr(request.headers.get("To") or "").tag
        except SipParseError:
            return False
        return (
            request.headers.get("Call-ID") == self.call_id
            and to_tag == self.local_tag
            and from_tag == self.remote_tag
        )

    def accept_remote_cseq(self, request: SipRequest) -> bool:
        """§12.2.2: a CSeq lower than the last one seen is out of order (answer 500)."""
        seq = cseq_of(request).seq
        if request.method in ("ACK", "CANCEL"):
            return True
        if self.remote_seq is not None and seq < self.remote_seq:
            return False
        self.remote_seq = seq
        return True

    def _uri_and_routes(self) -> tuple[str, list[str]]:
        """§12.2.1.1: loose routing keeps the target as Request-URI; a strict router (no
        ;lr) must be the Request-URI and the target goes last in Route."""
        if not self.route_set:
            return self.remote_target, []
        try:
            first = parse_name_addr(self.route_set[0])
            loose = "lr" in parse_uri(first.uri).params
        except SipParseError:
            loose = True
        if loose:
            return self.remote_target, list(self.route_set)
        return first.uri, [*self.route_set[1:], f"<{self.remote_target}>"]

    def next_hop(self, default: Addr) -> Addr:
        """Where in-dialog requests go: the first Route, else the remote target. We do no
        DNS (no RFC 3263 lookups), so a host that is not an IP literal means `default`."""
        uri, routes = self._uri_and_routes()
        target = uri
        if routes:
            try:
                target = parse_name_addr(routes[0]).uri
            except SipParseError:
                return default
        try:
            parsed = parse_uri(target)
            host = parsed.host.strip("[]")
            ipaddress.ip_address(host)
        except (SipParseError, ValueError):
            return default
        return (host, parsed.port or 5060)

    def create_request(
        self,
        method: str,
        via: str,
        *,
        cseq: int | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> SipRequest:
        """An in-dialog request. `cseq` reuses a number (ACK); otherwise the next local one."""
        if cseq is None:
            self.local_seq += 1
            cseq = self.local_seq
        uri, routes = self._uri_and_routes()
        request = SipRequest(method, uri, body=body)
        out = request.headers
        out.add("Via", via)
        out.add("Max-Forwards", "70")
        out.add("From", str(self.local))
        out.add("To", str(self.remote))
        out.add("Call-ID", self.call_id)
        out.add("CSeq", f"{cseq} {method}")
        for route in routes:
            out.add("Route", route)
        if method in ("INVITE", "UPDATE") and self.local_contact:
            out.add("Contact", self.local_contact)
        for name, value in headers:
            out.add(name, value)
        return request

    def create_ack(self, invite_cseq: int, via: str, body: bytes = b"") -> SipRequest:
        """§13.2.2.4: the ACK for a 2xx is a new transaction (new branch) in the dialog."""
        headers = [("Content-Type", "application/sdp")] if body else []
        return self.create_request("ACK", via, cseq=invite_cseq, headers=headers, body=body)

    def create_response(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> SipResponse:
        """A response to an in-dialog request; 2xx to INVITE/UPDATE carry our Contact."""
        extra = list(headers)
        if 200 <= status < 300 and request.method in ("INVITE", "UPDATE") and self.local_contact:
            extra.insert(0, ("Contact", self.local_contact))
        return build_response(
            request, status, reason, to_tag=self.local_tag, headers=extra, body=body
        )
