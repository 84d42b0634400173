"""The SIP port against strangers, end to end: a real appliance, sipp as the desk phone,
and a stranger on another loopback address who knows the call's Call-ID and tags.

Finding 5 (a stranger's BYE ended the call; its re-INVITE moved the voice to the stranger),
finding 15a (a PBX resuming from hold with a re-INVITE without SDP), and the SIP fuzzer
against a live call (small in `make test`, >= 10^6 datagrams in `make fuzz`)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import eventually, free_udp_ports
from tests.e2e.test_voice import desk_call, place_call, sipp_ok
from tests.fuzz_scale import scaled
from tests.sip.mutate import garbage, mutate
from tests.sipp_runner import Sipp, start_sipp

pytestmark = pytest.mark.e2e

STRANGER_IP = "127.0.0.2"


@dataclass(frozen=True)
class DialogIds:
    """What a stranger who read a log or a capture knows about the call."""

    call_id: str
    our_from: str  # the appliance's From (with its tag): the To of requests towards it
    phone_to: str  # the phone's To (with its tag): the From of requests towards it
    our_contact: str  # the Request-URI of requests towards the appliance
    worker_port: int  # the worker's SIP port (from the INVITE's Via)


async def dialog_ids(sipp: Sipp, timeout: float = 10.0) -> DialogIds:
    """Read the confirmed dialog from sipp's message log (it writes it as it goes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = sipp.messages
        invite = re.search(r"^INVITE sip:.*?(?=\n\n)", log, re.S | re.M)
        ok = re.search(r"^SIP/2\.0 200 OK\n.*?CSeq: 1 INVITE.*?(?=\n\n)", log, re.S | re.M)
        if invite and ok:
            head = invite.group(0)

            def header(name: str, text: str = head) -> str:
                found = re.search(rf"^{name}: *(.*)$", text, re.M)
                assert found, (name, text)
                return found.group(1).strip()

            via_port = re.search(r"127\.0\.0\.1:(\d+)", header("Via"))
            assert via_port
            return DialogIds(
                call_id=header("Call-ID"),
                our_from=header("From"),
                phone_to=header("To", ok.group(0)),
                our_contact=header("Contact").strip("<>"),
                worker_port=int(via_port.group(1)),
            )
        await asyncio.sleep(0.1)
    raise AssertionError(f"no confirmed dialog in sipp's log:\n{sipp.diagnostics()}")


