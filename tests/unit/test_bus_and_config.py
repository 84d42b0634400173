from pathlib import Path

import pytest

from appliance.core import config
from appliance.core import protocol as p
from appliance.edges import bus
from workers.sdp_candidates import local_candidates

ROOT = Path(__file__).resolve().parents[2]


def test_bus_messages_round_trip() -> None:
    offer = p.Offer(dialogid=1, ref=2, medium=0, ua_family="x", ua_version="1", ua_os="y",
                    offer=p.SessionDescription("offer", "v=0"), caller=5)
    for msg in (
        bus.StartCall(3, 4, offer),
        bus.ClientAction(3, 4, p.DTMF(dialogid=1, ref=2, value="5")),
        bus.ConnectionClosed(3, [4, 5]),
        bus.Shutdown(41, "bye"),
    ):
        assert bus.decode_to_worker(bus.encode(msg)) == msg
    for msg in (
        bus.Hello(0, 123),
        bus.ToClient(3, p.Alert(dialogid=1, ref=2, channel=4)),
        bus.RoomOpened(4, 123456789012),
        bus.ChannelFreed(4),
        bus.ShutdownDone(1),
    ):
        assert bus.decode_to_supervisor(bus.encode(msg)) == msg


def test_shipped_config_is_valid_and_equals_the_defaults() -> None:
    shipped = config.load(ROOT / "conf" / "appliance.toml")
    assert shipped == config.Config()


def test_config_errors_are_readable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[media]\nport_min = 50000\nport_max = 40000\n")
    with pytest.raises(config.ConfigError, match="port_min"):
        config.load(bad)
    bad.write_text("[media]\nno_such_key = 1\n")
    with pytest.raises(config.ConfigError, match="no_such_key"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


def test_default_config_never_names_an_ice_server() -> None:
    assert config.Config().ice_servers() == []


SDP = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
    "a=candidate:abc 1 udp 2130706431 127.0.0.1 40001 typ host\r\n"
    "a=end-of-candidates\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n"
    "a=candidate:abc 1 udp 2130706431 127.0.0.1 40001 typ host\r\n"
)


def test_each_bundled_candidate_is_announced_once() -> None:
    assert local_candidates(SDP) == [
        p.IceCandidate("candidate:abc 1 udp 2130706431 127.0.0.1 40001 typ host", "0", 0)
    ]
