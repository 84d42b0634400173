"""SipEndpoint, the asyncio shell: real datagrams on loopback, one re-armed timer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from appliance.sip.endpoint import SipEndpoint
from appliance.sip.events import (
    Answered,
    CallEvent,
    Failed,
    RemoteHangup,
    Terminated,
)
from appliance.sip.message import SipRequest, parse, top_via
from appliance.sip.transaction import TimerConfig

from .peer import ANSWER_SDP, OFFER, in_dialog_request, reply

pytestmark = pytest.mark.usefixtures("loopback_netns")

TINY = TimerConfig(t1=0.02, t2=0.16, t4=0.2, d=0.2)  # Timer B = 1.28 s


class RawPeer:
    """A bare UDP socket standing in for the PBX, so every datagram can be inspected."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr: tuple[str, int] = self.sock.getsockname()

    async def recv(self, timeout: float = 5.0) -> tuple[SipRequest, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65536), timeout)
        message = parse(data)
        assert isinstance(message, SipRequest)
        return message, addr

    async def send(self, data: bytes, addr: tuple[str, int]) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, data, addr)


@pytest.fixture
async def peer() -> AsyncIterator[RawPeer]:
    p = RawPeer()
    yield p
    p.sock.close()


async def next_of(queue: asyncio.Queue[CallEvent], kind: type, timeout: float = 5.0) -> CallEvent:
    async with asyncio.timeout(timeout):
        while not isinstance(event := await queue.get(), kind):
            pass
    return event


async def test_silent_peer_gets_retransmissions_then_timer_b(peer: RawPeer) -> None:
    ep = await SipEndpoint.create(("127.0.0.1", 0), peer.addr, timers=TINY)
    events: asyncio.Queue[CallEvent] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    ep.place_call("5678", "9333", OFFER, events.put_nowait)
    arrivals = []
    while True:
        try:
            invite, _ = await peer.recv(timeout=2.0)
        except TimeoutError:
            break
        arrivals.append(loop.time() - started)
        assert invite.method == "INVITE"
    # 0, 0.02, 0.06, 0.14, 0.30, 0.62, 1.26: Timer A doubling, then Timer B at 1.28 s.
    assert len(arrivals) == 7
    assert arrivals[-1] == pytest.approx(1.26, abs=0.15)
    failed = await next_of(events, Failed)
    assert isinstance(failed, Failed) and (failed.status, failed.cause) == (408, 102)
    await next_of(events, Terminated)
    assert not ep.agent.calls
    ep.close()


async def test_answer_ack_and_remote_bye_over_udp(peer: RawPeer) -> None:
    ep = await SipEndpoint.create(("127.0.0.1", 0), peer.addr, user_agent="UA", timers=TINY)
    events: asyncio.Queue[CallEvent] = asyncio.Queue()
    call = ep.place_call("5678", "9333", OFFER, events.put_nowait)
    invite, source = await peer.recv()
    assert source == ep.local_address  # Via and Contact name the port we really use
    assert top_via(invite).port == ep.local_address[1]
    await peer.send(reply(invite, 180, contact=f"<sip:9333@{peer.addr[0]}:{peer.addr[1]}>"), source)
    ok = reply(invite, 200, sdp=ANSWER_SDP, contact=f"<sip:9333@{peer.addr[0]}:{peer.addr[1]}>")
    await peer.send(ok, source)
    answered = await next_of(events, Answered)
    assert isinstance(answered, Answered) and answered.sdp == ANSWER_SDP
    ack, _ = await peer.recv()
    assert ack.method == "ACK" and top_via(ack).branch != top_via(invite).branch

    bye = in_dialog_request(invite, "desk1", "BYE", 1)
    await peer.send(bye, source)
    response = parse(await asyncio.wait_for(
        asyncio.get_running_loop().sock_recv(peer.sock, 65536), 5
    ))  # fmt: skip
    assert response.status == 200  # type: ignore[union-attr]
    await next_of(events, RemoteHangup)
    await next_of(events, Terminated)  # every timer ran out through the one re-armed handle
    assert call.call_id not in ep.agent.calls
    ep.close()
    await ep.wait_closed()


async def test_a_bad_header_from_the_owner_leaves_no_call(peer: RawPeer) -> None:
    ep = await SipEndpoint.create(("127.0.0.1", 0), peer.addr)
    with pytest.raises(ValueError):
        ep.place_call(
            "5678", "9333", OFFER, lambda e: None, extra_headers=[("X-Evil", "a\r\nVia: x")]
        )
    assert not ep.agent.calls
    ep.close()


async def test_a_wildcard_bind_advertises_a_real_address(peer: RawPeer) -> None:
    ep = await SipEndpoint.create(("0.0.0.0", 0), peer.addr)
    assert ep.local_address[0] == "127.0.0.1"  # the route towards the proxy, not 0.0.0.0
    ep.close()
    ep = await SipEndpoint.create(("127.0.0.1", 0), peer.addr, advertise="127.0.0.5")
    ep.place_call("5678", "9333", OFFER, lambda e: None)
    invite, _ = await peer.recv()
    assert invite.headers.get("Contact", "").startswith("<sip:5678@127.0.0.5:")  # type: ignore[union-attr]
    ep.close()


async def test_the_proxy_name_is_resolved_once_for_the_source_check() -> None:
    ep = await SipEndpoint.create(
        ("127.0.0.1", 0), ("localhost", 5099), allowed_sources=["127.0.0.64/26"],
        strict_source_port=True,
    )
    sources = ep.agent.sources
    assert ("127.0.0.1", 5099) in sources.proxies and sources.strict_port
    assert sources.allows_out_of_dialog(("127.0.0.1", 5099))
    assert not sources.allows_out_of_dialog(("127.0.0.1", 5098))  # strict: the port too
    assert sources.allows_out_of_dialog(("127.0.0.65", 1))
    assert ep.stats == {"sip_parse_errors": 0, "sip_refused_source": 0, "sip_replies_limited": 0}
    ep.close()
