"""The supervisor's booking of channels, with a fake worker socket in place of ZeroMQ.

Whatever a browser sends, and whatever fails between booking a channel and handing the
call to its worker, every channel, suid and room must come back, and the browser gets a
release with a cause instead of a dead WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from msgspec import UNSET

from appliance.core import agent_token
from appliance.core import config as cfg
from appliance.core import protocol as p
from appliance.edges import bus
from supervisor.app import Supervisor
from supervisor.calls import ClientConn

SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


class FakeRouter:
    """Records what the supervisor sends its workers; `fail` makes the next sends raise."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bus.ToWorker]] = []
        self.fail: BaseException | None = None

    def send_multipart(self, frames: list[bytes]) -> asyncio.Future[None]:
        # As zmq.asyncio does: a future, failed at once when the worker is unreachable.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if isinstance(self.fail, zmq.ZMQError):
            done.set_exception(self.fail)
            return done
        if self.fail is not None:
            raise self.fail
        self.sent.append((int(frames[0][1:]), bus.decode_to_worker(frames[1])))
        done.set_result(None)
        return done

    def starts(self) -> list[bus.StartCall]:
        return [m for _, m in self.sent if isinstance(m, bus.StartCall)]


class Sink:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    async def send_frame(self, data: bytes) -> None:
        self.frames.append(json.loads(data))

    def releases(self) -> list[tuple[int, str]]:
        return [(f["cause"], f["causestring"]) for f in self.frames if f["action"] == "release"]


def make_supervisor(tmp_path: Path, workers: int = 2, channels: int = 50,
                    **sections: dict[str, Any]) -> tuple[Supervisor, FakeRouter]:
    raw: dict[str, Any] = {"appliance": {"data_dir": str(tmp_path)},
                           "workers": {"count": workers, "channels_per_worker": channels}}
    raw.update(sections)
    sup = Supervisor(cfg.from_dict(raw), str(tmp_path / "effective.json"))
    router = FakeRouter()
    sup._router.close(linger=0)
    sup._router = router  # type: ignore[assignment]
    for index in range(workers):
        sup.placement.set_ready(index, True)
    return sup, router


def offer(dialogid: int, **fields: Any) -> p.Offer:
    fields.setdefault("callee", 9333)
    return p.Offer(dialogid=dialogid, ref=1, medium=0, ua_family="test", ua_version="1",
                   ua_os="linux", offer=p.SessionDescription(type="offer", sdp=SDP), **fields)


def frame(dialogid: int, **fields: Any) -> str:
    return p.encode(offer(dialogid, **fields)).decode()


def all_free(sup: Supervisor) -> bool:
    return (all(s.free == set(s.channels) for s in sup.placement.slots)
            and not sup.calls and not sup.calls.suids and not sup.rooms
            and sup.admission.in_setup == 0)


def connect(sup: Supervisor, peer: str = "192.0.2.10") -> tuple[ClientConn, Sink]:
    sink = Sink()
    return sup.open_conn(sink, peer=peer), sink


async def test_100_offers_the_bus_cannot_carry_leave_every_channel_free(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path, admission={"max_setup_per_connection": 0,
                                                       "max_setup_per_address": 0,
                                                       "max_setup_total": 0})
    conn, sink = connect(sup)
    for i in range(100):
        # Beyond 64 bits: JSON carries it, MessagePack cannot (the bus refuses to encode).
        await sup._offer(conn, (i + 1, 1), offer(i + 1, caller=2**64 + i, suid=f"s{i}"))
    assert all_free(sup), sup.calls
    assert not router.starts() and not conn.calls
    assert sink.releases() == [(100, "offer: value out of range")] * 100
    # The same through the front door, whatever decode makes of it: every frame answered.
    for i in range(100):
        await sup.handle_frame(conn, frame(1000 + i, caller=2**64, roomkey=2**70))
    assert all_free(sup) and len(sink.releases()) == 200
    # The box is not poisoned: a normal offer (same suids) still gets a channel.
    await sup.handle_frame(conn, frame(5000, caller=5678, suid="s1"))
    assert [s.channel for s in router.starts()] == [1]


