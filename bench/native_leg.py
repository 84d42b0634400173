"""A simulated caller's media on the native loop (appliance.native): the generator costs
less than the appliance it loads, so one generator core can load a worker core to its limit
and capacity is observed, not extrapolated (issue 13).

Once DTLS is up, the leg's aioice socket is drained by a `PortLoop` of its own: what the
appliance sends on the streams the bench measures is unprotected and metered in C (a sink
route per payload type, the same `Meter` the worker reads), and everything else (STUN,
DTLS, RTCP, other payload types) comes up to aioice as if it had read it. What the leg
sends is a `Playout` per stream: the cached payloads, paced by the process's `Pacer` in one
C call per tick. The Python streams (`bench.pacer.TxAudio`/`TxVideo`, `bench.rtp_stats`)
stay the reference these are tested against, and the path a box without the extension or
an ICE-TCP leg takes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

from aiortc import RTCPeerConnection

from appliance import native
from appliance.edges.rtc_adapter import SrtpFastPath, srtp_keys
from bench.media_cache import VideoFrame


class MeterStream:
    """A received stream metered by the native loop, read as `bench.rtp_stats.RxStream`."""

    def __init__(self, clock_rate: int, is_vp8: bool) -> None:
        self.clock_rate = clock_rate
        self.meter = native.module().Meter(clock_rate, is_vp8=is_vp8)

    def snapshot(self) -> list[float]:
        """[received, expected, jitter_ms, frames, bytes], as RxStream.snapshot."""
        f = self.meter.figures()
        jitter_ms = f["jitter"] * 1000 / self.clock_rate
        # window_frames is cumulative here: nobody takes the meter's window.
        return [f["received"], f["expected"], round(jitter_ms, 3), f["window_frames"],
                f["octets"]]


def audio_playout(tx: Any, sock: Any, dest: tuple[str, int], ssrc: int,
                  payload_type: int, payloads: Sequence[bytes], ts_step: int, start: float,
                  rng: random.Random) -> Any:
    """TxAudio's stream in C (the same draws from `rng`, so the same bytes)."""
    seq, ts = rng.getrandbits(16), rng.getrandbits(32)
    return native.module().Playout(
        tx, sock.fileno(), dest[0], dest[1], ssrc, payload_type,
        tuple((p,) for p in payloads), (), 0.020, ts_step, start, seq, ts)


def video_playout(tx: Any, sock: Any, dest: tuple[str, int], ssrc: int,
                  payload_type: int, frames: Sequence[VideoFrame], fps: int, start: float,
                  rng: random.Random) -> Any:
    """TxVideo's stream in C (the same draws from `rng`, so the same bytes)."""
    seq, ts = rng.getrandbits(16), rng.getrandbits(32)
    keyframes = [i for i, f in enumerate(frames) if f.keyframe]
    index = rng.choice(keyframes)
    return native.module().Playout(
        tx, sock.fileno(), dest[0], dest[1], ssrc, payload_type,
        tuple(f.payloads for f in frames), keyframes, 1 / fps, 90000 // fps, start, seq, ts,
        index, True)


class NativeLegMedia:
    """One connected leg's socket on a PortLoop: its receive meters and its send session."""

    def __init__(self, pc: RTCPeerConnection, fast: SrtpFastPath,
                 meters: dict[int, MeterStream]) -> None:
        selected = fast.nominated_udp()
        if selected is None:
            raise ValueError("the leg's selected pair is not a UDP socket of aioice's own")
        self._protocol, self.sock, self.remote = selected
        m = native.module()
        keys = srtp_keys(pc)
        self.tx = m.Srtp(keys.profile, keys.tx, True)
        self.loop = m.PortLoop(self.sock.fileno())
        self._flow = self.loop.add_flow(self.remote[0], self.remote[1],
                                        m.Srtp(keys.profile, keys.rx, False))
        for pt, stream in meters.items():
            self.loop.add_sink(self._flow, pt, stream.meter)
        self._events = asyncio.get_running_loop()
        self._fd = self.sock.fileno()
        # The transport's own reader goes (asyncio's public add_reader refuses a socket a
        # transport owns); ours hands aioice what the loop does not keep.
        self._events._remove_reader(self._fd)  # type: ignore[attr-defined]
        self._events._add_reader(self._fd, self._readable)  # type: ignore[attr-defined]
        self._attached = True

    def _readable(self) -> None:
        for data, addr in self.loop.drain(time.monotonic(), time.time()):
            self._protocol.datagram_received(data, addr)

    @property
    def unprotect_errors(self) -> int:
        return int(self.loop.stats()["unprotect_failed"])

    def detach(self) -> None:
        """aioice reads its socket again (before the connection closes it)."""
        if not self._attached:
            return
        self._attached = False
        transport = self._protocol.transport
        self._events._remove_reader(self._fd)  # type: ignore[attr-defined]
        if transport is not None and not transport.is_closing():
            self._events._add_reader(self._fd, transport._read_ready)  # type: ignore[attr-defined]
