"""Recording files encrypted "with the roomkey": streaming AES-256-GCM in authenticated chunks.

Layout, key derivation and the reasons for each choice: docs/recording-format.md.
In short: key = HKDF-SHA256(master, salt, "appliance-recording-v1" || roomkey), the file is a
50-byte header then chunks of ciphertext+tag; every chunk authenticates the header, its index
and whether it is the last one, so editing, reordering, dropping or cutting chunks is detected.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.core.private_files import create_private, fsync_dir
from appliance.recording import keys

MAGIC = b"\x89REC\r\n\x1a\n"  # PNG-style: binary, and line-ending mangling breaks it visibly
VERSION = 1
HKDF_INFO = b"appliance-recording-v1"
KEY_ID_LABEL = b"appliance-recording-key-id-v1"
DEFAULT_CHUNK = 1 << 20  # 1 MiB of plaintext per chunk
MAX_CHUNK = 64 << 20  # refuse headers that would make us allocate more than this
TAG_LEN = 16
# magic, version, reserved (0), roomkey, key id, salt, nonce prefix, chunk size; big-endian.
_HEADER = struct.Struct(">8sBB8s8s16s4sI")
HEADER_LEN = _HEADER.size  # 50


class RecordingDecryptError(Exception):
    """Not a recording, wrong roomkey or master secret, or the file was modified or truncated."""


@dataclass(frozen=True)
class RecordingHeader:
    version: int
    roomkey: int
    key_id: bytes  # which master secret encrypted the file (never the secret itself)
    salt: bytes
    nonce_prefix: bytes
    chunk_size: int
    raw: bytes  # the exact header bytes, authenticated with every chunk


def key_id(master: bytes) -> bytes:
    """8 bytes naming a master secret, so "wrong secret" can be told apart from "tampered"."""
    return hmac.new(master, KEY_ID_LABEL, hashlib.sha256).digest()[:8]


def derive_key(master: bytes, roomkey: int, salt: bytes) -> bytes:
    _check_master(master)
    info = HKDF_INFO + _roomkey_bytes(roomkey)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)


def encrypt_file(src: Path, dst: Path, master: bytes, roomkey: int,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
    """Encrypt `src` to `dst` (streaming; dst appears complete or not at all)."""
    encrypt_file_digest(src, dst, master, roomkey, chunk_size)


def encrypt_file_digest(src: Path, dst: Path, master: bytes, roomkey: int,
                        chunk_size: int = DEFAULT_CHUNK) -> str:
    """encrypt_file, returning the SHA-256 (hex) of the plaintext it read."""
    if not 0 < chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}")
    _check_master(master)
    salt, prefix = secrets.token_bytes(16), secrets.token_bytes(4)
    header = _HEADER.pack(MAGIC, VERSION, 0, _roomkey_bytes(roomkey), key_id(master), salt,
                          prefix, chunk_size)
    aead = AESGCM(derive_key(master, roomkey, salt))
    digest = hashlib.sha256()
    with open(src, "rb") as fin, _AtomicOutput(dst) as out:
        out.write(header)
        index, current = 0, _read_full(fin, chunk_size)
        while True:
            # Read one chunk ahead: only then do we know whether this chunk is the last.
            following = _read_full(fin, chunk_size)
            final = not following
            digest.update(current)
            out.write(aead.encrypt(_nonce(prefix, index), current, _aad(header, index, final)))
            if final:
                break
            index, current = index + 1, following
    return digest.hexdigest()


def decrypt_file(src: Path, dst: Path, master: bytes, roomkey: int) -> None:
    """Decrypt `src` to `dst`; on any error raise RecordingDecryptError and leave no dst."""
    with _AtomicOutput(dst) as out:
        for plaintext in iter_decrypt(src, master, roomkey):
            out.write(plaintext)


def decrypted_sha256(src: Path, master: bytes, roomkey: int) -> str:
    """SHA-256 (hex) of the plaintext, verifying every chunk, writing nothing to disk."""
    digest = hashlib.sha256()
    for plaintext in iter_decrypt(src, master, roomkey):
        digest.update(plaintext)
    return digest.hexdigest()


def iter_decrypt(src: Path, master: bytes, roomkey: int) -> Iterator[bytes]:
    """Authenticated plaintext chunks. Every chunk yielded is genuine, but the file as a whole
    is only proven complete when the iteration ends without RecordingDecryptError."""
    _check_master(master)
    try:
        fin = open(src, "rb")  # noqa: SIM115 - closed below; the generator may stop early
    except OSError as exc:
        raise RecordingDecryptError(f"cannot read {src}: {exc.strerror}") from None
    with fin:
        header = _parse_header(fin.read(HEADER_LEN), src)
        if header.roomkey != roomkey:
            raise RecordingDecryptError(
                f"{src} was recorded under roomkey {header.roomkey}, not {roomkey}")
        if not hmac.compare_digest(header.key_id, key_id(master)):
            raise RecordingDecryptError(
                f"{src} was encrypted with another master secret (key id "
                f"{header.key_id.hex()}, this one is {key_id(master).hex()})")
        aead = AESGCM(derive_key(master, roomkey, header.salt))
        record = header.chunk_size + TAG_LEN
        index, current = 0, _read_full(fin, record)
        while True:
            if len(current) < TAG_LEN:
                raise RecordingDecryptError(f"{src} is truncated (chunk {index} is missing)")
            following = _read_full(fin, record)
            final = not following
            try:
                plaintext = aead.decrypt(_nonce(header.nonce_prefix, index), current,
                                         _aad(header.raw, index, final))
            except InvalidTag:
                raise RecordingDecryptError(
                    f"{src}: chunk {index} failed authentication: the file was modified, "
                    "reordered or truncated") from None
            yield plaintext
            if final:
                return
            index, current = index + 1, following


def read_header(path: Path) -> RecordingHeader:
    try:
        with open(path, "rb") as f:
            return _parse_header(f.read(HEADER_LEN), path)
    except OSError as exc:
        raise RecordingDecryptError(f"cannot read {path}: {exc.strerror}") from None


def _parse_header(raw: bytes, src: Path) -> RecordingHeader:
    if len(raw) < HEADER_LEN or not raw.startswith(MAGIC):
        raise RecordingDecryptError(f"{src} is not an encrypted recording")
    _, version, reserved, roomkey, kid, salt, prefix, chunk_size = _HEADER.unpack(raw)
    if version != VERSION or reserved != 0:
        raise RecordingDecryptError(f"{src}: unsupported recording format version {version}")
    if not 0 < chunk_size <= MAX_CHUNK:
        raise RecordingDecryptError(f"{src}: invalid chunk size {chunk_size} in the header")
    return RecordingHeader(version, int.from_bytes(roomkey, "big"), kid, salt, prefix,
                           chunk_size, raw)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + index.to_bytes(8, "big")


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


def _roomkey_bytes(roomkey: int) -> bytes:
    if not 0 <= roomkey < 1 << 64:
        raise ValueError("roomkey must be an unsigned 64-bit integer")
    return roomkey.to_bytes(8, "big")


def _check_master(master: bytes) -> None:
    if len(master) != keys.MASTER_LEN:
        raise ValueError(f"the master secret must be {keys.MASTER_LEN} bytes")


def _read_full(f: BinaryIO, size: int) -> bytes:
    """Exactly `size` bytes unless the file ends first (read() may return less on pipes)."""
    parts, wanted = [], size
    while wanted:
        part = f.read(wanted)
        if not part:
            break
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)


class _AtomicOutput:
    """A private (0600) temp file next to dst, fsynced and renamed over dst only on success."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        dot = "" if dst.name.startswith(".") else "."  # hidden either way, one dot
        self.tmp = dst.with_name(f"{dot}{dst.name}.{secrets.token_hex(6)}.tmp")

    def __enter__(self) -> BinaryIO:
        self.file = os.fdopen(create_private(self.tmp), "wb")
        return self.file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.dst)
                fsync_dir(self.dst.parent)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


