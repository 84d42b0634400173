"""Which codecs the browser legs use, imposed by narrowing the browser's offer.

aiortc answers with the offer's codecs in the offer's order, and a browser sends with the
first codec of the answer. Leaving exactly one codec per media section in the offer we feed
aiortc makes the answer, and so the browser, use it:
- audio: PCMU whenever the browser can (relayed as is to the desk phone), Opus only when
  the browser cannot or the offer asks for it (then transcoded);
- video: VP8 on both browsers' legs, so video is relayed between them without decoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([^/\s]+)/(\d+)", re.IGNORECASE)
# Per-payload-type attributes: aiortc reads every rtpmap of a section, not just the m-line's.
_PT_ATTRIBUTE = re.compile(r"^a=(?:rtpmap|fmtp|rtcp-fb):(\d+)[ ]", re.IGNORECASE)


@dataclass(frozen=True)
class CodecChoice:
    codec: str  # "PCMU", "OPUS" or "VP8"
    payload_type: int


AudioChoice = CodecChoice  # kept for readability at call sites


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


def _join(sections: list[list[str]]) -> str:
    return "\r\n".join("\r\n".join(lines) for lines in sections if lines) + "\r\n"


def _narrow(lines: list[str], preference: list[str]) -> CodecChoice | None:
    """Keep only the first preferred codec in this media section (m-line and attributes)."""
    codecs: dict[str, int] = {}
    for line in lines:
        match = _RTPMAP.match(line)
        if match:
            codecs.setdefault(match.group(2).upper(), int(match.group(1)))
    name = next((c for c in preference if c in codecs), None)
    if name is None:
        return None
    choice = CodecChoice(name, codecs[name])
    fields = lines[0].split()
    lines[0] = " ".join([*fields[:3], str(choice.payload_type)])
    lines[1:] = [
        line for line in lines[1:]
        if not ((m := _PT_ATTRIBUTE.match(line)) and int(m.group(1)) != choice.payload_type)
    ]
    return choice


def choose_codecs(
    sdp: str, requested_audio: str | None
) -> tuple[str, CodecChoice | None, CodecChoice | None]:
    """The offer narrowed to one audio and one video codec, and those codecs (None: that
    medium is absent). A video section without VP8 is left to aiortc, which will refuse it."""
    sections = _split_sections(sdp)
    audio = video = None
    audio_order = ["OPUS", "PCMU"] if (requested_audio or "").upper() == "OPUS" else [
        "PCMU", "OPUS"]
    for lines in sections[1:]:
        if lines[0].startswith("m=audio") and audio is None:
            audio = _narrow(lines, audio_order)
            if audio is None:
                raise NoCommonCodec("the browser offers neither PCMU nor Opus audio")
        elif lines[0].startswith("m=video") and video is None:
            video = _narrow(lines, ["VP8"])
            if video is None:
                raise NoCommonCodec("the browser offers no VP8 video")
    return _join(sections), audio, video


def choose_audio(sdp: str, requested: str | None) -> tuple[str, CodecChoice | None]:
    """Audio only: the offer with one audio codec left (video sections untouched)."""
    sections = _split_sections(sdp)
    order = ["OPUS", "PCMU"] if (requested or "").upper() == "OPUS" else ["PCMU", "OPUS"]
    choice = None
    for lines in sections[1:]:
        if lines[0].startswith("m=audio"):
            choice = _narrow(lines, order)
            if choice is None:
                raise NoCommonCodec("the browser offers neither PCMU nor Opus audio")
            break
    return _join(sections), choice
