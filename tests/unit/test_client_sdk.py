"""The Python APP SDK (appliance.client) against a small fake MS.

The fake plays the MS's part of PROTOCOL.md with a real aiortc answering peer connection
that echoes the SDK's media back, so these tests move RTP over loopback. Run them inside a
loopback-only network namespace:

    unshare -n sh -c 'ip link set lo up; ip route add default dev lo src 127.0.0.1;
                      .venv/bin/python -m pytest tests/unit/test_client_sdk.py -q'
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.core import protocol
from appliance.edges.rtc_adapter import CandidatePolicy, apply_candidate_policy, make_configuration
from appliance_sdk import Call, CallEnded, MediaServerClient

LOOPBACK = CandidatePolicy.from_strings(["127.0.0.1"], port_min=0, port_max=0)
USERDATA = '{"id":"A123456789","name":"test"}'


def sdp_candidates(sdp: str) -> Iterator[tuple[str, str | None, int]]:
    """(candidate line as browsers send it, mid, m-line index) for each candidate."""
    index, mid = -1, None
    for line in sdp.splitlines():
        if line.startswith("m="):
            index, mid = index + 1, None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        elif line.startswith("a=candidate:"):
            yield line[2:], mid, index


def without_candidates(sdp: str) -> str:
    """The SDP of a trickle-only MS: candidates come only as ice frames."""
    lines = [
        line
        for line in sdp.split("\r\n")
        if not line.startswith(("a=candidate:", "a=end-of-candidates"))
    ]
    return "\r\n".join(lines)


class FakeMS:
    """Plays the MS: alert, answer, one ice per candidate, DTLSconnect once connected."""

    def __init__(self) -> None:
        self.url = ""
        self.mode = "full"  # "full": answer and connect; "alert": only alert the offer
        self.ice_first = False  # send the ice frames before the answer
        self.trickle_only = False  # strip candidates from the answer SDP
        self.received: list[str] = []  # every text frame, exactly as it arrived
        self.pcs: list[RTCPeerConnection] = []
        self.ws: web.WebSocketResponse | None = None
        self._next_channel = 4
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            self.received.append(msg.data)
            try:
                frame = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(frame, dict) and frame.get("action") == "offer":
                self._spawn(self._on_offer(frame))
        return ws

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, frame: protocol.Action | str) -> None:
        assert self.ws is not None
        text = frame if isinstance(frame, str) else protocol.encode(frame).decode()
        await self.ws.send_str(text)

    async def raw_frame(self, action: str, timeout: float = 5) -> str:
        """The first received frame with this action, as sent (waiting for it if need be)."""
        async with asyncio.timeout(timeout):
            while True:
                for raw in self.received:
                    try:
                        frame = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(frame, dict) and frame.get("action") == action:
                        return raw
                await asyncio.sleep(0.01)

    async def frame(self, action: str, timeout: float = 5) -> dict[str, Any]:
        return json.loads(await self.raw_frame(action, timeout))

    async def _on_offer(self, frame: dict[str, Any]) -> None:
        ids = {"dialogid": frame["dialogid"], "ref": frame["ref"]}
        channel = self._next_channel
        self._next_channel += 1
        await self.send(protocol.Alert(**ids, channel=channel))
        if self.mode != "full":
            return
        pc = RTCPeerConnection(make_configuration([]))
        self.pcs.append(pc)

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                medium = protocol.medium_name(frame["medium"])
                self._spawn(self.send(protocol.DTLSconnect(**ids, channel=channel, medium=medium)))

        await pc.setRemoteDescription(RTCSessionDescription(**frame["offer"]))
        for transceiver in pc.getTransceivers():
            pc.addTrack(transceiver.receiver.track)  # echo the caller's media back
        apply_candidate_policy(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createAnswer())
        sdp = pc.localDescription.sdp
        answer = protocol.Answer(
            **ids,
            channel=channel,
            medium=frame["medium"],
            answer=protocol.SessionDescription(
                type="answer", sdp=without_candidates(sdp) if self.trickle_only else sdp
            ),
        )
        ices = [
            protocol.Ice(
                **ids,
                channel=channel,
                ice=protocol.IceCandidate(candidate=line, sdpMid=mid, sdpMLineIndex=index),
            )
            for line, mid, index in sdp_candidates(sdp)
        ]
        for action in [*ices, answer] if self.ice_first else [answer, *ices]:
            await self.send(action)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for pc in self.pcs:
            await pc.close()
        if self.ws is not None:
            await self.ws.close()


async def _serve(fake: FakeMS, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"{'wss' if ssl_context else 'ws'}://{host}:{port}/"
    return runner


@pytest.fixture
async def fake_ms() -> AsyncIterator[FakeMS]:
    fake = FakeMS()
    runner = await _serve(fake)
    yield fake
    await fake.close()
    await runner.cleanup()


@pytest.fixture
async def client(fake_ms: FakeMS) -> AsyncIterator[MediaServerClient]:
    async with await MediaServerClient.connect(fake_ms.url) as sdk:
        yield sdk


async def _eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def _connected_call(client: MediaServerClient) -> Call:
    call = await client.make_video_call(5678, 9333, USERDATA, record=1, lifetime=600)
    await call.wait_for("dtls_connect", timeout=5)
    return call


async def test_video_call_gets_alert_answer_dtls_connect(
    fake_ms: FakeMS, client: MediaServerClient
) -> None:
    call = await client.make_video_call(
        5678, 9333, USERDATA, record=1, lifetime=600, suid="s-1", nickname="Ann"
    )
    alert = await call.wait_for("alert")
    answer = await call.wait_for("answer")
    await call.wait_for("dtls_connect", timeout=5)
    assert alert.at <= answer.at
    assert call.channel == 4
    assert answer.detail == "applied"
    assert call.pc.remoteDescription is not None

    # The offer is one the MS's own strict decoder accepts, with every field we gave.
    offer = protocol.decode(fake_ms.received[0])
    assert isinstance(offer, protocol.Offer)
    assert (offer.dialogid, offer.ref) == (call.dialogid, call.ref)
    assert 0 < call.dialogid < 2**32 and 0 < call.ref < 2**32
    assert (offer.caller, offer.callee, offer.userdata) == (5678, 9333, USERDATA)
    assert (offer.module, offer.medium, offer.record, offer.lifetime) == ("User", 2, 1, 600)
    assert (offer.suid, offer.nickname, offer.audio) == ("s-1", "Ann", "PCMU")
    assert offer.ua_family == "python-sdk" and offer.ua_version and offer.ua_os
    assert fake_ms.received[0].startswith('{"action":"offer"')
    sdp = offer.offer.sdp
    assert "m=audio" in sdp and "m=video" in sdp and "127.0.0.1" in sdp
    # PCMU asked for: it leads the audio payload types.
    m_audio = next(line for line in sdp.splitlines() if line.startswith("m=audio"))
    first_pt = m_audio.split()[3]
    assert f"a=rtpmap:{first_pt} PCMU/8000" in sdp

    # The MS repeats its SDP candidates as ice frames: tolerated as duplicates.
    ice_details = {e.detail for e in call.history if e.name == "ice"}
    assert ice_details <= {"duplicate", "applied"} and "duplicate" in ice_details


async def test_media_flows_both_ways(fake_ms: FakeMS, client: MediaServerClient) -> None:
    call = await _connected_call(client)

    # The fake echoes what it receives: frames coming back prove both directions work.
    def both_kinds() -> bool:
        frames = call.frames_received
        return frames.get("audio", 0) > 5 and frames.get("video", 0) > 2

    await _eventually(both_kinds)


async def test_ice_before_answer_is_applied_after_it(
    fake_ms: FakeMS, client: MediaServerClient
) -> None:
    # A trickle-only MS that sends its candidates first: connecting needs the queued ones.
    fake_ms.ice_first = True
    fake_ms.trickle_only = True
    call = await client.make_video_call(5678, 9333, USERDATA)
    await call.wait_for("dtls_connect", timeout=5)
    names = [e.name for e in call.history if e.name in ("ice", "answer")]
    assert names[0] == "ice" and "answer" in names
    assert {e.detail for e in call.history if e.name == "ice"} == {"queued"}


async def test_hangup_sends_release(fake_ms: FakeMS, client: MediaServerClient) -> None:
    call = await _connected_call(client)
    await call.hangup()
    frame = await fake_ms.frame("release")
    assert frame == {
        "action": "release",
        "dialogid": call.dialogid,
        "ref": call.ref,
        "channel": call.channel,
        "cause": 16,
        "causestring": "normal release",
    }
    assert isinstance(protocol.decode(json.dumps(frame)), protocol.Release)
    assert call.ended and call.pc.connectionState == "closed"
    await call.hangup()  # idempotent: no second release
    await asyncio.sleep(0.05)
    assert sum('"release"' in raw for raw in fake_ms.received) == 1


async def test_ms_release_ends_the_call(fake_ms: FakeMS, client: MediaServerClient) -> None:
    call = await _connected_call(client)
    await fake_ms.send(
        protocol.Release(
            dialogid=call.dialogid,
            ref=call.ref,
            channel=call.channel or 0,
            cause=16,
            causestring="Connect Timeout",
        )
    )
    event = await call.wait_for("release")
    assert isinstance(event.action, protocol.Release)
    assert event.action.causestring == "Connect Timeout"
    assert call.ended and call.release is event.action
    await _eventually(lambda: call.pc.connectionState == "closed")
    with pytest.raises(CallEnded):  # nothing more will come: fail fast, no timeout
        await call.wait_for("my_resolution", timeout=5)


async def test_send_raw_is_unchanged_and_unrouted_release_is_queued(
    fake_ms: FakeMS, client: MediaServerClient
) -> None:
    broken = '{"action":"offer","dialogid":1,"ref": 2, "nickname":"Zoë 🙂",'.encode()
    await client.send_raw(broken)
    await client.send_raw("not json at all")
    await _eventually(lambda: len(fake_ms.received) == 2)
    assert fake_ms.received[0].encode() == broken
    assert fake_ms.received[1] == "not json at all"

    # What the MS answers a frame it cannot parse: a release naming no call.
    await fake_ms.send('{"action":"release","channel":0,"cause":95,"causestring":"malformed"}')
    async with asyncio.timeout(2):
        event = await client.unrouted.get()
    assert event.name == "release"
    assert isinstance(event.action, protocol.Release) and event.action.cause == 95

    # A frame the SDK cannot decode lands there too, with its raw text.
    await fake_ms.send("garbage")
    async with asyncio.timeout(2):
        event = await client.unrouted.get()
    assert (event.name, event.raw) == ("invalid", "garbage")


async def test_dtmf_and_peerdata_frames_are_well_formed(
    fake_ms: FakeMS, client: MediaServerClient
) -> None:
    fake_ms.mode = "alert"
    call = await client.make_video_call(5678, 9333, USERDATA)
    await call.wait_for("alert")
    with pytest.raises(ValueError):
        await call.send_dtmf("x")
    await call.send_dtmf("#")
    await call.send_peerdata("zoom", "2")
    raw_dtmf = await fake_ms.raw_frame("DTMF")
    assert raw_dtmf == (
        f'{{"action":"DTMF","dialogid":{call.dialogid},"ref":{call.ref},'
        f'"channel":4,"value":"#"}}'
    )
    dtmf = protocol.decode(raw_dtmf)  # the MS's own validator accepts it
    assert isinstance(dtmf, protocol.DTMF) and dtmf.value == "#"
    peerdata = protocol.decode(json.dumps(await fake_ms.frame("peerdata")))
    assert isinstance(peerdata, protocol.PeerData)
    assert (peerdata.type, peerdata.peerdata, peerdata.value) == ("command", "zoom", "2")
    assert (peerdata.dialogid, peerdata.ref, peerdata.medium) == (call.dialogid, call.ref, "video")


async def test_ms_events_are_routed_and_kept(fake_ms: FakeMS, client: MediaServerClient) -> None:
    fake_ms.mode = "alert"
    other = await client.make_video_call(1, 2, USERDATA, medium=0)
    call = await client.make_video_call(5678, 9333, USERDATA)
    await call.wait_for("alert")
    await other.wait_for("alert")
    ids = {"dialogid": call.dialogid, "ref": call.ref, "channel": call.channel or 0}
    for action in (
        protocol.PeerData(**ids, peerchannel=66, peerdata="Join", value="width=0;height=0"),
        protocol.MyResolution(**ids, width=320, height=240, REMB=500, framerate=15),
        protocol.PeerResolution(**ids, width=640, height=480),
        protocol.RecordStatus(**ids, record_file="audio/x_004.wav"),
        protocol.DTMF(**ids, value="1"),
        protocol.PeerData(**ids, type="command", peerdata="hello"),
        protocol.Message(**ids, message="503 ...", level="warning"),
        protocol.PeerData(**ids, peerchannel=66, peerdata="Leave"),
    ):
        await fake_ms.send(action)
    # Waiting for the last one first leaves the earlier ones available, in order.
    message = await call.wait_for("message")
    assert isinstance(message.action, protocol.Message) and message.action.level == "warning"
    join = await call.wait_for("Join")
    assert isinstance(join.action, protocol.PeerData) and join.action.peerchannel == 66
    for name in ("my_resolution", "peer_resolution", "record_status", "DTMF", "peerdata"):
        event = await call.wait_for(name, timeout=1)
        assert event.at <= message.at
    await call.wait_for("Leave")
    # Only the call they named got them.
    assert [e.name for e in other.history] == ["alert"]
    assert client.unrouted.empty()

    # Concurrent waiters each get their own event.
    for action in (protocol.Message(**ids, message="a"), protocol.DTMF(**ids, value="2")):
        await fake_ms.send(action)
    got = await asyncio.gather(call.wait_for("DTMF"), call.wait_for("message"))
    assert [e.name for e in got] == ["DTMF", "message"]


async def test_reader_survives_bad_frames(fake_ms: FakeMS, client: MediaServerClient) -> None:
    fake_ms.mode = "alert"
    call = await client.make_video_call(5678, 9333, USERDATA)
    await call.wait_for("alert")
    d, r = call.dialogid, call.ref
    for text in (
        "[1, 2",
        f'{{"action":"bogus","dialogid":{d},"ref":{r}}}',
        # The original's ice example: it lacks the address, so it cannot be parsed.
        f'{{"action":"ice","dialogid":{d},"ref":{r},"channel":4,"ice":{{"candidate":'
        '"candidate:1 1 udp 2113929727 30003 typ host generation 0 ufrag IiCT",'
        '"sdpMid":"0","sdpMLineIndex":0}}',
        # An SDP aiortc refuses: the handler raises, the call carries on.
        f'{{"action":"answer","dialogid":{d},"ref":{r},"channel":4,"medium":2,'
        '"answer":{"type":"answer","sdp":"v=0\\r\\nbogus"}}',
        # The original's sloppy numeric strings are accepted.
        f'{{"action":"DTMF","dialogid":"{d}","ref":"{r}","channel":"4","value":"9"}}',
    ):
        await fake_ms.send(text)
    invalid = await call.wait_for("invalid")
    assert invalid.raw is not None and "bogus" in str(invalid.raw)
    ice = await call.wait_for("ice")
    assert ice.detail is not None and ice.detail.startswith("invalid")
    answer = await call.wait_for("answer")
    assert answer.detail == "error"
    dtmf = await call.wait_for("DTMF")
    assert isinstance(dtmf.action, protocol.DTMF) and dtmf.action.value == "9"
    async with asyncio.timeout(2):
        unrouted = await client.unrouted.get()
    assert unrouted.name == "invalid" and unrouted.raw == "[1, 2"
    assert not client.closed


async def test_join_room_sends_agent_offer(fake_ms: FakeMS, client: MediaServerClient) -> None:
    fake_ms.mode = "alert"
    call = await client.join_room(12345, medium=0, nickname="Agent B")
    await call.wait_for("alert")
    offer = protocol.decode(fake_ms.received[0])
    assert isinstance(offer, protocol.Offer)
    assert (offer.module, offer.roomkey, offer.medium, offer.nickname) == (
        "Agent",
        12345,
        0,
        "Agent B",
    )
    assert offer.caller is msgspec.UNSET and offer.userdata is msgspec.UNSET
    assert offer.offer.sdp.count("m=") == 1 and "m=audio" in offer.offer.sdp
    assert call.roomkey == 12345
    await call.close()
    assert (call.dialogid, call.ref) not in client.calls
    assert (await fake_ms.frame("release"))["dialogid"] == call.dialogid


async def test_close_hangs_up_open_calls(fake_ms: FakeMS) -> None:
    fake_ms.mode = "alert"
    sdk = await MediaServerClient.connect(fake_ms.url)
    call = await sdk.make_video_call(5678, 9333, USERDATA)
    await call.wait_for("alert")
    await sdk.close()
    assert sdk.closed and call.ended
    assert (await fake_ms.frame("release"))["ref"] == call.ref
    with pytest.raises(ConnectionError):
        await sdk.send_raw("{}")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_wss_with_self_signed_certificate(tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    fake = FakeMS()
    runner = await _serve(fake, context)
    try:
        assert fake.url.startswith("wss://127.0.0.1:")
        # Default: verification off, as the appliance ships a self-signed certificate.
        async with await MediaServerClient.connect(fake.url) as sdk:
            await sdk.send_raw("{}")
        # Switched on, with the right CA: accepted; without it: refused.
        async with await MediaServerClient.connect(
            fake.url, ssl_verify=True, cafile=str(cert_path)
        ) as sdk:
            await sdk.send_raw("[]")
        await _eventually(lambda: fake.received == ["{}", "[]"])
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await MediaServerClient.connect(fake.url, ssl_verify=True)
        with pytest.raises(ValueError):
            await MediaServerClient.connect(fake.url, cafile=str(cert_path))
    finally:
        await fake.close()
        await runner.cleanup()