# ---- `appliance decrypt` --------------------------------------------------------------------

def main_decrypt(argv: list[str] | None = None) -> int:
    """appliance decrypt --roomkey N [--key-file PATH] [-o OUT] FILE"""
    parser = argparse.ArgumentParser(
        prog="appliance decrypt",
        description="Restore the playable recording (.mkv) from an encrypted .enc file.")
    parser.add_argument("file", type=Path, metavar="FILE", help="the encrypted recording")
    parser.add_argument("--roomkey", type=int, required=True, help="the call's roomkey")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="the deployment's master secret file (default: the one the "
                             "config names, <data_dir>/recording-master.key)")
    parser.add_argument("--config", default=None, help="appliance config, for the key file")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="where to write the recording (default: FILE without .enc)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    try:
        out = args.output or _default_output(args.file)
        if out.exists() and not args.force:
            raise RecordingDecryptError(f"{out} already exists (use --force to overwrite)")
        master = keys.load_master(args.key_file or keys.default_key_path(args.config))
        decrypt_file(args.file, out, master, args.roomkey)
    except (RecordingDecryptError, keys.MasterKeyError, ValueError, OSError) as exc:
        print(f"appliance decrypt: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _default_output(src: Path) -> Path:
    if src.suffix != ".enc":
        raise RecordingDecryptError(f"{src} does not end in .enc: give the output with -o")
    return src.with_suffix("")

