"""The worker's native packet path (issue 13, docs/decisions/0007-native-packet-path.md):
a C extension (`_packetloop.c`, built by `pip install -e .` against Debian's libsrtp2).

The extension is optional by design: a box where it did not build still carries calls on
the pure-Python path, and says so (`AVAILABLE`, `WHY_NOT` for the log and /metrics).
"""

from __future__ import annotations

from types import ModuleType

_module: ModuleType | None
try:
    from appliance.native import _packetloop as _module
except ImportError as exc:  # not built (no libsrtp2-dev, no compiler) or unloadable
    _module = None
    WHY_NOT = f"the native packet path is not built: {exc}"
else:
    WHY_NOT = ""

AVAILABLE = _module is not None


def module() -> ModuleType:
    """The extension; ImportError (with WHY_NOT) when it is not there."""
    if _module is None:
        raise ImportError(WHY_NOT)
    return _module
