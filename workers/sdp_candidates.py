"""What the appliance reads back out of its own answer SDP: ICE candidates (one `ice`
message each, PROTOCOL.md step 4) and negotiated header-extension ids."""

from __future__ import annotations

from appliance.core import protocol as p


def _sections(sdp: str) -> list[list[str]]:
    sections: list[list[str]] = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            sections.append([])
        if sections:
            sections[-1].append(line)
    return sections


def local_candidates(sdp: str) -> list[p.IceCandidate]:
    """Each distinct candidate of the SDP with the mid and index of its first m-section.

    aiortc bundles every m-section on one transport and repeats the same candidates in each
    section; the browser needs each candidate once.
    """
    seen: set[str] = set()
    out: list[p.IceCandidate] = []
    for index, lines in enumerate(_sections(sdp)):
        mid = next((ln[len("a=mid:") :] for ln in lines if ln.startswith("a=mid:")), str(index))
        for line in lines:
            if line.startswith("a=candidate:"):
                candidate = line[len("a=") :]
                if candidate not in seen:
                    seen.add(candidate)
                    out.append(
                        p.IceCandidate(candidate=candidate, sdpMid=mid, sdpMLineIndex=index)
                    )
    return out


def extension_id(sdp: str, kind: str, uri: str) -> int | None:
    """The id negotiated for header extension `uri` in the first `kind` m-section."""
    for lines in _sections(sdp):
        if lines and lines[0].startswith(f"m={kind}"):
            for line in lines:
                if line.startswith("a=extmap:"):
                    ident, _, rest = line[len("a=extmap:"):].partition(" ")
                    if rest.split()[0] == uri and ident.split("/")[0].isdigit():
                        return int(ident.split("/")[0])
            return None
    return None