async def test_a_worker_that_cannot_be_reached_unbooks_the_call(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path)
    conn, sink = connect(sup)
    router.fail = zmq.ZMQError(zmq.EHOSTUNREACH)
    await sup.handle_frame(conn, frame(1, suid="user-1"))
    assert sink.releases() == [(41, "media worker unavailable")]
    assert all_free(sup)


async def test_an_unexpected_error_is_answered_and_unbooks(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path)
    conn, sink = connect(sup)
    router.fail = RuntimeError("a bug somewhere below")
    await sup.handle_frame(conn, frame(1, suid="user-1"))  # must not raise
    assert sink.releases() == [(41, "internal error")]
    assert all_free(sup)
    assert sup.counters.internal_errors == 1
    router.fail = None
    await sup.handle_frame(conn, frame(2, suid="user-1"))
    assert len(router.starts()) == 1


async def test_a_release_with_an_absurd_cause_still_ends_the_call(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path)
    conn, _ = connect(sup)
    await sup.handle_frame(conn, frame(7))
    (start,) = router.starts()
    release = p.Release(dialogid=7, ref=1, channel=start.channel, cause=2**64,
                        causestring="x" * 100)
    await sup._handle_action(conn, release)
    (_, forwarded), = [(i, m) for i, m in router.sent if isinstance(m, bus.ClientAction)]
    assert isinstance(forwarded.action, p.Release)
    assert (forwarded.channel, forwarded.action.cause) == (start.channel, 16)
    assert not conn.calls  # the worker ends it and frees the channel (ChannelFreed)
    await sup._dispatch(bus.ChannelFreed(start.channel))
    assert all_free(sup)


async def test_200_offers_from_one_connection_take_only_its_share(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path, admission={"max_setup_per_connection": 8,
                                                       "max_setup_per_address": 16,
                                                       "max_setup_total": 32})
    hog, hog_sink = connect(sup, "198.51.100.7")
    for i in range(200):
        await sup.handle_frame(hog, frame(i + 1))
    assert len(router.starts()) == 8
    assert hog_sink.releases() == [
        (42, "too many calls in setup from this connection")] * 192
    assert sup.counters.refused["too many calls in setup from this connection"] == 192
    metrics = sup.health.prometheus()
    assert ('appliance_offers_refused_total{reason="too many calls in setup from this '
            'connection"} 192') in metrics
    assert "appliance_calls_in_setup{} 8" in metrics
    # Another caller still gets a channel; 34 is kept for a box that is really full.
    other, other_sink = connect(sup, "203.0.113.9")
    await sup.handle_frame(other, frame(1))
    assert len(router.starts()) == 9 and other_sink.releases() == []
    # Once the hog's calls are connected their setup is over: it may place more.
    for start in router.starts()[:8]:
        await sup._dispatch(bus.CallConnected(start.channel))
    await sup.handle_frame(hog, frame(999))
    assert len(router.starts()) == 10


async def test_no_circuit_only_when_the_box_is_full(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path, workers=2, channels=2)
    for n in range(5):
        conn, sink = connect(sup, f"192.0.2.{n}")
        await sup.handle_frame(conn, frame(1))
    assert len(router.starts()) == 4
    assert sink.releases() == [(34, "no circuit available")]


def live_room(sup: Supervisor, roomkey: int) -> None:
    """A customer call's room, as the worker reports it (RoomOpened after verify)."""
    channel = sup.placement.allocate()
    assert channel is not None
    sup.rooms.open(roomkey, channel)


