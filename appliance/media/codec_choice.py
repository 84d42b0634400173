"""Which audio codec the browser leg uses, imposed by narrowing the browser's offer.

aiortc answers with the offer's codecs in the offer's order, and a browser sends with the
first codec of the answer. Leaving exactly one audio codec in the offer we feed aiortc makes
the answer, and so the browser, use it: PCMU whenever the browser can (relayed as is to the
desk phone), Opus only when the browser cannot or the offer asks for it (then transcoded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([^/\s]+)/(\d+)", re.IGNORECASE)
# Per-payload-type attributes: aiortc reads every rtpmap of a section, not just the m-line's.
_PT_ATTRIBUTE = re.compile(r"^a=(?:rtpmap|fmtp|rtcp-fb):(\d+)[ ]", re.IGNORECASE)


@dataclass(frozen=True)
class AudioChoice:
    codec: str  # "PCMU" or "OPUS"
    payload_type: int


class NoCommonCodec(ValueError):
    pass


def _split_sections(sdp: str) -> list[list[str]]:
    sections: list[list[str]] = [[]]
    for line in sdp.replace("\r\n", "\n").split("\n"):
        if line.startswith("m="):
            sections.append([])
        if line:
            sections[-1].append(line)
    return sections


def choose_audio(sdp: str, requested: str | None) -> tuple[str, AudioChoice | None]:
    """The offer narrowed to one audio codec, and that codec (None: no audio m-line)."""
    sections = _split_sections(sdp)
    choice: AudioChoice | None = None
    for lines in sections[1:]:
        if not lines[0].startswith("m=audio"):
            continue
        codecs: dict[str, int] = {}
        for line in lines:
            match = _RTPMAP.match(line)
            if match:
                name = match.group(2).upper()
                codecs.setdefault(name, int(match.group(1)))
        order = ["OPUS", "PCMU"] if (requested or "").upper() == "OPUS" else ["PCMU", "OPUS"]
        name = next((c for c in order if c in codecs), None)
        if name is None:
            raise NoCommonCodec("the browser offers neither PCMU nor Opus audio")
        choice = AudioChoice(name, codecs[name])
        fields = lines[0].split()
        lines[0] = " ".join([*fields[:3], str(choice.payload_type)])
        lines[1:] = [
            line for line in lines[1:]
            if not ((m := _PT_ATTRIBUTE.match(line)) and int(m.group(1)) != choice.payload_type)
        ]
        break
    text = "\r\n".join("\r\n".join(lines) for lines in sections if lines) + "\r\n"
    return text, choice
