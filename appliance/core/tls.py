"""TLS for the signalling port: the operator's certificate, or a self-signed one on first start.

The self-signed certificate is a server leaf (CA:FALSE, serverAuth only), valid for
`SELF_SIGNED_DAYS` and made again when fewer than `RENEW_BEFORE_DAYS` are left: a CA
certificate valid for ten years would let anyone who copies the key sign certificates for
any name, for a decade. The server offers TLS 1.3, and TLS 1.2 with forward-secret AEAD
suites only (ECDHE with AES-GCM or ChaCha20-Poly1305: no CBC, no RSA key exchange).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("appliance.tls")

SELF_SIGNED_DAYS = 365  # within the 398 days browsers accept for a server certificate
RENEW_BEFORE_DAYS = 30
# OpenSSL cipher string for TLS <= 1.2 (TLS 1.3 suites are all AEAD and set apart).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!SHA1:!SHA256:!SHA384"


def ensure_certificate(data_dir: Path, cert: str, key: str,
                       names: Iterable[str] = ()) -> tuple[Path, Path]:
    """The configured pair, or a self-signed pair under data_dir/tls (made once, kept until
    it nears expiry). `names`: host names or addresses the certificate must also cover."""
    if cert and key:
        return Path(cert), Path(key)
    tls_dir = data_dir / "tls"
    cert_path, key_path = tls_dir / "selfsigned.crt", tls_dir / "selfsigned.key"
    now = datetime.datetime.now(datetime.UTC)
    if cert_path.exists() and key_path.exists():
        why = _needs_renewal(cert_path, now)
        if why is None:
            os.chmod(key_path, 0o600)
            return cert_path, key_path
        log.info("making a new self-signed certificate: the old one %s", why)
    tls_dir.mkdir(parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname()
    certificate = self_signed_leaf(private_key, [hostname, "localhost", "127.0.0.1", "::1",
                                                 *names], now)
    key_pem = private_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    _write(key_path, key_pem, 0o600)  # never world-readable, not even briefly
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("generated a self-signed certificate for %s in %s (valid until %s)", hostname,
             tls_dir, certificate.not_valid_after_utc.date())
    return cert_path, key_path


def self_signed_leaf(private_key: ec.EllipticCurvePrivateKey, names: Iterable[str],
                     now: datetime.datetime) -> x509.Certificate:
    """A self-signed server certificate that can sign nothing else."""
    unique = list(dict.fromkeys(n for n in names if n and n not in ("0.0.0.0", "::")))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, unique[0])])
    public_key = private_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in unique]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # An ECDSA key signs the handshake; it never enciphers a key (that is RSA's way).
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(private_key, hashes.SHA256())
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _needs_renewal(cert_path: Path, now: datetime.datetime) -> str | None:
    """Why the self-signed certificate must be made again, or None if it may stay."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"cannot be read ({exc})"
    left = certificate.not_valid_after_utc - now
    if left < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return f"expires on {certificate.not_valid_after_utc.date()}"
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        return "is a CA certificate (made by an older version)"
    return None


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with `mode`, then rename: a reader sees the
    old file or the new one, and a key file never exists with a wider mode."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(cert, key)
    return context