async def test_roomkey_guessing_is_throttled_per_address(tmp_path: Path) -> None:
    sup, router = make_supervisor(tmp_path)
    live_room(sup, 424242424242)
    guesser, sink = connect(sup, "198.51.100.7")
    for guess in range(6):
        await sup.handle_frame(guesser, frame(guess + 1, module="Agent", roomkey=1000 + guess))
    assert sink.releases() == [(21, "invalid roomkey")] * 5 + [
        (21, "too many invalid roomkeys, try later")]
    # In the cool-down even the right roomkey is refused, on a new connection too.
    again, again_sink = connect(sup, "198.51.100.7")
    await sup.handle_frame(again, frame(50, module="Agent", roomkey=424242424242))
    assert again_sink.releases() == [(21, "too many invalid roomkeys, try later")]
    assert not router.starts()
    # The real agent, elsewhere, joins.
    agent, agent_sink = connect(sup, "203.0.113.9")
    await sup.handle_frame(agent, frame(60, module="Agent", roomkey=424242424242))
    assert agent_sink.releases() == [] and len(router.starts()) == 1
    status = sup.admission_status()
    assert (status["wrong_roomkeys"], status["roomkey_blocks"]) == (6, 1)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent-token.secret"
    path.write_text("correct-horse-battery-staple\n")
    path.chmod(0o600)
    return path


def agent_offer_frame(dialogid: int, roomkey: int, token: str | None) -> str:
    data = json.loads(frame(dialogid, module="Agent", roomkey=roomkey))
    if token is not None:
        data["token"] = token
    return json.dumps(data)


async def test_required_agent_token(tmp_path: Path, secret_file: Path) -> None:
    sup, router = make_supervisor(tmp_path, aps={"agent_token_secret_file": str(secret_file),
                                                 "require_agent_token": True})
    roomkey = 414885633285
    live_room(sup, roomkey)
    assert "token" in p.Offer.__struct_fields__, "protocol.Offer has no token field yet"
    secret = b"correct-horse-battery-staple"
    good = agent_token.issue(secret, roomkey, time.time(), 300)
    attacker, a_sink = connect(sup, "198.51.100.7")
    await sup.handle_frame(attacker, agent_offer_frame(1, roomkey, None))
    await sup.handle_frame(attacker, agent_offer_frame(2, roomkey, "1" + good))
    other_room = agent_token.issue(secret, roomkey + 1, time.time(), 300)
    await sup.handle_frame(attacker, agent_offer_frame(3, roomkey, other_room))
    assert a_sink.releases() == [(21, "missing agent token")] + [
        (21, "agent token does not match this roomkey")] * 2
    assert not router.starts()
    assert sup.counters.tokens_refused == 3
    agent, sink = connect(sup, "203.0.113.9")
    await sup.handle_frame(agent, agent_offer_frame(9, roomkey, good))
    assert sink.releases() == [] and len(router.starts()) == 1
    assert router.starts()[0].offer.roomkey == roomkey


async def test_optional_token_is_checked_when_sent(tmp_path: Path, secret_file: Path) -> None:
    sup, router = make_supervisor(tmp_path, aps={"agent_token_secret_file": str(secret_file)})
    live_room(sup, 777)
    conn, sink = connect(sup)
    await sup.handle_frame(conn, agent_offer_frame(1, 777, "123.forged"))
    assert sink.releases() == [(21, "agent token does not match this roomkey")]
    await sup.handle_frame(conn, agent_offer_frame(2, 777, None))
    assert len(router.starts()) == 1 and router.starts()[0].offer.token in (UNSET, "")


def test_a_secret_file_others_can_read_stops_the_start(tmp_path: Path,
                                                      secret_file: Path) -> None:
    secret_file.chmod(0o644)
    with pytest.raises(SystemExit, match="agent_token_secret_file"):
        make_supervisor(tmp_path, aps={"agent_token_secret_file": str(secret_file)})
    with pytest.raises(cfg.ConfigError, match="require_agent_token"):
        cfg.from_dict({"aps": {"require_agent_token": True}})
