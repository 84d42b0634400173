"""The SIP stack against a real peer: sipp (Debian sip-tester) as the agent's desk phone.

Each test runs sipp in the foreground with one scenario from tests/sipp/, on ephemeral
loopback ports, and checks both sides: our events, and sipp's exit code (0 = every call in
the scenario succeeded, its regexp checks on our messages included). Like every test that
touches the network, these run only inside a loopback-only network namespace:

    tests/in-loopback-netns.sh .venv/bin/python -m pytest tests/sip -q
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.sip.endpoint import SipEndpoint
from appliance.sip.events import (
    Answered,
    CallEvent,
    Failed,
    RemoteHangup,
    RemoteMediaChanged,
    Ringing,
    Terminated,
)
from appliance.sip.sdp import audio_endpoint, build_offer
from appliance.sip.transaction import TimerConfig
from tests.sipp_runner import Sipp, free_udp_port, start_sipp

USER_AGENT = "WebRTC Media Server 1.0"
UUI = ("User-to-User", "7b22726f6f6d6b6579223a31323334357d;encoding=hex")
OFFER = build_offer("127.0.0.1", 40000, session_id=1)
# Short timers so a test can see Terminated (64*T1 = 3.2 s instead of 32 s).
FAST = TimerConfig(t1=0.05, t2=0.4, t4=0.5, d=0.5)


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("loopback_netns"),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) not installed"),
]


@dataclass
class Events:
    queue: asyncio.Queue[CallEvent] = field(default_factory=asyncio.Queue)
    seen: list[CallEvent] = field(default_factory=list)

    def __call__(self, event: CallEvent) -> None:
        self.queue.put_nowait(event)

    async def until(self, kind: type, timeout: float = 10.0) -> CallEvent:
        """The next event of `kind`, keeping every event seen on the way."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.queue.get()
                self.seen.append(event)
                if isinstance(event, kind):
                    return event


@pytest.fixture
async def endpoint(loopback_netns: None) -> AsyncIterator[SipEndpoint]:
    # The proxy is set per test (sipp's port), so the endpoint gets a placeholder here.
    ep = await SipEndpoint.create(("127.0.0.1", 0), ("127.0.0.1", 9), user_agent=USER_AGENT)
    yield ep
    ep.close()


async def endpoint_for(sipp: Sipp, timers: TimerConfig | None = None) -> SipEndpoint:
    kwargs = {"timers": timers} if timers is not None else {}
    return await SipEndpoint.create(
        ("127.0.0.1", 0), ("127.0.0.1", sipp.port), user_agent=USER_AGENT, **kwargs
    )


def place(ep: SipEndpoint, events: Events, **kwargs: object) -> str:
    call = ep.place_call("5678", "9333", OFFER, events, extra_headers=[UUI], **kwargs)  # type: ignore[arg-type]
    return call.call_id


def our_invite(sipp: Sipp) -> str:
    """The first INVITE sipp received, as sipp logged it."""
    log = sipp.messages
    start = log.find("INVITE sip:")
    assert start >= 0, sipp.diagnostics()
    return log[start : log.find("\n\n", start)]


def assert_our_headers(sipp: Sipp) -> None:
    invite = our_invite(sipp)
    assert 'From: "5678" <sip:5678@127.0.0.1>;tag=' in invite
    assert f"To: <sip:9333@127.0.0.1:{sipp.port}>" in invite
    assert f"{UUI[0]}: {UUI[1]}" in invite
    assert f"User-Agent: {USER_AGENT}" in invite


async def test_answer_rtp_echo_info_and_our_bye(tmp_path: Path) -> None:
    rtp_port = free_udp_port()
    sipp = await start_sipp(
        "uas_answer_echo.xml", tmp_path, "-rtp_echo", "-mp", str(rtp_port), "-mi", "127.0.0.1"
    )
    ep = await endpoint_for(sipp)
    events = Events()
    call_id = place(ep, events)
    answered = await events.until(Answered)
    assert [type(e).__name__ for e in events.seen] == ["Trying", "Ringing", "Answered"]
    assert isinstance(answered, Answered)
    far = audio_endpoint(answered.sdp)
    assert (far.address, far.port, far.telephone_event_pt) == ("127.0.0.1", rtp_port, 101)

    # The answer's address really is where the phone's RTP is: sipp echoes what we send.
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp:
        rtp.bind(("127.0.0.1", 0))
        rtp.setblocking(False)
        packet = bytes([0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 42]) + b"\xff" * 160
        await loop.sock_sendto(rtp, packet, (far.address, far.port))
        echoed = await asyncio.wait_for(loop.sock_recv(rtp, 2048), 5)
    assert echoed == packet

    assert ep.send_info_dtmf(call_id, "5")
    await asyncio.sleep(0.2)
    ep.hangup(call_id)
    assert await sipp.exit_code() == 0, sipp.diagnostics()
    assert_our_headers(sipp)
    assert "INFO sip:9333@127.0.0.1" in sipp.messages and "Signal=5" in sipp.messages
    ep.close()