def in_dialog(ids: DialogIds, method: str, cseq: int, source: tuple[str, int],
              sdp: str = "", branch: str = "") -> bytes:
    """A request towards the appliance as the phone would send it in this dialog."""
    body = sdp.encode()
    lines = [
        f"{method} {ids.our_contact} SIP/2.0",
        f"Via: SIP/2.0/UDP {source[0]}:{source[1]};rport;branch=z9hG4bK{branch or method}{cseq}",
        "Max-Forwards: 70",
        f"From: {ids.phone_to}",
        f"To: {ids.our_from}",
        f"Call-ID: {ids.call_id}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:9333@{source[0]}:{source[1]}>",
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def hijack_sdp(address: str, port: int) -> str:
    return (
        f"v=0\r\no=evil 1 2 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
    )


@pytest.fixture
def stranger() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A SIP socket and an RTP socket on another loopback address."""
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (sip, rtp):
        s.bind((STRANGER_IP, 0))
        s.setblocking(False)
    yield sip, rtp
    sip.close()
    rtp.close()


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def appliance_log(tmp_path: Path) -> str:
    logs = tmp_path.glob("appliance-*/appliance.log")
    return "".join(p.read_text(errors="replace") for p in logs)


async def test_a_stranger_with_the_dialog_ids_cannot_end_or_take_the_call(
    tmp_path: Path, aps: Any, make_appliance: Any, stranger: tuple[socket.socket, socket.socket]
) -> None:
    sip, rtp = stranger
    async with desk_call(tmp_path, aps, make_appliance, "desk_echo_then_bye.xml") as (
        call, _track, reader, sipp
    ):
        await call.wait_for("Join", timeout=15)
        ids = await dialog_ids(sipp)
        target = ("127.0.0.1", ids.worker_port)
        me = sip.getsockname()
        await asyncio.sleep(1.0)
        attacked = time.monotonic()
        # The hijack first (voice to the stranger's RTP port), then the BYE, each twice.
        for attempt in range(2):
            sdp = hijack_sdp(STRANGER_IP, rtp.getsockname()[1])
            sip.sendto(in_dialog(ids, "INVITE", 20 + attempt, me, sdp), target)
            sip.sendto(in_dialog(ids, "BYE", 30 + attempt, me), target)
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.5)
        answers = [d.split(b"\r\n", 1)[0] for d in drain(sip)]
        assert answers and all(a.startswith(b"SIP/2.0 403") for a in answers), answers
        assert drain(rtp) == [], "the stranger's re-INVITE moved the voice"
        # The call is up and the real phone still echoes our voice, until it hangs up.
        echoed_after = [t for t in reader.arrivals.values() if t > attacked + 0.5]
        assert len(echoed_after) > 50, len(echoed_after)
        release = (await call.wait_for("release", timeout=15)).action
        assert (release.cause, release.causestring) == (16, "normal release")
        assert time.monotonic() - attacked > 4.0, "the call ended before the phone's BYE"
        assert drain(rtp) == []
        await sipp_ok(sipp)
    log = appliance_log(tmp_path)
    assert re.search(r"SIP datagram\(s\) refused \(source not allowed\) from 127\.0\.0\.2:\d+: "
                     r"INVITE in call", log), log[-3000:]
    # Counted: the summary line (due 10 s after the first) has all four.
    await eventually(lambda: "(4 since start)" in appliance_log(tmp_path), timeout=15)
    assert "Traceback" not in appliance_log(tmp_path)


async def test_resume_by_reinvite_without_sdp_brings_the_voice_back(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    """Finding 15a: hold (sendonly re-INVITE), then resume with a re-INVITE without SDP and
    the answer in the ACK. The phone must hear the customer again after the resume."""
    async with desk_call(tmp_path, aps, make_appliance, "desk_hold_resume_without_sdp.xml") as (
        call, _track, reader, sipp
    ):
        await call.wait_for("Join", timeout=15)
        answered = time.monotonic()
        release = (await call.wait_for("release", timeout=20)).action
        assert (release.cause, release.causestring) == (16, "normal release")
        arrivals = sorted(reader.arrivals.values())
        # Echo before the hold (0..1.5 s), none while held (1.5..3 s), echo after the resume
        # (from ~3 s until the phone's BYE at ~5.5 s): the echo is our voice that reached
        # the phone, so "after" counts only if we send to the phone again.
        before = [t for t in arrivals if t - answered < 1.3]
        held = [t for t in arrivals if 2.0 < t - answered < 2.8]
        after = [t for t in arrivals if t - answered > 3.8]
        assert len(before) > 20, len(before)
        assert len(held) < 5, len(held)
        assert len(after) > 40, (len(after), sipp.diagnostics())
        await sipp_ok(sipp)
    # Our offer in the 200 to the resume said what we want (RFC 6337 §5.3).
    messages = re.split(r"\n-{20,} [^\n]*\n", sipp.messages)
    resume_ok = [m for m in messages if "SIP/2.0 200 OK" in m and "CSeq: 2 INVITE" in m]
    assert len(resume_ok) == 1 and "a=sendrecv" in resume_ok[0], resume_ok


# --------------------------------------------------------------------------- the fuzzer

FUZZ_RATE = 8_000  # datagrams per second offered to the worker's SIP port


def udp_drops(port: int) -> int:
    """The kernel's drop counter of the UDP socket on `port` (datagrams it had no room
    for: the worker was busy), from /proc/net/udp."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[-1])
    return 0


