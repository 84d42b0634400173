"""HTTP digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 7616).

A PBX that wants credentials answers 401 (WWW-Authenticate) or, as a proxy, 407
(Proxy-Authenticate). We answer the first Digest challenge we can compute, with qop=auth
when offered (auth-int when only that is), MD5 / MD5-sess / SHA-256 / SHA-256-sess.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from .message import SipParseError, SipResponse, quote, unquote

_HASHES = {
    "MD5": "md5",
    "MD5-SESS": "md5",
    "SHA-256": "sha256",
    "SHA-256-SESS": "sha256",
}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class DigestChallenge:
    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False


def parse_auth_params(text: str) -> dict[str, str]:
    """'a="x, y", b=z' -> {'a': 'x, y', 'b': 'z'}; names lower-cased, values unquoted."""
    params: dict[str, str] = {}
    i, size = 0, len(text)
    while i < size:
        while i < size and text[i] in " \t,":
            i += 1
        if i >= size:
            break
        eq = text.find("=", i)
        if eq < 0:
            raise SipParseError(f"bad auth parameter near {text[i : i + 40]!r}")
        name = text[i:eq].strip(" \t").lower()
        i = eq + 1
        while i < size and text[i] in " \t":
            i += 1
        if i < size and text[i] == '"':
            j, escaped = i + 1, False
            while j < size:
                if escaped:
                    escaped = False
                elif text[j] == "\\":
                    escaped = True
                elif text[j] == '"':
                    break
                j += 1
            if j >= size:
                raise SipParseError("unterminated quoted auth parameter")
            value = unquote(text[i : j + 1])
            i = j + 1
        else:
            j = text.find(",", i)
            j = size if j < 0 else j
            value = text[i:j].strip(" \t")
            i = j
        if not name:
            raise SipParseError("empty auth parameter name")
        params[name] = value
    return params


def parse_challenge(value: str) -> DigestChallenge:
    scheme, _, rest = value.strip(" \t").partition(" ")
    if scheme.lower() != "digest":
        raise SipParseError(f"not a Digest challenge: {scheme[:20]!r}")
    params = parse_auth_params(rest)
    if "realm" not in params or "nonce" not in params:
        raise SipParseError("Digest challenge without realm or nonce")
    qop = tuple(q.strip(" \t").lower() for q in params.get("qop", "").split(",") if q.strip())
    return DigestChallenge(
        realm=params["realm"],
        nonce=params["nonce"],
        algorithm=params.get("algorithm", "MD5"),
        qop=qop,
        opaque=params.get("opaque"),
        stale=params.get("stale", "").lower() == "true",
    )


def _h(algorithm: str, data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.new(_HASHES[algorithm.upper()], raw).hexdigest()


def compute_response(
    *,
    algorithm: str,
    username: str,
    password: str,
    realm: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The request-digest of RFC 2617 §3.2.2.1 / RFC 7616 §3.4.1."""
    algo = algorithm.upper()
    if algo not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    ha1 = _h(algo, f"{username}:{realm}:{password}")
    if algo.endswith("-SESS"):
        ha1 = _h(algo, f"{ha1}:{nonce}:{cnonce}")
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + _h(algo, body)
    ha2 = _h(algo, a2)
    if qop:
        return _h(algo, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(algo, f"{ha1}:{nonce}:{ha2}")


def build_authorization(
    challenge: DigestChallenge,
    credentials: Credentials,
    method: str,
    uri: str,
    *,
    cnonce: str | None = None,
    nc: int = 1,
    body: bytes = b"",
) -> str:
    """The Authorization / Proxy-Authorization value answering `challenge`."""
    qop = next((q for q in ("auth", "auth-int") if q in challenge.qop), None)
    cnonce = cnonce or secrets.token_hex(8)
    nc_text = f"{nc:08x}"
    response = compute_response(
        algorithm=challenge.algorithm,
        username=credentials.username,
        password=credentials.password,
        realm=challenge.realm,
        nonce=challenge.nonce,
        method=method,
        uri=uri,
        qop=qop,
        nc=nc_text if qop else None,
        cnonce=cnonce if qop or challenge.algorithm.upper().endswith("-SESS") else None,
        body=body,
    )
    parts = [
        f"username={quote(credentials.username)}",
        f"realm={quote(challenge.realm)}",
        f"nonce={quote(challenge.nonce)}",
        f"uri={quote(uri)}",
        f"response={quote(response)}",
        f"algorithm={challenge.algorithm}",
    ]
    if qop or challenge.algorithm.upper().endswith("-SESS"):
        parts.append(f"cnonce={quote(cnonce)}")
    if qop:
        parts += [f"qop={qop}", f"nc={nc_text}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)


def answer_challenge(
    response: SipResponse,
    credentials: Credentials,
    method: str,
    uri: str,
    *,
    body: bytes = b"",
    cnonce: str | None = None,
) -> tuple[str, str] | None:
    """(header name, value) answering a 401/407, or None when no challenge is usable."""
    if response.status == 401:
        source, target = "WWW-Authenticate", "Authorization"
    elif response.status == 407:
        source, target = "Proxy-Authenticate", "Proxy-Authorization"
    else:
        return None
    for value in response.headers.get_all(source):
        try:
            challenge = parse_challenge(value)
        except SipParseError:
            continue
        if challenge.algorithm.upper() not in _HASHES:
            continue
        return target, build_authorization(
            challenge, credentials, method, uri, cnonce=cnonce, body=body
        )
    return None
