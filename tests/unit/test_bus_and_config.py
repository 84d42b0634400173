import os
import re
from pathlib import Path

import pytest

from appliance.core import config
from appliance.core import protocol as p
from appliance.edges import bus
from appliance.ice import tcp_writer
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


# -- [media] udp_port, tcp_port, tcp_send_buffer (issue 12) ----------------------------------


def media_config(workers: int | None = 4, **media: int) -> config.Config:
    raw: dict[str, dict[str, int]] = {"media": dict(media)}
    if workers is not None:
        raw["workers"] = {"count": workers}
    return config.from_dict(raw)


def test_per_worker_media_ports_are_on_by_default() -> None:
    media = config.Config().media
    assert (media.udp_port, media.tcp_port) == (40000, 40000)  # UDP and TCP both
    assert media.tcp_send_buffer == tcp_writer.DEFAULT_LIMIT == 256 * 1024
    assert config.TCP_SEND_BUFFER_MIN == tcp_writer.MIN_LIMIT
    assert config.TCP_SEND_BUFFER_MAX == tcp_writer.MAX_LIMIT


def test_per_worker_media_ports_accepted() -> None:
    c = media_config(udp_port=50000, tcp_port=50000)  # the same numbers on both: fine
    assert (c.media.udp_port, c.media.tcp_port) == (50000, 50000)
    media_config(udp_port=65532, tcp_port=65532)  # 4 workers: 65532..65535
    media_config(udp_port=1, tcp_port=1)
    # Another protocol's listener on the same number is no clash: UDP 4433 beside the TCP
    # signalling port (QUIC-friendly UDP 443 beside HTTPS on 443), TCP 5060 beside SIP/UDP.
    media_config(udp_port=4433, tcp_port=5060)
    media_config(udp_port=9090)
    config.from_dict({"workers": {"count": 4}, "admin": {"port": 0},
                      "media": {"tcp_port": 9090}})  # the admin port off: 9090 is free
    media_config(tcp_send_buffer=65537)
    media_config(tcp_send_buffer=16 * 1024 * 1024)


@pytest.mark.parametrize("key", ["udp_port", "tcp_port"])
@pytest.mark.parametrize("base", [-1, 65533, 65535, 65536, 70000])
def test_a_media_port_base_outside_1_to_65535_minus_the_workers_is_refused(
        key: str, base: int) -> None:
    with pytest.raises(config.ConfigError, match=rf"media\.{key} must be 0 \(off\) or 1\.\.65532"):
        media_config(**{key: base})


def test_the_media_port_bound_follows_the_cores_when_the_worker_count_is_0() -> None:
    n = len(os.sched_getaffinity(0))
    media_config(workers=None, udp_port=65536 - n)
    with pytest.raises(config.ConfigError, match=rf"1\.\.{65536 - n}\b"):
        media_config(workers=None, udp_port=65537 - n)


@pytest.mark.parametrize(("base", "clash"), [
    (5060, "the SIP ports"), (5057, "the SIP ports"), (5063, "the SIP ports"),
    (19997, "the SIP RTP range"), (29999, "the SIP RTP range"), (25000, "the SIP RTP range"),
])
def test_a_udp_media_port_on_a_sip_port_is_refused(base: int, clash: str) -> None:
    with pytest.raises(config.ConfigError, match=rf"media\.udp_port .*UDP.* overlaps {clash}"):
        media_config(udp_port=base)
    media_config(tcp_port=base)  # SIP and its RTP are UDP only


def test_the_sip_ports_counted_are_the_workers_sip_ports() -> None:
    media_config(udp_port=5056)  # 5056..5059, just below 5060..5063
    media_config(udp_port=5064)
    with pytest.raises(config.ConfigError, match=r"5070\.\.5073"):
        config.from_dict({"workers": {"count": 4}, "sip": {"base_port": 5070},
                          "media": {"udp_port": 5068}})


@pytest.mark.parametrize(("base", "clash"), [
    (4433, "signalling.port 4433"), (4430, "signalling.port 4433"),
    (9087, "admin.port 9090"), (9090, "admin.port 9090"),
])
def test_a_tcp_media_port_on_the_signalling_or_admin_port_is_refused(
        base: int, clash: str) -> None:
    with pytest.raises(config.ConfigError, match=rf"media\.tcp_port .*TCP.* overlaps {clash}"):
        media_config(tcp_port=base)
    media_config(udp_port=base)  # the signalling and admin ports are TCP only


@pytest.mark.parametrize("size", [0, -1, 65536, 16 * 1024 * 1024 + 1])
def test_a_tcp_send_buffer_out_of_bounds_is_refused(size: int) -> None:
    with pytest.raises(config.ConfigError, match=r"media\.tcp_send_buffer must be 65537\.\."):
        media_config(tcp_send_buffer=size)


def test_a_bad_media_port_in_a_file_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[workers]\ncount = 2\n[media]\ntcp_port = 4432\n")
    expected = f"{bad}: media.tcp_port + i (4432..4433, TCP) overlaps signalling.port 4433"
    with pytest.raises(config.ConfigError, match=re.escape(expected)):
        config.load(bad)
