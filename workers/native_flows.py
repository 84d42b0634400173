"""One native-loop flow per browser leg, shared by what the loop relays for it.

A flow is a browser's address on the worker's native UDP socket and its inbound SRTP keys
(appliance.native's PortLoop). The customer's leg carries both its camera (video relay,
workers/native_video.py) and its microphone (voice, workers/native_voice.py): each adds a
route for its payload type to the same flow, and the flow goes when the last of them lets
go. Two flows may not share an address, and a second session with the same keys would
keep a replay window of its own: hence one, counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance import native
from appliance.edges.rtc_adapter import SrtpKeys


@dataclass
class _Flow:
    loop: Any
    flow: int
    users: int


_flows: dict[int, _Flow] = {}  # id(leg) -> its flow, while anything routes on it


def acquire(leg: object, loop: Any, host: str, port: int, keys: SrtpKeys) -> int:
    """The leg's flow on `loop` (made on first use). ValueError if another flow has that
    address, or the leg's flow is on another loop."""
    held = _flows.get(id(leg))
    if held is not None:
        if held.loop is not loop:
            raise ValueError("the leg's flow is on another socket")
        held.users += 1
        return held.flow
    m = native.module()
    flow = loop.add_flow(host, port, m.Srtp(keys.profile, keys.rx, False))
    _flows[id(leg)] = _Flow(loop, flow, 1)
    return int(flow)


def release(leg: object) -> None:
    """One user of the leg's flow is done (its routes removed); the last removes the flow."""
    held = _flows.get(id(leg))
    if held is None:
        return
    held.users -= 1
    if held.users <= 0:
        del _flows[id(leg)]
        held.loop.remove_flow(held.flow)


def held_by(leg: object) -> int:
    """How many users the leg's flow has (0: none): for tests and the log."""
    held = _flows.get(id(leg))
    return held.users if held is not None else 0
