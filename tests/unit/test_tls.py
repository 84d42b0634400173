"""TLS of the signalling port (issue 10, finding 16): AEAD-only TLS 1.2, a leaf certificate.

Handshakes run between two in-memory SSL objects (MemoryBIO): no packet leaves the process.
"""

from __future__ import annotations

import datetime
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.core import tls


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return tls.ensure_certificate(tmp_path, "", "", names=["ms.example.test", "10.1.2.3"])


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Run a handshake in memory; return the client's SSLObject (raises ssl.SSLError)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", c), ("s", s)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return c
    raise AssertionError("handshake did not finish")


def client_context(cafile: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def test_tls12_offers_only_ecdhe_aead_suites(pair: tuple[Path, Path]) -> None:
    ctx = tls.server_context(*pair)
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "TLS 1.2 must stay available for older phones"
    for cipher in tls12:
        assert cipher["aead"], cipher["name"]
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert "CBC" not in cipher["description"] and "SHA1" not in cipher["name"]
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_cbc_only_client_is_refused_an_aead_one_accepted(pair: tuple[Path, Path]) -> None:
    server = tls.server_context(*pair)
    cbc = client_context(pair[0], ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256")
    with pytest.raises(ssl.SSLError):
        handshake(server, cbc)
    good = handshake(server, client_context(pair[0], ssl.TLSVersion.TLSv1_2))
    assert good.version() == "TLSv1.2" and "GCM" in good.cipher()[0]
    assert handshake(server, client_context(pair[0], ssl.TLSVersion.TLSv1_3)).version() \
        == "TLSv1.3"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls11_is_refused(pair: tuple[Path, Path]) -> None:
    # The server's own floor, whatever this OpenSSL's client can still offer.
    assert tls.server_context(*pair).minimum_version >= ssl.TLSVersion.TLSv1_2
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    try:
        client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_1
        client.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1: the floor was checked above")
    with pytest.raises(ssl.SSLError):
        handshake(tls.server_context(*pair), client)


def test_self_signed_certificate_is_a_short_lived_leaf(pair: tuple[Path, Path]) -> None:
    cert = x509.load_pem_x509_certificate(pair[0].read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "ms.example.test"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1",
                                                                        "10.1.2.3"}
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 90 <= days <= 397
    assert stat.S_IMODE(os.stat(pair[1]).st_mode) == 0o600


def test_certificate_is_kept_then_renewed_near_expiry(tmp_path: Path) -> None:
    cert_path, key_path = tls.ensure_certificate(tmp_path, "", "")
    first = cert_path.read_bytes()
    assert tls.ensure_certificate(tmp_path, "", "") == (cert_path, key_path)
    assert cert_path.read_bytes() == first  # kept while valid
    # One that expires within RENEW_BEFORE_DAYS is made again.
    key = ec.generate_private_key(ec.SECP256R1())
    soon = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
        days=tls.SELF_SIGNED_DAYS - tls.RENEW_BEFORE_DAYS + 1)
    old = tls.self_signed_leaf(key, ["localhost"], soon)
    from cryptography.hazmat.primitives import serialization

    cert_path.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    tls.ensure_certificate(tmp_path, "", "")
    renewed = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert renewed.serial_number != old.serial_number
    assert renewed.not_valid_after_utc > old.not_valid_after_utc
    # And the pair still matches: the new key was written with the new certificate.
    tls.server_context(cert_path, key_path)


def test_an_old_ca_certificate_is_replaced(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    (tls_dir / "selfsigned.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tls_dir / "selfsigned.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path, _ = tls.ensure_certificate(tmp_path, "", "")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_operator_pair_is_used_as_given(tmp_path: Path) -> None:
    assert tls.ensure_certificate(tmp_path, "/etc/x.crt", "/etc/x.key") == (
        Path("/etc/x.crt"), Path("/etc/x.key"))
    assert not (tmp_path / "tls").exists()
