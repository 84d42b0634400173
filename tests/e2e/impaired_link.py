"""A lossy, jittery network in front of a test caller (the SDK's aiortc peer connection).

This loopback has no `tc netem`, so the impairment sits in the outside peer's own socket
path: RTP it sends or receives is dropped or delayed at random, exactly what a bad mobile
network does to it. The appliance under test is untouched and sees only the effects.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection

from appliance.edges.rtc_adapter import _ice_connections


def _is_rtp(data: bytes) -> bool:
    return len(data) > 12 and 127 < data[0] < 192 and not 192 <= data[1] <= 223


@dataclass
class Impairment:
    send_loss: float = 0.0  # share of outgoing RTP dropped
    send_jitter_s: float = 0.0  # outgoing RTP delayed by uniform(0, this)
    receive_loss: float = 0.0  # share of incoming RTP dropped

    def clear(self) -> None:
        self.send_loss = self.send_jitter_s = self.receive_loss = 0.0


def impair(pc: RTCPeerConnection, seed: int = 7) -> Impairment:
    """Put an adjustable impairment on a connected peer connection's network path."""
    rng = random.Random(seed)
    settings = Impairment()
    loop = asyncio.get_running_loop()
    for conn in _ice_connections(pc):
        pair = conn._nominated.get(1)
        if pair is None:
            raise RuntimeError("impair() needs a connected peer connection")
        protocol = pair.protocol
        original_send = protocol.send_data

        async def send_data(data: bytes, addr: Any, _send: Any = original_send) -> None:
            if _is_rtp(data):
                if rng.random() < settings.send_loss:
                    return
                if settings.send_jitter_s:
                    delay = rng.uniform(0, settings.send_jitter_s)
                    loop.call_later(delay, lambda: asyncio.ensure_future(_send(data, addr)))
                    return
            await _send(data, addr)

        protocol.send_data = send_data  # type: ignore[method-assign]
        original_received = conn.data_received

        def data_received(data: bytes, component: int, _received: Any = original_received,
                          ) -> None:
            if _is_rtp(data) and rng.random() < settings.receive_loss:
                return
            _received(data, component)

        conn.data_received = data_received  # type: ignore[method-assign]
    return settings
