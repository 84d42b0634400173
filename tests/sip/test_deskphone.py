"""The simulated desk phone (deskphone/phone.py) over real loopback sockets: called by
our own UAC (SipEndpoint + OutgoingCall), and once by sipp's embedded UAC scenario.

    tests/in-loopback-netns.sh .venv/bin/python -m pytest tests/sip/test_deskphone.py -q
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.sip.endpoint import SipEndpoint
from appliance.sip.events import (
    Answered,
    CallEvent,
    Failed,
    RemoteHangup,
    Ringing,
    Terminated,
)
from appliance.sip.sdp import audio_endpoint, build_offer
from appliance.sip.transaction import TimerConfig
from deskphone.phone import DeskPhone, decode_user_to_user
from tests.sipp_runner import start_sipp

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("loopback_netns")]

UUI = ("User-to-User", "7b22726f6f6d6b6579223a31323334357d;encoding=hex")  # {"roomkey":12345}
OFFER = build_offer("127.0.0.1", 40000, session_id=1)
FAST = TimerConfig(t1=0.05, t2=0.4, t4=0.5, d=0.5)  # 64*T1 = 3.2 s
RTP_PORTS = (31000, 31099)
RING = 0.3

PhoneFactory = Callable[..., Awaitable[DeskPhone]]


@dataclass
class Events:
    queue: asyncio.Queue[CallEvent] = field(default_factory=asyncio.Queue)
    seen: list[tuple[float, CallEvent]] = field(default_factory=list)

    def __call__(self, event: CallEvent) -> None:
        self.queue.put_nowait(event)

    async def until(self, kind: type, timeout: float = 5.0) -> CallEvent:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.queue.get()
                self.seen.append((asyncio.get_running_loop().time(), event))
                if isinstance(event, kind):
                    return event

    def kinds(self) -> list[str]:
        return [type(e).__name__ for _, e in self.seen]


@pytest.fixture
async def start_phone(loopback_netns: None) -> AsyncIterator[PhoneFactory]:
    phones: list[DeskPhone] = []

    async def start(**kwargs: object) -> DeskPhone:
        options: dict[str, object] = {
            "ring_seconds": RING,
            "rtp_port_range": RTP_PORTS,
            "timers": FAST,
        }
        options.update(kwargs)
        phone = await DeskPhone.start(("127.0.0.1", 0), **options)  # type: ignore[arg-type]
        phones.append(phone)
        return phone

    yield start
    for phone in phones:
        await phone.close()


async def caller_for(phone: DeskPhone) -> SipEndpoint:
    return await SipEndpoint.create(
        ("127.0.0.1", 0), phone.address, user_agent="WebRTC Media Server 1.0", timers=FAST
    )


def place(ep: SipEndpoint, events: Events, **kwargs: object) -> str:
    call = ep.place_call("5678", "9333", OFFER, events, extra_headers=[UUI], **kwargs)  # type: ignore[arg-type]
    return call.call_id


async def until_ended(phone: DeskPhone, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not phone.records or phone.records[-1].ended is None:
            await asyncio.sleep(0.01)


def test_user_to_user_is_decoded() -> None:
    assert decode_user_to_user(UUI[1]) == '{"roomkey":12345}'
    assert decode_user_to_user("zz;encoding=hex") == "zz;encoding=hex"
    assert decode_user_to_user(None) is None


async def test_rings_answers_echoes_and_the_caller_hangs_up(
    start_phone: PhoneFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.deskphone")
    phone = await start_phone()
    ep = await caller_for(phone)
    events = Events()
    call_id = place(ep, events)
    answer = await events.until(Answered)
    assert events.kinds() == ["Trying", "Ringing", "Answered"]
    rang_at = next(t for t, e in events.seen if isinstance(e, Ringing))
    assert events.seen[-1][0] - rang_at >= RING * 0.9
    assert isinstance(answer, Answered)
    far = audio_endpoint(answer.sdp)
    assert far.address == "127.0.0.1" and RTP_PORTS[0] <= far.port <= RTP_PORTS[1]
    assert far.port % 2 == 0 and far.payload_types == [0, 101] and far.telephone_event_pt == 101

    # An echo-test phone: what goes to the answered address comes straight back.
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp:
        rtp.bind(("127.0.0.1", 0))
        rtp.setblocking(False)
        for seq in range(3):
            packet = bytes([0x80, 0, 0, seq, 0, 0, 0, 160, 0, 0, 0, 42]) + b"\xff" * 160
            await loop.sock_sendto(rtp, packet, (far.address, far.port))
            assert await asyncio.wait_for(loop.sock_recv(rtp, 2048), 2) == packet
        # RTCP on the port above is taken and ignored (no ICMP error, no answer).
        await loop.sock_sendto(rtp, b"\x81\xc9\x00\x01" + b"\x00" * 4, (far.address, far.port + 1))

    ep.hangup(call_id)
    await until_ended(phone)
    (record,) = phone.records
    assert (record.caller, record.callee, record.outcome) == ("5678", "9333", "answered")
    assert (record.ended_by, record.echoed, record.rtp_port) == ("caller", 3, far.port)
    assert record.user_to_user == '{"roomkey":12345}'
    assert record.duration is not None and record.duration >= 0
    line = caplog.records[-1].getMessage()
    assert "5678 -> 9333" in line and '{"roomkey":12345}' in line and "talked" in line
    assert phone.active_calls == 0
    ep.close()


async def test_hangup_after_sends_bye(start_phone: PhoneFactory) -> None:
    phone = await start_phone(ring_seconds=0.0, hangup_after=0.3)
    ep = await caller_for(phone)
    events = Events()
    place(ep, events)
    await events.until(Answered)
    hangup = await events.until(RemoteHangup)
    assert isinstance(hangup, RemoteHangup) and hangup.cause == 16
    await until_ended(phone)
    assert phone.records[0].ended_by == "phone"
    ep.close()


async def test_busy_mode(start_phone: PhoneFactory) -> None:
    phone = await start_phone(mode="busy")
    ep = await caller_for(phone)
    events = Events()
    place(ep, events)
    failed = await events.until(Failed)
    assert isinstance(failed, Failed)
    assert (failed.status, failed.cause, failed.causestring) == (486, 17, "user busy")
    assert events.kinds() == ["Trying", "Failed"]
    await events.until(Terminated)  # our ACK stopped the phone's 486 retransmissions
    assert phone.records[0].outcome == "busy (486)"
    ep.close()


async def test_no_answer_mode_until_the_caller_cancels(start_phone: PhoneFactory) -> None:
    phone = await start_phone(mode="no-answer")
    ep = await caller_for(phone)
    events = Events()
    place(ep, events, ring_timeout=0.5)
    await events.until(Ringing)
    failed = await events.until(Failed)
    assert isinstance(failed, Failed) and (failed.status, failed.cause) == (480, 19)
    await events.until(Terminated)  # CANCEL answered 200, INVITE 487, ACKed
    await until_ended(phone)
    assert phone.records[0].outcome == "cancelled by the caller (no answer)"
    ep.close()


async def test_close_ends_every_call_with_bye(start_phone: PhoneFactory) -> None:
    phone = await start_phone(ring_seconds=0.0)
    ep = await caller_for(phone)
    events = Events()
    place(ep, events)
    await events.until(Answered)
    await asyncio.sleep(0.1)  # the ACK reaches the phone: the call is up at both ends
    await phone.close()
    await events.until(RemoteHangup)
    assert phone.records[0].ended_by == "phone"
    ep.close()


async def test_two_calls_get_two_rtp_ports(start_phone: PhoneFactory) -> None:
    phone = await start_phone(ring_seconds=0.0)
    ep = await caller_for(phone)
    first, second = Events(), Events()
    calls = [place(ep, first), place(ep, second)]
    answers = [await first.until(Answered), await second.until(Answered)]
    ports = {audio_endpoint(a.sdp).port for a in answers if isinstance(a, Answered)}
    assert len(ports) == 2
    await asyncio.sleep(0.1)  # the ACKs reach the phone
    for call_id in calls:
        ep.hangup(call_id)
    async with asyncio.timeout(5):
        while phone.active_calls:
            await asyncio.sleep(0.01)
    assert [r.ended_by for r in phone.records] == ["caller", "caller"]
    ep.close()


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) not installed")
async def test_sipp_embedded_uac_calls_the_phone(start_phone: PhoneFactory, tmp_path: Path) -> None:
    phone = await start_phone()
    sipp = await start_sipp("uac", tmp_path, remote=phone.address, timeout="15s", builtin=True)
    try:
        assert await sipp.exit_code() == 0, sipp.diagnostics()
    finally:
        sipp.kill()
    await until_ended(phone)
    (record,) = phone.records
    assert (record.caller, record.callee, record.outcome) == ("sipp", "service", "answered")
    assert record.ended_by == "caller"
    assert "SIP/2.0 180 Ringing" in sipp.messages
