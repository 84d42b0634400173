"""aiortc/aioice private hooks: this test fails the day one of them moves."""

import asyncio

import pytest
from aiortc import RTCPeerConnection

from appliance.edges.rtc_adapter import (
    CandidatePolicy,
    HostAddress,
    apply_candidate_policy,
    check_hooks,
    make_configuration,
)


async def test_private_hooks_are_where_we_expect_them() -> None:
    check_hooks()


def test_host_address_forms() -> None:
    assert HostAddress.parse("127.0.0.1") == HostAddress("127.0.0.1", "127.0.0.1")
    assert HostAddress.parse("10.0.0.5=203.0.113.7") == HostAddress("10.0.0.5", "203.0.113.7")
    with pytest.raises(ValueError):
        HostAddress.parse("not-an-address")


def test_configuration_never_falls_back_to_a_public_stun_server() -> None:
    assert make_configuration([]).iceServers == []


async def test_gathers_exactly_the_policy_addresses_in_the_port_range() -> None:
    pc = RTCPeerConnection(make_configuration([]))
    pc.addTransceiver("audio")
    apply_candidate_policy(pc, CandidatePolicy.from_strings(["127.0.0.1"], 47000, 47010))
    await pc.setLocalDescription(await pc.createOffer())
    lines = [ln for ln in pc.localDescription.sdp.splitlines() if ln.startswith("a=candidate")]
    await pc.close()
    assert len(lines) == 1
    fields = lines[0].split()
    assert fields[4] == "127.0.0.1" and 47000 <= int(fields[5]) <= 47010
    await asyncio.sleep(0)


async def test_announced_address_differs_from_bound_one_behind_nat() -> None:
    pc = RTCPeerConnection(make_configuration([]))
    pc.addTransceiver("audio")
    apply_candidate_policy(pc, CandidatePolicy.from_strings(["127.0.0.1=192.0.2.10"]))
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    assert " 192.0.2.10 " in sdp and " 127.0.0.1 " not in sdp.split("a=candidate", 1)[1]