def status(appliance: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{appliance.admin_url}/status", timeout=5) as response:
        return json.loads(response.read())


class Forger:
    """The fuzzer's datagrams: strangers with the call's real identifiers (forged
    requests and responses, clean or mutated), the proxy's address with other dialogs'
    identifiers (clean or mutated), and garbage from both."""

    def __init__(self, ids: DialogIds, strangers: list[socket.socket],
                 proxy_side: socket.socket, seed: int) -> None:
        self.rng = random.Random(seed)
        self._mutate, self._garbage = mutate, garbage
        self.strangers = strangers
        self.proxy_side = proxy_side
        self.real: list[bytes] = []
        for i, method in enumerate(["BYE", "INVITE", "INFO", "UPDATE", "ACK", "CANCEL",
                                    "OPTIONS"]):
            sdp = hijack_sdp(STRANGER_IP, 9) if method in ("INVITE", "UPDATE") else ""
            self.real.append(in_dialog(ids, method, 100 + i, (STRANGER_IP, 5060), sdp))
        self.real.append(self._fake_answer(ids))
        # The proxy's address may end the call (it is the phone's way to us): its requests
        # carry a tag that no single mutation turns into the phone's.
        wrong = re.sub(r"tag=[^;>\s]+", "tag=fuzz-not-the-phone", ids.phone_to)
        other = DialogIds(ids.call_id, ids.our_from, wrong, ids.our_contact, ids.worker_port)
        self.other = [
            in_dialog(other, method, 7, ("127.0.0.1", 5060))
            for method in ("BYE", "INFO", "OPTIONS", "INVITE")
        ] + [
            in_dialog(DialogIds(f"fz-{i}", ids.our_from, ids.phone_to, ids.our_contact,
                                ids.worker_port), "BYE", 1, ("127.0.0.1", 5060))
            for i in range(4)
        ]

    @staticmethod
    def _fake_answer(ids: DialogIds) -> bytes:
        sdp = hijack_sdp(STRANGER_IP, 9).encode()
        head = (
            "SIP/2.0 200 OK\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{ids.worker_port};rport;branch=z9hG4bKguess\r\n"
            f"From: {ids.our_from}\r\nTo: {ids.phone_to}\r\nCall-ID: {ids.call_id}\r\n"
            "CSeq: 1 INVITE\r\nContact: <sip:evil@127.0.0.2>\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n"
        )
        return head.encode() + sdp

    def next(self) -> tuple[socket.socket, bytes]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            data = rng.choice(self.real)
            if rng.random() < 0.7:
                data = self._mutate(data, rng)
            return rng.choice(self.strangers), data
        if roll < 0.8:
            data = rng.choice(self.other)
            if rng.random() < 0.5:
                data = self._mutate(data, rng, 1)
            return self.proxy_side, data
        return rng.choice([*self.strangers, self.proxy_side]), self._garbage(rng)


@pytest.mark.fuzz
async def test_sip_fuzzer_against_a_live_call(
    tmp_path: Path, aps: Any, make_appliance: Any
) -> None:
    total = scaled(8_000, 1_000_000)
    seconds = total / FUZZ_RATE
    sipp = await start_sipp("desk/desk_echo.xml", tmp_path, "-rtp_echo",
                            "-mp", str(free_udp_ports(4)), timeout=f"{seconds + 60:.0f}s")
    appliance = make_appliance(aps.url, sip={"proxy": sipp.address})
    client, call, _track, reader = await place_call(appliance)
    strangers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    proxy_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i, s in enumerate(strangers):
            s.bind((f"127.0.0.{2 + i}", 0))
        proxy_side.bind(("127.0.0.1", 0))
        for s in (*strangers, proxy_side):
            s.setblocking(False)
        await call.wait_for("Join", timeout=15)
        ids = await dialog_ids(sipp)
        target = ("127.0.0.1", ids.worker_port)
        worker = psutil.Process(appliance.worker_pid(ids.worker_port - appliance.sections[
            "sip"]["base_port"]))
        forger = Forger(ids, strangers, proxy_side, seed=4242)
        drops_before = udp_drops(ids.worker_port)
        rss: list[int] = [worker.memory_info().rss]
        sent = not_sent = dropped = 0
        started = time.monotonic()
        batch = 20
        # `total` datagrams the worker read: what the kernel dropped (the worker was busy,
        # the machine has two cores) is sent again.
        while sent - dropped < total:
            for _ in range(batch):
                sock, data = forger.next()
                try:
                    sock.sendto(data, target)
                    sent += 1
                except (BlockingIOError, OSError):
                    not_sent += 1
            ahead = (sent + not_sent) / FUZZ_RATE - (time.monotonic() - started)
            await asyncio.sleep(max(0.0, ahead))
            if (sent + not_sent) % 400 < batch:
                dropped = udp_drops(ids.worker_port) - drops_before
            if (sent + not_sent) % (total // 4 or 1) < batch:
                rss.append(worker.memory_info().rss)
        elapsed = time.monotonic() - started
        rss.append(worker.memory_info().rss)
        dropped = udp_drops(ids.worker_port) - drops_before
        fuzz_end = time.monotonic()
        await asyncio.sleep(2.0)
        # The call is still up, and the phone still echoes our voice.
        with pytest.raises(TimeoutError):
            await call.wait_for("release", timeout=0.1)
        late = [t for t in reader.arrivals.values() if t > fuzz_end + 0.5]
        assert len(late) > 30, f"no voice after the fuzz: {len(late)}"
        await call.hangup()
        await sipp_ok(sipp, timeout=15)
        await eventually(lambda: all(w["channels_busy"] == 0 for w in status(appliance)[
            "workers"]), timeout=10)
    finally:
        await client.close()
        sipp.kill()
        for s in (*strangers, proxy_side):
            s.close()
    mb = [round(r / 2**20, 1) for r in rss]
    handled = sent - dropped
    print(f"SIP fuzz: {sent} datagrams sent in {elapsed:.1f} s, {dropped} dropped by the "
          f"kernel (worker busy), {handled} read by the worker ({handled / elapsed:.0f}/s); "
          f"{not_sent} not sent (socket full); worker RSS MB {mb}")
    log = appliance_log(tmp_path)
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    # Counted and summarized, not logged one line each.
    await eventually(lambda: "since start)" in appliance_log(tmp_path), timeout=15)
    lines = [ln for ln in appliance_log(tmp_path).splitlines()
             if "unparsable" in ln or "(source not allowed)" in ln]
    assert len(lines) < 10 + 4 * elapsed / 10, len(lines)
    sip_lines = [ln for ln in appliance_log(tmp_path).splitlines() if " appliance.sip:" in ln]
    assert len(sip_lines) < 20 + 4 * elapsed / 10, sip_lines[:50]
    # Memory levels off: the second half of the run adds (almost) nothing.
    half = len(rss) // 2
    assert rss[-1] - rss[half] < 8 * 2**20, mb
