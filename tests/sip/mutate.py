"""Datagram mutations for the SIP fuzzers (sans-IO in tests/sip, over UDP in tests/e2e):
the operations of test_message.py's hypothesis strategy, driven by a seeded Random so a
million of them cost little and a failure can be replayed from its seed."""

from __future__ import annotations

import random

TOKENS = [
    b"\r\n", b"\n", b" ", b":", b";", b",", b'"', b"<", b">", b"\x00", b"\r\n ", b"=", b"@",
    b"%", b"[", b"]", b"\xff", b"SIP/2.0", b"\r\n\r\n", b"Content-Length: 99999\r\n",
    b"Via: SIP/2.0/UDP 127.0.0.1;rport\r\n", b"To: <sip:x@[::1]>;tag=\r\n", b"\xc3\x28",
    b"CSeq: 4294967296 BYE\r\n", b"a=sendonly\r\n", b"c=IN IP4 0.0.0.0\r\n",
    b"m=audio 0 RTP/AVP 0\r\n",
]  # fmt: skip


def mutate(data: bytes, rng: random.Random, rounds: int | None = None) -> bytes:
    """`data` with 1-8 random flips, inserts, deletions, truncations or duplications."""
    out = bytearray(data)
    for _ in range(rounds if rounds is not None else rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(out)) if out else 0
        if op == 0 and out:
            out[pos] = rng.randrange(256)
        elif op == 1:
            out[pos:pos] = rng.choice(TOKENS)
        elif op == 2:
            del out[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            del out[pos:]
        else:
            out[pos:pos] = out[pos : pos + rng.randint(1, 64)]
    return bytes(out)


def garbage(rng: random.Random) -> bytes:
    """Random bytes, sometimes with a SIP-looking first line."""
    body = rng.randbytes(rng.randint(0, 1400))
    if rng.random() < 0.5:
        return rng.choice([b"INVITE sip:x SIP/2.0\r\n", b"SIP/2.0 200 OK\r\n", b"BYE "]) + body
    return body
