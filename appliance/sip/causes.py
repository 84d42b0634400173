"""SIP status <-> Q.850 cause (RFC 3398 §7.2.4.1 and §8.2.6.1), with readable causestrings.

The browser's `release` carries a Q.850 cause and a causestring, so every way a SIP call
can fail must land on one. A `Reason: Q.850;cause=N` header (RFC 3326) in the response,
when present, is the PBX telling us the cause directly and wins over the table.
"""

from __future__ import annotations

import re

from .message import SipRequest, SipResponse

CAUSE_STRINGS: dict[int, str] = {
    1: "unallocated number",
    2: "no route to network",
    3: "no route to destination",
    16: "normal call clearing",
    17: "user busy",
    18: "no user responding",
    19: "no answer",
    20: "subscriber absent",
    21: "call rejected",
    22: "number changed",
    23: "redirection to new destination",
    25: "exchange routing error",
    26: "non-selected user clearing",
    27: "destination out of order",
    28: "invalid number format",
    29: "facility rejected",
    31: "normal, unspecified",
    34: "no circuit available",
    38: "network out of order",
    41: "temporary failure",
    42: "switching equipment congestion",
    47: "resource unavailable",
    55: "incoming calls barred within CUG",
    57: "bearer capability not authorized",
    58: "bearer capability not presently available",
    63: "service or option not available",
    65: "bearer capability not implemented",
    70: "only restricted digital information bearer capability is available",
    79: "service or option not implemented",
    87: "user not member of CUG",
    88: "incompatible destination",
    102: "recovery on timer expiry",
    111: "protocol error",
    127: "interworking, unspecified",
}

# RFC 3398 §8.2.6.1, "SIP -> ISUP". 487 and 488/606 have no mapping in the RFC: 487 is a
# cancelled call (normal clearing), 488/606 an offer the far end cannot take.
SIP_TO_Q850: dict[int, int] = {
    400: 41,
    401: 21,
    402: 21,
    403: 21,
    404: 1,
    405: 63,
    406: 79,
    407: 21,
    408: 102,
    410: 22,
    413: 127,
    414: 127,
    415: 79,
    416: 127,
    420: 127,
    421: 127,
    423: 127,
    480: 18,
    481: 41,
    482: 25,
    483: 25,
    484: 28,
    485: 1,
    486: 17,
    487: 16,
    488: 88,
    500: 41,
    501: 79,
    502: 38,
    503: 41,
    504: 102,
    505: 127,
    513: 127,
    600: 17,
    603: 21,
    604: 1,
    606: 88,
}

# Classes the table does not name (a PBX may invent 4xx/5xx codes): the RFC's own fallbacks
# for the nearest listed code of each class.
_CLASS_DEFAULT = {3: 127, 4: 21, 5: 41, 6: 21}

# RFC 3398 §7.2.4.1, "ISUP -> SIP" (16 is not a failure: it is a BYE or a CANCEL).
Q850_TO_SIP: dict[int, int] = {
    1: 404,
    2: 404,
    3: 404,
    17: 486,
    18: 408,
    19: 480,
    20: 480,
    21: 403,
    22: 410,
    23: 410,
    26: 404,
    27: 502,
    28: 484,
    29: 501,
    31: 480,
    34: 503,
    38: 503,
    41: 503,
    42: 503,
    47: 503,
    55: 403,
    57: 403,
    58: 503,
    65: 488,
    70: 488,
    79: 501,
    87: 403,
    88: 503,
    102: 504,
    111: 500,
    127: 500,
}

CAUSE_NORMAL = 16
CAUSE_NO_ANSWER = 19
CAUSE_TIMER_EXPIRY = 102
CAUSE_INTERWORKING = 127

_REASON_RE = re.compile(r"\s*Q\.850\s*;(.*)", re.IGNORECASE)
_CAUSE_RE = re.compile(r"(?:^|;)\s*cause\s*=\s*([0-9]{1,3})", re.IGNORECASE)


def causestring(cause: int) -> str:
    return CAUSE_STRINGS.get(cause, f"cause {cause}")


def cause_for_status(status: int) -> int:
    if status in SIP_TO_Q850:
        return SIP_TO_Q850[status]
    return _CLASS_DEFAULT.get(status // 100, CAUSE_INTERWORKING)


def status_for_cause(cause: int) -> int | None:
    """The SIP final response for a Q.850 cause; None for 16 (clear with BYE/CANCEL)."""
    if cause == CAUSE_NORMAL:
        return None
    return Q850_TO_SIP.get(cause, 500)


def reason_cause(message: SipRequest | SipResponse) -> int | None:
    """The cause in a `Reason: Q.850;cause=N` header (RFC 3326), if any."""
    for value in message.headers.get_all("Reason"):
        for item in value.split(","):
            match = _REASON_RE.match(item)
            if match is None:
                continue
            cause = _CAUSE_RE.search(match.group(1))
            if cause is not None and 0 < int(cause.group(1)) < 128:
                return int(cause.group(1))
    return None


def cause_of_response(response: SipResponse) -> tuple[int, str]:
    """(cause, causestring) for a failed INVITE's final response."""
    cause = reason_cause(response)
    if cause is None:
        cause = cause_for_status(response.status)
    return cause, causestring(cause)


def reason_header(cause: int) -> str:
    """A Reason header value for our CANCEL / BYE (RFC 3326)."""
    return f'Q.850;cause={cause};text="{causestring(cause)}"'
