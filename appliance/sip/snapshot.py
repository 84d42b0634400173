"""A confirmed dialog as plain data, so another process can end it.

A worker that dies (kill -9, a crash) takes its SIP calls with it, but the desk phones and
the PBX still hold those dialogs: nothing would ever send them BYE. So while a call is
confirmed the worker hands the supervisor this snapshot of its dialog (the supervisor keeps
it over the bus, `appliance/edges/bus.py`), and if the worker dies its replacement, or the
supervisor itself, rebuilds the dialog from it and sends an RFC 3261-correct BYE
(`orphan.py`).

It holds what §12.2.1.1 needs for a request inside the dialog: Call-ID, both tags (in our
From and their To), the remote target, the route set, and the last local CSeq (the BYE must
go above it), plus the next hop we computed from them.
"""

from __future__ import annotations

import msgspec

from .dialog import Dialog
from .message import parse_name_addr
from .transaction import Addr


class DialogSnapshot(msgspec.Struct, frozen=True, array_like=True):
    call_id: str
    local: str  # our From, with our tag
    remote: str  # their To, with their tag
    remote_target: str
    route_set: list[str]
    local_seq: int
    next_hop: tuple[str, int]


def take(dialog: Dialog, default_hop: Addr) -> DialogSnapshot:
    return DialogSnapshot(
        call_id=dialog.call_id,
        local=str(dialog.local),
        remote=str(dialog.remote),
        remote_target=dialog.remote_target,
        route_set=list(dialog.route_set),
        local_seq=dialog.local_seq,
        next_hop=dialog.next_hop(default_hop),
    )


def restore(snapshot: DialogSnapshot) -> Dialog:
    """The dialog again (raises SipParseError if the snapshot's From/To are unreadable)."""
    return Dialog(
        call_id=snapshot.call_id,
        local=parse_name_addr(snapshot.local),
        remote=parse_name_addr(snapshot.remote),
        local_seq=snapshot.local_seq,
        remote_target=snapshot.remote_target,
        route_set=list(snapshot.route_set),
        confirmed=True,
    )
