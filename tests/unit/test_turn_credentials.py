"""TURN credentials and the ICE servers the pages and the SDK get (turn_credentials.py).

The derivation is checked against a vector computed outside Python, with OpenSSL:

    printf '1700000000:ms-1.0123456789ab' \\
        | openssl dgst -binary -sha1 -hmac 'north-pole-shared-secret' | base64
    6/LD5vfdZw6r24idu3yv63xUEMk=

(coturn's `turnadmin` has no command that derives a REST credential; it does print the
long-term key coturn makes of a username and password, which is checked below against
aioice's, for a credential of ours). That coturn itself accepts these credentials, refuses
them expired or under another secret, is tests/e2e/test_turn.py.

The URL rules are cross-checked against aiortc's parser (the workers hand the same list to
aiortc), and the answer's parser against the pages' own (protocol-client.js, in node).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aioice.turn import make_integrity_key
from aiortc.rtcicetransport import parse_stun_turn_uri
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.core import config as cfg
from appliance.core import config_secrets
from appliance.core import turn_credentials as tc
from tests.fuzz_scale import scaled

ROOT = Path(__file__).resolve().parents[2]
CLIENT_JS = ROOT / "supervisor" / "static" / "protocol-client.js"
SECRET = "north-pole-shared-secret"


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, text.encode())
    os.close(fd)
    os.chmod(path, mode)
    return path


# -- the derivation -------------------------------------------------------------------


def test_credential_matches_the_openssl_vector() -> None:
    username, credential = tc.issue(SECRET.encode(), "ms-1.0123456789ab", now=1699913600.9,
                                    ttl_s=86400)
    assert username == "1700000000:ms-1.0123456789ab"
    assert credential == "6/LD5vfdZw6r24idu3yv63xUEMk="


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@settings(max_examples=scaled(5, 50), deadline=None)
@given(secret=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                      max_size=64),
       user=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
       expiry=st.integers(0, 10**12 - 1))
def test_credential_is_what_openssl_computes(secret: str, user: str, expiry: int) -> None:
    username = tc.rest_username(expiry, user)
    done = subprocess.run(
        f"printf %s {_sh(username)} | openssl dgst -binary -sha1 -hmac {_sh(secret)} | base64",
        shell=True, capture_output=True, text=True, check=True, timeout=10)
    assert tc.rest_credential(secret.encode(), username) == done.stdout.strip()


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.mark.skipif(shutil.which("turnadmin") is None, reason="coturn not installed")
def test_coturn_makes_the_same_long_term_key_of_our_credential_as_aioice() -> None:
    # The key both sides put into MESSAGE-INTEGRITY: MD5(username:realm:credential).
    username, credential = tc.issue(SECRET.encode(), "ms-1.abc", time.time(), 3600)
    done = subprocess.run(["turnadmin", "-k", "-u", username, "-r", "turn.example.com",
                           "-p", credential], capture_output=True, text=True, timeout=10)
    key = next(line for line in done.stdout.split() if line.startswith("0x"))
    assert key == "0x" + make_integrity_key(username, "turn.example.com", credential).hex()


def test_username_carries_the_expiry_first() -> None:
    username, _ = tc.issue(b"s", "u", now=1000.5, ttl_s=600)
    assert username == "1600:u"
    for bad in ("", "a:b", "a b", "é", "x" * 65):
        with pytest.raises(tc.IceServerError):
            tc.rest_username(1, bad)
    for expiry in (-1, 10**12):
        with pytest.raises(tc.IceServerError):
            tc.rest_username(expiry, "u")
    with pytest.raises(tc.IceServerError):
        tc.rest_credential(b"", "1:u")


def test_user_id_names_the_appliance_and_is_never_shared() -> None:
    assert tc.make_user_id("ms-1", "0a1b") == "ms-1.0a1b"
    assert tc.make_user_id("box 7:ü/x", "ff") == "box7x.ff"  # what a username cannot carry
    assert tc.make_user_id("::", "ff") == "ff"
    long = tc.make_user_id("a" * 200, "f" * 12)
    assert len(long) == tc.MAX_USER_ID_CHARS and long.endswith(".ffffffffffff")
    tc.rest_username(1, long)
    with pytest.raises(tc.IceServerError):
        tc.make_user_id("ms-1", "XYZ")


# -- URLs and entries -----------------------------------------------------------------


@pytest.mark.parametrize(("url", "parsed"), [
    ("stun:stun.example.com", ("stun", "stun.example.com", 3478, None)),
    ("stuns:10.0.0.1:443", ("stuns", "10.0.0.1", 443, None)),
    ("turn:turn.example.com", ("turn", "turn.example.com", 3478, "udp")),
    ("turn:127.0.0.1:3478?transport=tcp", ("turn", "127.0.0.1", 3478, "tcp")),
    ("turns:turn.example.com:443?transport=tcp", ("turns", "turn.example.com", 443, "tcp")),
    ("turns:turn.example.com", ("turns", "turn.example.com", 5349, "tcp")),
])
def test_urls_a_browser_and_aiortc_take(url: str, parsed: tuple[Any, ...]) -> None:
    assert tc.parse_url(url) == tc.IceUrl(*parsed)
    ours = parse_stun_turn_uri(url)
    assert (ours["host"], ours["port"], ours.get("transport")) == parsed[1:]


@pytest.mark.parametrize("url", [
    "", "turn:", "http://x", "turn:[::1]:3478", "turn:a:0", "turn:a:65536", "turn:a:123456",
    "stun:a?transport=udp", "turns:a?transport=udp", "turn:a?transport=sctp", "turn:a b",
    "turn:a:3478?transport=tcp&x=1", "TURN:a", "turn:a\n", "turn:a:３４７８", "turn:" + "a" * 254,
    "turn:a:3478?transport=tcp" + "x" * 300,
])
def test_urls_refused(url: str) -> None:
    with pytest.raises(tc.IceServerError):
        tc.parse_url(url)


@pytest.mark.fuzz
@settings(max_examples=scaled(500, 20_000), deadline=None)
@given(st.one_of(
    st.text(max_size=80),
    st.from_regex(r"(stuns?|turns?):[A-Za-z0-9.\-\[\]:]{0,20}(:[0-9]{0,6})?"
                  r"(\?transport=[a-z]{0,4})?", fullmatch=True),
))
def test_any_url_is_refused_or_parsed_as_aiortc_parses_it(url: str) -> None:
    try:
        ours = tc.parse_url(url)
    except tc.IceServerError:
        return
    theirs = parse_stun_turn_uri(url)  # must not raise: the workers hand it to aiortc
    assert (theirs["scheme"], theirs["host"], theirs["port"], theirs.get("transport")) == (
        ours.scheme, ours.host, ours.port, ours.transport)


def _config(*servers: dict[str, Any]) -> cfg.Config:
    return cfg.from_dict({"media": {"ice_servers": list(servers)}})


def test_config_takes_a_shared_secret_turn_server(tmp_path: Path) -> None:
    entry = {"urls": ["turn:turn.example.com:443?transport=tcp",
                      "turns:turn.example.com:443?transport=tcp"],
             "secret_file": str(tmp_path / "turn.secret"), "ttl": 3600}
    config = _config({"urls": "stun:stun.example.com"}, entry)
    assert config.ice_servers()[1] == {**entry, "username": None, "credential": None}
    assert config.media.ice_servers[0].ttl == tc.DEFAULT_TTL_S
    # The list, file name included, stays out of the effective config on disk.
    public, secrets = config_secrets.split(config)
    assert "ice_servers" not in public["media"]
    assert config_secrets.merge(public, secrets) == config


@pytest.mark.parametrize(("entry", "why"), [
    ({"urls": "turn:t.example"}, "needs username and credential, or secret_file"),
    ({"urls": "turn:t.example", "username": "u"}, "needs username and credential"),
    ({"urls": "turn:t.example", "secret_file": "/s", "username": "u", "credential": "c"},
     "replaces username and credential"),
    ({"urls": "stun:s.example", "secret_file": "/s"}, "is for a TURN server"),
    ({"urls": "turn:t.example", "secret_file": "/s", "ttl": 59}, "ttl must be"),
    ({"urls": "turn:t.example", "secret_file": "/s", "ttl": 7 * 86400 + 1}, "ttl must be"),
    ({"urls": "turn:t.example", "secret_file": "/s\x00"}, "not a usable path"),
    ({"urls": []}, "urls must be"),
    ({"urls": ["stun:s.example"] * 9}, "urls must be"),
    ({"urls": ["stun:s.example", "turn:[::1]"]}, "not a stun:"),
    ({"urls": "turn:t.example", "username": "u", "credential": "pa\nss"}, "credential must be"),
    ({"urls": "turn:t.example", "username": "", "credential": "c"}, "username must be"),
])
def test_config_refuses_entries_a_page_or_aiortc_cannot_use(entry: dict[str, Any],
                                                              why: str) -> None:
    with pytest.raises(cfg.ConfigError, match=r"media\.ice_servers\[0\]") as err:
        _config(entry)
    assert why in str(err.value)
    assert "pa\nss" not in str(err.value)  # a credential is never repeated in an error


def test_config_refuses_more_than_eight_servers() -> None:
    with pytest.raises(cfg.ConfigError, match="at most 8"):
        _config(*[{"urls": "stun:s.example"}] * 9)
    assert len(_config(*[{"urls": "stun:s.example"}] * 8).media.ice_servers) == 8


# -- what one client gets -------------------------------------------------------------


def test_each_client_gets_its_own_credential_for_the_entrys_ttl(tmp_path: Path) -> None:
    secret_file = write_secret(tmp_path / "turn.secret", f"  {SECRET}\n")
    config = _config(
        {"urls": "stun:stun.example.com"},
        {"urls": "turn:fixed.example:3478", "username": "static", "credential": "word"},
        {"urls": ["turn:t.example:443?transport=tcp"], "secret_file": str(secret_file),
         "ttl": 600},
    )
    page = tc.PageIceServers.from_config(config.ice_servers())
    servers, problems = page.for_client(1000.0, "ms-1.aa")
    assert problems == []
    assert servers == [
        {"urls": ["stun:stun.example.com"]},
        {"urls": ["turn:fixed.example:3478"], "username": "static", "credential": "word"},
        {"urls": ["turn:t.example:443?transport=tcp"], "username": "1600:ms-1.aa",
         "credential": tc.rest_credential(SECRET.encode(), "1600:ms-1.aa")},
    ]
    other, _ = page.for_client(1000.0, "ms-1.bb")
    assert other[2]["username"] != servers[2]["username"]
    assert other[2]["credential"] != servers[2]["credential"]
    assert tc.parse_answer(tc.encode_answer(servers)) == servers


def test_no_servers_configured_is_an_empty_list_as_the_pages_always_had() -> None:
    servers, problems = tc.PageIceServers.from_config(cfg.Config().ice_servers()).for_client(
        time.time(), "u")
    assert (servers, problems) == ([], [])
    assert json.loads(tc.encode_answer(servers)) == {"iceServers": []}


def test_a_rotated_secret_is_used_after_the_recheck_without_a_restart(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "turn.secret", "old-secret\n")
    secret = tc.SecretFile(path, recheck_s=10.0)
    assert secret.get(100.0) == b"old-secret"
    new = write_secret(tmp_path / "new.secret", "new-secret\n")
    os.replace(new, path)  # how an operator rotates: write aside, rename over
    assert secret.get(105.0) == b"old-secret"  # not looked at again yet
    assert secret.get(110.0) == b"new-secret"


def test_an_unreadable_secret_leaves_that_server_out_and_says_why(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "turn.secret", SECRET, mode=0o644)
    page = tc.PageIceServers([
        tc.IceServerEntry(urls=("stun:s.example",)),
        tc.IceServerEntry(urls=("turn:t.example",), secret_file=str(path)),
    ])
    servers, problems = page.for_client(1000.0, "u")
    assert servers == [{"urls": ["stun:s.example"]}]
    assert len(problems) == 1 and "accessible by group/others" in problems[0]
    assert SECRET not in problems[0]
    os.chmod(path, 0o600)
    assert page.for_client(1005.0, "u")[0] == servers  # the failure is not re-read at once
    servers, problems = page.for_client(1011.0, "u")
    assert problems == [] and servers[1]["username"] == "87411:u"
    path.unlink()
    servers, problems = page.for_client(1022.0, "u")
    assert len(servers) == 1 and "cannot read the TURN secret file" in problems[0]


# -- the answer of GET /ice-servers -----------------------------------------------------


_REFUSED = [
    b"", b"[]", b"null", b'{"iceServers": {}}', b'{"ice": []}', b'{"iceServers": [1]}',
    b'{"iceServers": [{"urls": 5}]}', b'{"iceServers": [{"urls": null}]}',
    b'{"iceServers": [{"urls": "turn:t"}]}', b'{"iceServers": [{"urls": "stun:s", '
    b'"username": 1}]}', b'{"iceServers": [' + b",".join([b'{"urls": "stun:s"}'] * 9) + b"]}",
    b'{"iceServers": [{"urls": ["stun:s", "ftp:x"]}]}',
    b'{"iceServers": [{"urls": ["turn:t"], "username": "u", "credential": "c"}], "x": "'
    + b"y" * tc.MAX_ANSWER_BYTES + b'"}',
    b"\xff\xfe", b'{"iceServers": [' * 10_000,
]


@pytest.mark.parametrize("body", _REFUSED)
def test_answers_refused(body: bytes) -> None:
    with pytest.raises(tc.IceServerError):
        tc.parse_answer(body)


@pytest.mark.fuzz
@settings(max_examples=scaled(300, 30_000), deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_an_answer_or_an_ice_server_error(data: bytes) -> None:
    try:
        servers = tc.parse_answer(data)
    except tc.IceServerError:
        return
    assert tc.parse_answer(tc.encode_answer(servers)) == servers


_URL_LIKE = st.one_of(
    st.sampled_from(["stun:s.example", "turn:t.example:443?transport=tcp", "turns:t:5349",
                     "turn:[::1]", "turn:a:0", "stun:a?transport=udp", "turns:a?transport=udp",
                     "turn:a:99999", "ftp:x", ""]),
    st.from_regex(r"(stuns?|turns?):[A-Za-z0-9.\-]{0,6}(:[0-9]{0,6})?(\?transport=(udp|tcp|x))?",
                  fullmatch=True),
    st.integers(), st.none(),
)
_FIELD_LIKE = st.one_of(st.none(), st.text(max_size=4), st.text(
    st.characters(min_codepoint=32, max_codepoint=126), min_size=250, max_size=260),
    st.integers(), st.booleans())
_SERVER_LIKE = st.one_of(
    st.fixed_dictionaries({"urls": st.one_of(_URL_LIKE, st.lists(_URL_LIKE, max_size=9))},
                          optional={"username": _FIELD_LIKE, "credential": _FIELD_LIKE,
                                    "extra": st.integers()}),
    st.integers(), st.lists(st.integers(), max_size=2), st.none(),
)
_ANSWER_LIKE = st.one_of(
    st.fixed_dictionaries({"iceServers": st.lists(_SERVER_LIKE, max_size=9)},
                          optional={"ttl": st.integers()}),
    st.fixed_dictionaries({"iceServers": st.one_of(st.none(), st.integers(), st.text())}),
    st.lists(st.integers(), max_size=2), st.none(), st.integers(),
)


@pytest.mark.fuzz
@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
@settings(max_examples=scaled(3, 100), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_ANSWER_LIKE, min_size=100, max_size=200))
def test_the_pages_check_an_answer_as_the_sdk_does(tmp_path_factory: Any,
                                                   answers: list[Any]) -> None:
    """protocol-client.js's parseIceServersAnswer and parse_answer agree on every answer:
    the same ones refused, the same servers out of the others (one node run per batch)."""
    check_pages_agree([json.dumps(a) for a in answers], tmp_path_factory.mktemp("answers"))


ACCEPTED = [
    '{"iceServers": []}',
    '{"iceServers": [{"urls": "stun:s.example"}, {"urls": ["turn:t:443?transport=tcp",'
    ' "turns:t"], "username": "1:u", "credential": "c+/="}], "ttl": 5}',
    '{"iceServers": [{"urls": ["stun:a"], "username": null, "credential": null, "x": 1}]}',
]


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_the_pages_and_the_sdk_agree_on_known_answers(tmp_path: Path) -> None:
    refused = [b.decode() for b in _REFUSED if b.startswith(b"{")]
    accepted = check_pages_agree(ACCEPTED + refused, tmp_path)
    assert accepted == len(ACCEPTED)


def check_pages_agree(bodies: list[str], workdir: Path) -> int:
    """Run protocol-client.js's parseIceServersAnswer (node) and parse_answer on each body:
    the same refused, the same servers from the others. Returns how many were accepted."""
    inputs = workdir / "bodies.json"
    inputs.write_text(json.dumps(bodies))
    script = (
        f"const m = await import({json.dumps(CLIENT_JS.as_uri())});"
        "const fs = await import('node:fs');"
        f"const bodies = JSON.parse(fs.readFileSync({json.dumps(str(inputs))}, 'utf8'));"
        "const out = bodies.map((b) => { try { return m.parseIceServersAnswer(b); }"
        " catch (e) { return null; } });"
        "process.stdout.write(JSON.stringify(out));"
    )
    done = subprocess.run(["node", "--experimental-default-type=module", "--input-type=module",
                           "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    accepted = 0
    for body, theirs in zip(bodies, json.loads(done.stdout), strict=True):
        try:
            ours: list[dict[str, Any]] | None = tc.parse_answer(body)
        except tc.IceServerError:
            ours = None
        assert ours == theirs, body
        accepted += ours is not None
    return accepted


def test_the_pages_ask_the_appliance_they_call(tmp_path: Path) -> None:
    from appliance_sdk.connection import ice_servers_url

    script = (f"const m = await import({json.dumps(CLIENT_JS.as_uri())});"
              "process.stdout.write(JSON.stringify(["
              "m.iceServersUrl('wss://10.1.2.3:4433/'), m.iceServersUrl('ws://h:80/x?y#z')]));")
    if shutil.which("node") is not None:
        done = subprocess.run(["node", "--experimental-default-type=module",
                               "--input-type=module", "-e", script],
                              capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(done.stdout) == ["https://10.1.2.3:4433/ice-servers",
                                           "http://h/ice-servers"]
    assert ice_servers_url("wss://10.1.2.3:4433/") == "https://10.1.2.3:4433/ice-servers"
    assert ice_servers_url("ws://h:8080/x?y#z") == "http://h:8080/ice-servers"


# -- the front's endpoint, sans sockets ----------------------------------------------------


def test_the_endpoint_answers_a_burst_per_address_then_429_and_forgets_old_addresses(
) -> None:
    from supervisor import front

    endpoint = front._IceServersEndpoint(tc.PageIceServers([]), "ms-1")
    burst = front.ICE_BURST_PER_ADDRESS
    assert all(endpoint.admit("192.0.2.1", 0.0) for _ in range(burst))
    assert not endpoint.admit("192.0.2.1", 0.0)
    assert endpoint.admit("192.0.2.2", 0.0)  # another address keeps its share
    assert endpoint.admit("192.0.2.1", 1.0 / front.ICE_RATE_PER_ADDRESS)  # refilled
    for i in range(front.ICE_ADDRESSES_TRACKED + 10):
        endpoint.admit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 100.0 + i)
    assert len(endpoint._per_address) == front.ICE_ADDRESSES_TRACKED
    assert json.loads(endpoint.answer()) == {"iceServers": []}


def test_the_endpoint_caps_the_whole_port() -> None:
    from supervisor import front

    endpoint = front._IceServersEndpoint(tc.PageIceServers([]), "ms-1")
    admitted = sum(endpoint.admit(f"198.51.{i >> 8}.{i & 255}", 0.0)
                   for i in range(front.ICE_BURST_TOTAL + 50))
    assert admitted == front.ICE_BURST_TOTAL