async def test_bye_from_the_desk_phone(tmp_path: Path) -> None:
    sipp = await start_sipp("uas_answer_then_bye.xml", tmp_path)
    ep = await endpoint_for(sipp, FAST)
    events = Events()
    place(ep, events)
    await events.until(Answered)
    hangup = await events.until(RemoteHangup)
    assert hangup == RemoteHangup(16, "normal call clearing", call_id=hangup.call_id)
    assert await sipp.exit_code() == 0, sipp.diagnostics()
    await events.until(Terminated, timeout=10)
    assert not ep.agent.calls
    ep.close()


async def test_busy(tmp_path: Path) -> None:
    sipp = await start_sipp("uas_busy.xml", tmp_path)
    ep = await endpoint_for(sipp, FAST)
    events = Events()
    place(ep, events)
    failed = await events.until(Failed)
    assert isinstance(failed, Failed)
    assert (failed.status, failed.cause, failed.causestring) == (486, 17, "user busy")
    assert await sipp.exit_code() == 0, sipp.diagnostics()  # sipp got its ACK
    await events.until(Terminated, timeout=10)
    ep.close()


async def test_no_answer_ring_timeout_cancels(tmp_path: Path) -> None:
    sipp = await start_sipp("uas_no_answer.xml", tmp_path)
    ep = await endpoint_for(sipp)
    events = Events()
    place(ep, events, ring_timeout=1.0)
    await events.until(Ringing)
    failed = await events.until(Failed, timeout=5)
    assert isinstance(failed, Failed)
    assert (failed.cause, failed.causestring) == (19, "no answer")
    # CANCEL, 200, 487 and our ACK for it: the whole exchange sipp scripted.
    assert await sipp.exit_code() == 0, sipp.diagnostics()
    ep.close()


async def test_early_media_from_183(tmp_path: Path) -> None:
    rtp_port = free_udp_port()
    sipp = await start_sipp("uas_early_media.xml", tmp_path, "-mp", str(rtp_port))
    ep = await endpoint_for(sipp)
    events = Events()
    call_id = place(ep, events)
    ringing = await events.until(Ringing)
    assert isinstance(ringing, Ringing) and ringing.status == 183 and ringing.sdp is not None
    early = audio_endpoint(ringing.sdp)
    assert (early.port, early.direction) == (rtp_port, "sendonly")
    await events.until(Answered)
    ep.hangup(call_id)
    assert await sipp.exit_code() == 0, sipp.diagnostics()
    ep.close()


async def test_reinvite_hold_then_bye(tmp_path: Path) -> None:
    sipp = await start_sipp("uas_reinvite_hold.xml", tmp_path)
    ep = await endpoint_for(sipp)
    events = Events()
    place(ep, events)
    await events.until(Answered)
    changed = await events.until(RemoteMediaChanged)
    assert isinstance(changed, RemoteMediaChanged) and audio_endpoint(changed.sdp).on_hold
    await events.until(RemoteHangup)
    assert await sipp.exit_code() == 0, sipp.diagnostics()  # it checked our a=recvonly
    ep.close()


async def test_digest_challenge(tmp_path: Path) -> None:
    sipp = await start_sipp("uas_auth.xml", tmp_path)
    ep = await endpoint_for(sipp)
    events = Events()
    call_id = place(ep, events, credentials=("agent7", "s3cret"))
    await events.until(Answered)
    ep.hangup(call_id)
    assert await sipp.exit_code() == 0, sipp.diagnostics()  # verifyauth accepted the digest
    ep.close()


async def test_digest_with_a_wrong_password_is_refused(tmp_path: Path) -> None:
    sipp = await start_sipp("uas_auth.xml", tmp_path)
    ep = await endpoint_for(sipp)
    events = Events()
    place(ep, events, credentials=("agent7", "wrong"))
    failed = await events.until(Failed)
    assert isinstance(failed, Failed) and (failed.status, failed.cause) == (403, 21)
    assert await sipp.exit_code() == 1  # the scenario's bad-auth branch fails its call
    ep.close()


async def test_options_ping_from_the_pbx(tmp_path: Path, endpoint: SipEndpoint) -> None:
    sipp = await start_sipp("uac_options.xml", tmp_path, remote=endpoint.local_address)
    assert await sipp.exit_code() == 0, sipp.diagnostics()
