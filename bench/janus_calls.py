"""The bench's full call, placed on Janus instead of our appliance (the C reference, issue
13): two VP8 echotest streams (the customer's camera and the agent's, each echoed back)
and one SIP-plugin PCMU call to the same sipp desk phone, which echoes the voice. The same
work as ours per call: two video streams in and out, voice both ways between a browser and
a desk phone, every packet SRTP on the browser side. The legs send and count with the
same `bench.caller.Leg` as ours (the native loop's Playout and Meter where built), so the
two phases differ only in the relay under test.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiortc import RTCPeerConnection

from appliance.edges.rtc_adapter import SilentTrack, make_configuration
from bench import janus


class JanusLegCall:
    """What `bench.caller.Leg` reads of an SDK `Call`, for one Janus handle: made before
    the signalling, so the Leg sees the connection come up."""

    def __init__(self, session: Any, address: str, kinds: tuple[str, ...]) -> None:
        self.session = session
        self.address = address  # the one host address ICE announces
        self.pc, self.tracks = new_pc(kinds)
        self.channel = 0  # the Janus handle, once attached
        self.ended = False
        self.release = None

    async def echotest(self) -> None:
        self.channel = await janus.echotest_call(self.session, self.pc,
                                                 host_addresses=(self.address,))

    async def sip(self, uri: str, username: str) -> None:
        self.channel = await janus.sip_call(self.session, self.pc, uri, username,
                                            host_addresses=(self.address,))

    async def close(self) -> None:
        self.ended = True
        if self.channel:
            with contextlib.suppress(Exception):
                await janus.hangup(self.session, self.channel)
        await self.pc.close()
        for track in self.tracks:
            track.stop()


def new_pc(kinds: tuple[str, ...]) -> tuple[RTCPeerConnection, list[SilentTrack]]:
    """A peer connection with a sendrecv transceiver per kind and no ICE servers (nothing
    leaves the machine); bench.janus applies the candidate policy and the codec."""
    pc = RTCPeerConnection(make_configuration([]))
    tracks = [SilentTrack(kind) for kind in kinds]
    for track in tracks:
        pc.addTransceiver(track, direction="sendrecv")
    return pc, tracks
