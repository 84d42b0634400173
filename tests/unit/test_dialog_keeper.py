"""supervisor/dialogs.py: the supervisor's copy of every worker's desk-phone dialogs, and who
sends their BYE when the worker dies (its replacement, or the supervisor after a while).
A real UDP socket on 127.0.0.1 plays the PBX for the fallback; nothing else runs."""

from __future__ import annotations

import asyncio
import socket

from appliance.core.config import from_dict
from appliance.edges import bus
from appliance.sip.message import SipRequest, cseq_of, parse
from appliance.sip.snapshot import DialogSnapshot
from supervisor.dialogs import DialogKeeper


def snapshot(call_id: str, seq: int = 1, hop: tuple[str, int] = ("127.0.0.1", 9)) -> DialogSnapshot:
    return DialogSnapshot(call_id, f"<sip:5678@127.0.0.1>;tag=a{call_id}",
                          f"<sip:9333@127.0.0.1>;tag=b{call_id}", "sip:9333@127.0.0.1:5090",
                          [], seq, hop)


def keeper(fallback: float, proxy: str = "127.0.0.1:9") -> tuple[DialogKeeper, list]:
    config = from_dict({"workers": {"dialog_bye_fallback": fallback},
                        "sip": {"proxy": proxy, "listen": "127.0.0.1"}})
    sent: list[tuple[int, bus._Msg]] = []
    return DialogKeeper(config, lambda index, msg: sent.append((index, msg))), sent


async def test_the_replacement_gets_the_dead_workers_live_dialogs_only() -> None:
    dialogs, sent = keeper(fallback=5.0)
    dialogs.up(bus.DialogUp(0, snapshot("one")))
    dialogs.up(bus.DialogUp(0, snapshot("two")))
    dialogs.up(bus.DialogUp(0, snapshot("two", seq=3)))  # its CSeq moved on
    dialogs.up(bus.DialogUp(1, snapshot("other-worker")))
    dialogs.up(bus.DialogUp(0, snapshot("ended")))
    dialogs.down(bus.DialogDown(0, "ended"))
    dialogs.worker_died(0)
    assert sent == []  # nothing until the replacement is up
    dialogs.worker_hello(0)
    ((index, msg),) = sent
    assert index == 0 and isinstance(msg, bus.ByeDialogs)
    assert {(d.call_id, d.local_seq) for d in msg.dialogs} == {("one", 1), ("two", 3)}
    dialogs.worker_hello(0)  # a second Hello (or a worker with nothing left) sends nothing
    assert len(sent) == 1
    assert set(dialogs.live) == {1}
    dialogs.close()


async def test_without_a_replacement_the_supervisor_sends_the_bye_itself() -> None:
    pbx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pbx.bind(("127.0.0.1", 0))
    pbx.setblocking(False)
    port = pbx.getsockname()[1]
    dialogs, sent = keeper(fallback=0.2, proxy=f"127.0.0.1:{port}")
    try:
        dialogs.up(bus.DialogUp(0, snapshot("lost", seq=7, hop=("127.0.0.1", port))))
        dialogs.worker_died(0)
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(pbx, 4096), 3.0)
        bye = parse(data)
        assert isinstance(bye, SipRequest) and bye.method == "BYE"
        assert bye.headers.get("Call-ID") == "lost" and cseq_of(bye).seq == 8
        assert "cause=41" in (bye.headers.get("Reason") or "")
        assert dialogs.byes_sent_here == 1
        dialogs.worker_hello(0)  # the replacement, late: the BYE is already out
        assert sent == []
    finally:
        dialogs.close()
        pbx.close()
