"""Log lines an attacker cannot forge.

Much of what the appliance logs comes from the network: causestrings, SIP reasons, user
agents, candidate strings, AP-S answers. A client that puts a newline in such a value could
write a whole fake line ("... ERROR supervisor ...") into the operator's log; ESC and NUL
can rewrite a terminal. Rather than trusting every call site to escape its arguments, one
filter on each handler escapes the *formatted message* of every record: control characters
become visible escapes (`\\n`, `\\x1b`), and an over-long message is cut with a marker.
Tracebacks (`exc_info`) are formatted after the filter and keep their own newlines: they come
from our code, not from the network.
"""

from __future__ import annotations

import logging
import re

MAX_MESSAGE_CHARS = 2000

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi overrides
# that some viewers render as line breaks or use to reorder text.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group(0)
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` as one printable line of at most about `limit` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit} more chars]"
    return _UNSAFE.sub(_escape_char, text)


class EscapingFilter(logging.Filter):
    """Replaces each record's message by its escaped, formatted form (args folded in)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = escape(message)
        record.args = None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, EscapingFilter) for f in handler.filters):
            handler.addFilter(EscapingFilter())
