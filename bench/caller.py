"""Cheap load-test callers: full calls (customer + agent legs) that cost little to run.

Each simulated call is what the appliance sells: a User leg sending PCMU (or, to measure
transcoding, Opus) voice (50 pps)
and VP8 640x480 video (30 fps, ~800 kbit/s) to the desk phone and the agent, and an Agent
leg (join_room with the call's roomkey) sending video back. Signalling goes through the
SDK (`MediaServerClient`), and ICE/DTLS/SRTP are real aiortc (with `--transport TCP`,
ICE is the SDK's own RFC 6544 active side, appliance/edges/ice_tcp_active.py: aioice has
no ICE-TCP, and both legs then carry everything over the worker's TCP port, RFC 4571
framed). Once DTLS is up, though,
every packet takes `SrtpFastPath` both ways: pre-encoded payloads from `media_cache` go out
through one shared `Pacer`, and what comes back is counted (`RxStream`), never decoded.

Run as a process by the runner (`python -m bench.caller ...`) and driven over stdin/stdout
with one JSON object per line (`bench.control`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import native
from appliance.edges.rtc_adapter import SilentTrack, SrtpFastPath, sender_ssrc
from appliance.media import rtcp
from appliance_sdk import Call, MediaServerClient
from bench import control
from bench.media_cache import (
    OPUS_RATE,
    Vp8Clip,
    load_or_make_clip,
    load_or_make_opus,
    load_or_make_pcmu,
)
from bench.native_leg import MeterStream, NativeLegMedia, audio_playout, video_playout
from bench.pacer import Pacer, TxAudio, TxStream, TxVideo
from bench.rtp_stats import RxStream

log = logging.getLogger("bench.caller")

CALLER = 5678  # the desk phone scenario (desk_echo.xml) checks these numbers
CALLEE = 9333
AUDIO_CLOCK = 8000
VIDEO_CLOCK = 90000
# Receive streams each call reports, by (leg, kind): what the bench's figures are about.
STREAMS = ("user_audio", "user_video", "agent_video")


def payload_types(sdp: str) -> dict[str, dict[str, int]]:
    """{kind: {CODEC NAME: payload type}} from an SDP (first rtpmap of each name wins)."""
    out: dict[str, dict[str, int]] = {}
    kind = ""
    for line in sdp.splitlines():
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            out.setdefault(kind, {})
        elif line.startswith("a=rtpmap:") and kind:
            pt, _, rest = line[len("a=rtpmap:") :].partition(" ")
            name = rest.split("/", 1)[0].upper()
            out[kind].setdefault(name, int(pt))
    return out


@dataclass
class Media:
    audio_codec: str  # "PCMU" (relayed untouched to the phone) or "OPUS" (transcoded)
    audio: Sequence[bytes]
    clip: Vp8Clip

    @property
    def audio_clock(self) -> int:
        return OPUS_RATE if self.audio_codec == "OPUS" else AUDIO_CLOCK


class Leg:
    """One browser leg of a simulated call: its SDK Call and its fast-path media."""

    def __init__(self, call: Call, tracks: list[SilentTrack], send_kinds: tuple[str, ...],
                 media: Media, pacer: Pacer, rng: random.Random,
                 native_media: bool = False) -> None:
        self.call = call
        # The native loop's socket drain and playouts (bench.native_leg) where the selected
        # pair is a UDP socket; the Python streams otherwise (ICE-TCP, no extension).
        self.use_native = native_media
        self.native: NativeLegMedia | None = None
        self.tracks = tracks
        self.send_kinds = send_kinds
        self.media = media
        self.pacer = pacer
        self.rng = rng
        self.fast: SrtpFastPath | None = None
        self.rx: dict[int, RxStream] = {}  # by payload type
        self.rx_by_kind: dict[str, RxStream | MeterStream] = {}
        self.tx: list[Any] = []  # TxStream, or the native loop's Playout
        self.video_tx: Any = None  # TxVideo or Playout: what a PLI jumps
        self.connected = asyncio.Event()
        self.keyframe_requests = 0
        self.nacks = 0
        self.other_packets = 0
        call.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        state = self.call.pc.connectionState
        if state == "connected" and self.fast is None:
            self._attach()
        elif state in ("closed", "failed"):
            self.stop_sending()

    def _attach(self) -> None:
        """Take the media off aiortc the moment DTLS is up (before the appliance sends
        anything we would otherwise let aiortc decode)."""
        pc = self.call.pc
        pts = payload_types(pc.remoteDescription.sdp)
        audio_pt = pts.get("audio", {}).get(self.media.audio_codec)
        video_pt = pts.get("video", {}).get("VP8")
        self.fast = SrtpFastPath(pc, self._on_rtp, self._on_rtcp)
        native_leg = self._attach_native(audio_pt, video_pt) if self.use_native else None
        make_audio: Callable[..., Any]
        make_video: Callable[..., Any]
        if native_leg is not None:  # the same streams, sent by the native loop
            where = (native_leg.tx, native_leg.sock, native_leg.remote)
            make_audio = functools.partial(audio_playout, *where)
            make_video = functools.partial(video_playout, *where)
        else:
            if audio_pt is not None:
                self.rx[audio_pt] = self.rx_by_kind["audio"] = RxStream(self.media.audio_clock)
            if video_pt is not None:
                self.rx[video_pt] = self.rx_by_kind["video"] = RxStream(VIDEO_CLOCK)
            make_audio = functools.partial(TxAudio, self.fast.send_rtp)
            make_video = functools.partial(TxVideo, self.fast.send_rtp)
        now = asyncio.get_running_loop().time()
        # A random phase per stream spreads the calls' packets over the pacer's ticks.
        if "audio" in self.send_kinds and audio_pt is not None:
            clock = self.media.audio_clock
            start = now + self.rng.random() * 0.02
            self.tx.append(make_audio(sender_ssrc(pc, "audio"), audio_pt, self.media.audio,
                                      clock // 50, start, self.rng))
        if "video" in self.send_kinds and video_pt is not None:
            clip = self.media.clip
            start = now + self.rng.random() / clip.params.fps
            self.video_tx = make_video(sender_ssrc(pc, "video"), video_pt, clip.frames,
                                       clip.params.fps, start, self.rng)
            self.tx.append(self.video_tx)
        for stream in self.tx:
            self.pacer.add(stream)
        self.connected.set()

    def _attach_native(self, audio_pt: int | None,
                       video_pt: int | None) -> NativeLegMedia | None:
        """The leg's socket on the native loop, metering what comes back; None when the
        leg's pair is not one of aioice's UDP sockets (ICE-TCP: the Python streams)."""
        assert self.fast is not None
        meters: dict[str, tuple[int, MeterStream]] = {}
        if audio_pt is not None:
            meters["audio"] = (audio_pt, MeterStream(self.media.audio_clock, is_vp8=False))
        if video_pt is not None:
            meters["video"] = (video_pt, MeterStream(VIDEO_CLOCK, is_vp8=True))
        try:
            leg = NativeLegMedia(self.call.pc, self.fast, dict(meters.values()))
        except ValueError as exc:
            log.info("leg %s: media in Python: %s", self.call.channel, exc)
            return None
        self.native = leg
        for kind, (_, stream) in meters.items():
            self.rx_by_kind[kind] = stream
        return leg

    def _on_rtp(self, packet: bytes) -> None:
        stream = self.rx.get(packet[1] & 0x7F)
        if stream is None:
            self.other_packets += 1  # RTX, comfort noise...: not what the figures are about
            return
        stream.packet(packet, time.monotonic())

    def _on_rtcp(self, packet: bytes) -> None:
        video = self.video_tx
        for item in rtcp.parse(packet):
            if isinstance(item, rtcp.Pli | rtcp.Fir):
                self.keyframe_requests += 1
                if video is not None and (isinstance(item, rtcp.Fir)
                                          or item.media_ssrc == video.ssrc):
                    video.keyframe_request(time.monotonic())
            elif isinstance(item, rtcp.Nack):
                self.nacks += 1  # not answered: a generator that retransmits hides loss

    def stop_sending(self) -> None:
        for stream in self.tx:
            self.pacer.remove(stream)
            if not isinstance(stream, TxStream):
                stream.stop()  # a Playout: its socket may close next

    async def close(self) -> None:
        self.stop_sending()
        if self.native is not None:
            self.native.detach()
        if self.fast is not None:
            self.fast.detach()
        with contextlib.suppress(Exception):
            await self.call.close()
        for track in self.tracks:
            track.stop()

    def diagnosis(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": "native" if self.native is not None else "python",
                               "sent": [t.sent for t in self.tx],
                               "fast_received": self.fast.received if self.fast else 0,
                               "keyframe_requests": self.keyframe_requests,
                               "other_packets": self.other_packets}
        if self.native is not None:
            stats = self.native.loop.stats()
            out["socket"] = {k: stats[k] for k in ("datagrams", "routed_in", "handed_up",
                                                    "unprotect_failed")}
        return out

    @property
    def unprotect_errors(self) -> int:
        errors = self.fast.unprotect_errors if self.fast is not None else 0
        return errors + (self.native.unprotect_errors if self.native is not None else 0)


@dataclass
class SimCall:
    index: int
    state: str = "setup"  # setup -> up -> ended; or failed
    failure: str | None = None
    user: Leg | None = None
    agent: Leg | None = None
    # On Janus (bench.janus_calls) the voice is a leg of its own: the SIP plugin's call.
    voice: Leg | None = None
    setup_ms: dict[str, float] = field(default_factory=dict)

    def legs(self) -> list[Leg]:
        return [leg for leg in (self.user, self.agent, self.voice) if leg is not None]

    def check(self) -> None:
        """A call the appliance released while it was up has failed."""
        if self.state != "up":
            return
        for name, leg in (("user", self.user), ("agent", self.agent), ("voice", self.voice)):
            if leg is not None and leg.call.ended:
                release = leg.call.release
                cause = f"{release.cause} {release.causestring}" if release else "?"
                self.fail(f"{name} leg released: {cause}")
                return

    def fail(self, reason: str) -> None:
        if self.state in ("setup", "up"):
            self.state = "failed"
            self.failure = reason
            for leg in self.legs():
                leg.stop_sending()

    def streams(self) -> dict[str, RxStream | None]:
        audio_leg = self.voice or self.user
        return {
            "user_audio": audio_leg.rx_by_kind.get("audio") if audio_leg else None,
            "user_video": self.user.rx_by_kind.get("video") if self.user else None,
            "agent_video": self.agent.rx_by_kind.get("video") if self.agent else None,
        }

    def snapshot(self) -> dict[str, Any]:
        self.check()
        legs = self.legs()
        return {
            "i": self.index,
            # The appliance's channels of the two legs: what its log names the call by.
            "channels": [leg.call.channel for leg in legs],
            "state": self.state,
            "failure": self.failure,
            "rx": {k: (s.snapshot() if s is not None else None)
                   for k, s in self.streams().items()},
            "tx": sum(t.sent for leg in legs for t in leg.tx),
            "tx_skipped": sum(t.skipped for leg in legs for t in leg.tx),
            "keyframe_requests": sum(leg.keyframe_requests for leg in legs),
            "keyframe_jumps": sum(leg.video_tx.keyframe_jumps for leg in legs
                                  if leg.video_tx is not None),
            "nacks": sum(leg.nacks for leg in legs),
            "other_packets": sum(leg.other_packets for leg in legs),
            "unprotect_errors": sum(leg.unprotect_errors for leg in legs),
            # What each leg's socket saw, for a call whose stream received nothing.
            "legs": [leg.diagnosis() for leg in legs],
        }


async def _wait(call: Call, name: str, accept: Callable[[Any], bool] | None = None,
                timeout: float = 30) -> float:
    """monotonic time of the first `name` event that `accept` takes."""
    deadline = time.monotonic() + timeout
    while True:
        event = await call.wait_for(name, timeout=max(0.01, deadline - time.monotonic()))
        if accept is None or accept(event.action):
            return event.at


class CallerHost:
    """Every simulated call of one generator process."""

    def __init__(self, args: argparse.Namespace, media: Media) -> None:
        self.args = args
        self.media = media
        self.loop = asyncio.get_running_loop()
        self.pacer = Pacer(self.loop)
        self.generator = "native" if args.generator == "native" and native.AVAILABLE \
            else "python"
        self.calls: dict[int, SimCall] = {}
        self.rng = random.Random(args.seed)
        self._users: MediaServerClient | None = None
        self._agents: MediaServerClient | None = None
        self._setup_slots = asyncio.Semaphore(args.setup_concurrency)
        self._db: sqlite3.Connection | None = None
        self._janus: Any = None  # bench.janus.JanusSession in the Janus phase
        # The offer's `protocol`: None leaves it out (UDP, the default).
        self._transport: str | None = "TCP" if args.transport == "TCP" else None

    async def start(self) -> None:
        if self.args.janus_url:  # the Janus phase: no appliance, no AP-S
            from bench import janus

            self._janus = await janus.JanusSession.create(self.args.janus_url)
            self.pacer.start()
            return
        addresses = (self.args.address,)
        # Two WebSockets, as the customer's phone and the agent's PC are two browsers.
        self._users = await MediaServerClient.connect(self.args.url, host_addresses=addresses)
        self._agents = await MediaServerClient.connect(self.args.url, host_addresses=addresses)
        self._db = sqlite3.connect(f"file:{self.args.aps_db}?mode=ro", uri=True)
        self.pacer.start()

    async def add(self, indexes: list[int]) -> list[dict[str, Any]]:
        calls = [SimCall(i) for i in indexes]
        for call in calls:
            self.calls[call.index] = call
        await asyncio.gather(*(self._setup(call) for call in calls))
        return [{"i": c.index, "state": c.state, "failure": c.failure, "setup_ms": c.setup_ms}
                for c in calls]

    async def _setup(self, sim: SimCall) -> None:
        async with self._setup_slots:
            try:
                async with asyncio.timeout(self.args.setup_timeout):
                    await self._place(sim)
                sim.state = "up"
            except Exception as exc:  # one call's failure is a figure, not a crash
                sim.fail(_describe(exc))
                log.warning("call %d failed during setup: %s", sim.index, sim.failure)

    async def _place_on_janus(self, sim: SimCall) -> None:
        """bench.janus_calls' full call: the customer's and the agent's camera each on an
        echotest handle, the voice on a SIP-plugin call to the desk phone."""
        from bench.janus_calls import JanusLegCall

        native_media = self.generator == "native"
        offered = time.monotonic()
        legs = []
        for kinds in (("video",), ("video",), ("audio",)):
            call = JanusLegCall(self._janus, self.args.address, kinds)
            legs.append((call, Leg(call, call.tracks, kinds, self.media, self.pacer,  # type: ignore[arg-type]
                                   self.rng, native_media)))
        sim.user, sim.agent, sim.voice = (leg for _, leg in legs)
        await legs[0][0].echotest()
        await legs[1][0].echotest()
        await legs[2][0].sip(f"sip:{CALLEE}@{self.args.desk}",
                             f"sip:{CALLER}@{self.args.address}")
        sim.setup_ms["sip_answer"] = (time.monotonic() - offered) * 1000
        for _, leg in legs:
            await asyncio.wait_for(leg.connected.wait(), 10)
        sim.setup_ms["total"] = (time.monotonic() - offered) * 1000

    async def _place(self, sim: SimCall) -> None:
        if self.args.janus_url:
            await self._place_on_janus(sim)
            return
        assert self._users is not None and self._agents is not None
        userdata = json.dumps({"id": f"{self.args.identity_prefix}{sim.index:06d}"})
        tracks = [SilentTrack("audio"), SilentTrack("video")]
        user_call = await self._users.make_video_call(
            CALLER, CALLEE, userdata, medium=2, audio=self.media.audio_codec,
            record=1 if self.args.record else 0,
            audio_track=tracks[0], video_track=tracks[1], transport=self._transport)
        offered = time.monotonic()  # make_video_call returns once the offer is sent
        sim.user = Leg(user_call, tracks, ("audio", "video"), self.media, self.pacer, self.rng,
                       self.generator == "native")
        dtls = await _wait(user_call, "dtls_connect")
        sim.setup_ms["user_dtls"] = (dtls - offered) * 1000
        # Join with medium audio: the desk phone answered (SIP 200), the customer is in.
        joined = await _wait(user_call, "Join", lambda a: a.medium == "audio")
        sim.setup_ms["sip_answer"] = (joined - offered) * 1000
        await asyncio.wait_for(sim.user.connected.wait(), 10)
        roomkey = await self._roomkey(user_call)
        agent_tracks = [SilentTrack("audio"), SilentTrack("video")]
        agent_call = await self._agents.join_room(
            roomkey, medium=2, audio_track=agent_tracks[0], video_track=agent_tracks[1],
            transport=self._transport)
        agent_offered = time.monotonic()
        sim.agent = Leg(agent_call, agent_tracks, ("video",), self.media, self.pacer, self.rng,
                        self.generator == "native")
        agent_dtls = await _wait(agent_call, "dtls_connect")
        sim.setup_ms["agent_dtls"] = (agent_dtls - agent_offered) * 1000
        sim.setup_ms["total"] = (agent_dtls - offered) * 1000
        await asyncio.wait_for(sim.agent.connected.wait(), 10)

    async def _roomkey(self, call: Call) -> int:
        """The roomkey AP-S gave this call, as the agent's application would look it up."""
        assert self._db is not None
        for _ in range(100):
            try:
                row = self._db.execute(
                    "SELECT roomkey FROM calls WHERE dialogid=? AND ref=?",
                    (call.dialogid, call.ref)).fetchone()
            except sqlite3.OperationalError:  # the AP-S is writing: try again
                row = None
            if row is not None:
                return int(row[0])
            await asyncio.sleep(0.05)
        raise LookupError(f"no roomkey in the AP-S database for {call!r}")

    def snapshot(self, reset_lags: bool = True) -> dict[str, Any]:
        """Per-call counters (cumulative) and the pacer's tick lag since the last reset."""
        lags = self.pacer.lags_ms
        if reset_lags:
            self.pacer.lags_ms = []
        ordered = sorted(lags)

        def pct(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered \
                else 0.0

        return {
            "now": time.monotonic(),
            "calls": [c.snapshot() for c in self.calls.values()],
            "tick_lag_ms": {"p50": pct(0.5), "p99": pct(0.99),
                            "max": round(ordered[-1], 3) if ordered else 0.0,
                            "mean": round(statistics.fmean(ordered), 3) if ordered else 0.0,
                            "ticks": len(ordered)},
            "streams_sending": self.pacer.sending,
            # How the legs that are up send and count: "native" and/or "python".
            "generator": sorted({"native" if leg.native is not None else "python"
                                 for c in self.calls.values() for leg in c.legs()
                                 if leg.fast is not None}),
        }

    async def stop(self) -> None:
        self.pacer.stop()
        for sim in self.calls.values():
            if sim.state == "up":
                sim.state = "ended"
        legs = [leg for sim in self.calls.values() for leg in sim.legs()]
        for leg in legs:
            leg.stop_sending()
        # Hang up the customers; the appliance then releases their agents' legs too.
        await asyncio.gather(*(leg.close() for leg in legs), return_exceptions=True)
        if self._janus is not None:
            with contextlib.suppress(Exception):
                await self._janus.close()
        for client in (self._users, self._agents):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        if self._db is not None:
            self._db.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"setup timeout: {exc}" if str(exc) else "setup timeout"
    return f"{type(exc).__name__}: {exc}"


async def serve(args: argparse.Namespace) -> None:
    cache = Path(args.cache_dir)
    audio = load_or_make_opus(cache) if args.audio == "OPUS" else load_or_make_pcmu(cache)
    media = Media(args.audio, audio, load_or_make_clip(cache))
    host = CallerHost(args, media)
    await host.start()

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "add":
            return {"results": await host.add(list(request["indexes"]))}
        if op == "snapshot":
            return host.snapshot(bool(request.get("reset_lags", True)))
        if op == "stop":
            await host.stop()
            return {"stopped": True}
        raise ValueError(f"unknown op {op!r}")

    await control.serve_stdio(handle, ready={"pid": _pid()})


def _pid() -> int:
    import os

    return os.getpid()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bench load-test caller process")
    parser.add_argument("--url", required=True)
    parser.add_argument("--aps-db", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--address", default="127.0.0.1",
                        help="the address ICE announces for this generator's legs")
    parser.add_argument("--identity-prefix", default="BENCH")
    parser.add_argument("--audio", choices=("PCMU", "OPUS"), default="PCMU",
                        help="the customer's voice codec (OPUS makes the appliance transcode)")
    parser.add_argument("--record", action="store_true", help="offer record: 1 on every call")
    parser.add_argument("--transport", choices=("UDP", "TCP"), default="UDP",
                        help="TCP: every leg offers protocol TCP and connects by ICE-TCP")
    parser.add_argument("--setup-concurrency", type=int, default=8)
    parser.add_argument("--setup-timeout", type=float, default=45.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--janus-url", default="",
                        help="place the calls on Janus at this HTTP API URL instead "
                             "(bench.janus_calls)")
    parser.add_argument("--desk", default="", help="the desk phone's host:port (Janus phase)")
    parser.add_argument("--generator", choices=("native", "python"), default="native",
                        help="native: the legs' media on the native loop where it is built "
                             "(bench.native_leg); python: the Python streams")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s caller %(name)s: %(message)s")
    if args.generator == "native" and native.AVAILABLE:
        # The native loop drains aioice's sockets itself: that takes the selector loop's
        # readers (uvloop's UDP transports read in libuv, out of reach). The media is in C,
        # so uvloop would only speed up signalling here.
        asyncio.run(serve(args))
    else:
        import uvloop

        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
