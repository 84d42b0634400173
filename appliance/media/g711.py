"""G.711 µ-law, only to *generate* audio the appliance plays itself (ringback tone).

Relayed voice is never decoded; transcoding (Opus legs) uses PyAV's codecs.
"""

from __future__ import annotations

import math

_BIAS = 0x84
_CLIP = 32635


def _encode_sample(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    if sample < 0:
        sample = -sample
    sample = min(sample, _CLIP) + _BIAS
    exponent = 7
    mask = 0x4000
    while exponent > 0 and not sample & mask:
        exponent -= 1
        mask >>= 1
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


_ENCODE = bytes(_encode_sample(s) for s in range(-32768, 32768))


def encode(samples: list[int]) -> bytes:
    """16-bit linear samples -> µ-law bytes."""
    return bytes(_ENCODE[s + 32768] for s in samples)


def decode_sample(byte: int) -> int:
    byte = ~byte & 0xFF
    sign = byte & 0x80
    exponent = (byte >> 4) & 0x07
    mantissa = byte & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return -magnitude if sign else magnitude


SILENCE = _ENCODE[32768]  # µ-law of 0 (0xFF)


def tone(frequencies: list[float], milliseconds: int, amplitude: float = 0.25,
         rate: int = 8000, start_sample: int = 0) -> bytes:
    """A sum of sine waves as µ-law, e.g. [440, 480] for a ringback tone."""
    count = rate * milliseconds // 1000
    peak = 32767 * amplitude / max(1, len(frequencies))
    samples = [
        round(sum(peak * math.sin(2 * math.pi * f * (start_sample + n) / rate)
                  for f in frequencies))
        for n in range(count)
    ]
    return encode(samples)
