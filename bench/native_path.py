"""Worker CPU per relayed video packet: the native port loop (appliance.native.PortLoop)
beside the same work in Python, in one run on real loopback sockets.

    tests/in-loopback-netns.sh .venv/bin/python -m bench.native_path [--packets 20000]

The Python side is the relay's own per-packet code (pylibsrtp unprotect, StreamMeter,
rtp.parse_header/payload_of, RtpRewriter with abs-send-time, pylibsrtp protect, sendto)
without the event loop and the ICE-lite demux in front of it: a lower bound on what the
worker pays per packet today. Only the relaying side's CPU is timed (process time around
its receive-relay-send work); the sender and the receiver are outside the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import time
from collections.abc import Callable

import pylibsrtp

from appliance import native
from appliance.media import rtp
from appliance.media.quality import StreamMeter
from bench import system

# aiortc's preference order puts AES-256-GCM first: what browsers and the SDK negotiate.
PROFILES = {  # name: (pylibsrtp's and libsrtp's profile id, key + salt bytes)
    "aead_aes_256_gcm": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
    "aead_aes_128_gcm": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    "aes128_cm_sha1_80": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
}
CHUNK = 64  # datagrams in flight at once: what one socket wake-up finds under load
PAYLOAD = 1100  # bytes of VP8 in a full-size video packet


def srtp_session(profile: int, key: bytes, outbound: bool) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(key=key, srtp_profile=profile, ssrc_type=(
        pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND))
    policy.allow_repeat_tx = True
    return pylibsrtp.Session(policy)


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.setblocking(False)
    return s


def _packets(count: int, tx: pylibsrtp.Session) -> list[bytes]:
    key = b"\x10\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", 640, 480)
    out = []
    for seq in range(count):
        payload = key + os.urandom(PAYLOAD - len(key)) if seq % 90 == 0 else (
            b"\x10\x01" + os.urandom(PAYLOAD - 2))
        out.append(tx.protect(rtp.build(96, seq % 3 == 2, seq & 0xFFFF, seq * 1000, 0xA11CE,
                                        payload)))
    return out


def _drain_receiver(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(4096)
            n += 1
        except BlockingIOError:
            return n


def _run(relay: Callable[[], None], packets: list[bytes], port: socket.socket,
         a: socket.socket, b: socket.socket) -> tuple[float, int]:
    """CPU seconds spent in `relay` over all packets, and what B received."""
    cpu = 0.0
    received = 0
    dest = port.getsockname()
    for start in range(0, len(packets), CHUNK):
        for data in packets[start:start + CHUNK]:
            a.sendto(data, dest)
        t = time.process_time()
        relay()
        cpu += time.process_time() - t
        received += _drain_receiver(b)
    return cpu, received


def measure(count: int, profile_name: str = "aead_aes_256_gcm") -> dict[str, object]:
    m = native.module()
    profile, key_size = PROFILES[profile_name]
    key_a, key_b = os.urandom(key_size), os.urandom(key_size)
    a, b = _udp(), _udp()
    b_addr = b.getsockname()
    results: dict[str, object] = {}

    # -- native ------------------------------------------------------------------------
    port = _udp()
    loop = m.PortLoop(port.fileno())
    flow = loop.add_flow("127.0.0.1", a.getsockname()[1],
                         m.Srtp(profile, key_a, False))
    loop.add_route(flow, 96, m.Meter(90000, True), m.Rewriter(0xB0B, 90000, False, 1, 2), 100,
                   m.Srtp(profile, key_b, True), *b_addr,
                   abs_send_time_id=3)
    packets = _packets(count, srtp_session(profile, key_a, True))
    cpu, got = _run(lambda: loop.drain(time.monotonic(), time.time()), packets, port, a, b)
    results["native"] = {"us_per_packet": round(1e6 * cpu / count, 2), "received": got,
                         "stats": loop.stats()}
    port.close()

    # -- the same work in Python ---------------------------------------------------------
    port = _udp()
    rx, tx = srtp_session(profile, key_a, False), srtp_session(profile, key_b, True)
    meter = StreamMeter(90000, is_vp8=True)
    rewriter = rtp.RtpRewriter(0xB0B, 90000, mark_switches=False)
    flows = {a.getsockname(): True}
    state = {"awaiting": True}

    def python_relay() -> None:
        while True:
            try:
                data, addr = port.recvfrom(2048)
            except BlockingIOError:
                return
            if addr not in flows or not 127 < data[0] < 192 or 192 <= data[1] <= 223:
                continue
            packet = rx.unprotect(data)
            header = rtp.parse_header(packet)
            if header is None:
                continue
            keyframe = meter.packet(header, packet, time.monotonic())
            if state["awaiting"]:
                if not keyframe:
                    continue
                state["awaiting"] = False
            out = rewriter.rewrite(header.ssrc, 100, header.marker, header.timestamp,
                                   rtp.payload_of(packet, header),
                                   extension=rtp.abs_send_time_extension(3))
            port.sendto(tx.protect(out), b_addr)

    packets = _packets(count, srtp_session(profile, key_a, True))
    cpu, got = _run(python_relay, packets, port, a, b)
    results["python"] = {"us_per_packet": round(1e6 * cpu / count, 2), "received": got}
    port.close()
    a.close()
    b.close()
    native_us = results["native"]["us_per_packet"]  # type: ignore[index]
    python_us = results["python"]["us_per_packet"]  # type: ignore[index]
    results["python_over_native"] = round(python_us / native_us, 1) if native_us else None
    results["packets"] = count
    results["srtp_profile"] = profile_name
    results["payload_bytes"] = PAYLOAD
    results["machine"] = system.machine_facts()
    results["date"] = time.strftime("%Y-%m-%d")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="aead_aes_256_gcm",
                        help="the SRTP profile (default: what aiortc negotiates first)")
    args = parser.parse_args()
    if not native.AVAILABLE:
        raise SystemExit(native.WHY_NOT)
    system.ensure_loopback_namespace(["-m", "bench.native_path"])
    results = measure(args.packets, args.profile)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))
    machine = results["machine"]
    print(f"{machine['cpu_model']}, {results['date']}, {args.profile}: native "  # type: ignore[index]
          f"{results['native']['us_per_packet']} µs/packet, Python "  # type: ignore[index]
          f"{results['python']['us_per_packet']} µs/packet "  # type: ignore[index]
          f"({results['python_over_native']}x)")


if __name__ == "__main__":
    main()
