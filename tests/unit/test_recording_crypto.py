"""Recording encryption: round trips, every kind of tampering, the master key file, the CLI."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from appliance.recording import crypto, keys
from appliance.recording.crypto import (
    HEADER_LEN,
    TAG_LEN,
    RecordingDecryptError,
    decrypt_file,
    encrypt_file,
    main_decrypt,
    read_header,
)

MASTER = bytes(range(32))
ROOMKEY = 123456789012
CHUNK = 1000  # small chunks so a few KB exercise the multi-chunk paths


def _encrypted(tmp_path: Path, data: bytes, chunk: int = CHUNK) -> Path:
    src, enc = tmp_path / "call.mkv", tmp_path / "call.mkv.enc"
    src.write_bytes(data)
    encrypt_file(src, enc, MASTER, ROOMKEY, chunk_size=chunk)
    return enc


def _records(enc: Path, chunk: int = CHUNK) -> tuple[bytes, list[bytes]]:
    raw = enc.read_bytes()
    body, size = raw[HEADER_LEN:], chunk + TAG_LEN
    return raw[:HEADER_LEN], [body[i : i + size] for i in range(0, len(body), size)]


def _fails(enc: Path, tmp_path: Path, roomkey: int = ROOMKEY, master: bytes = MASTER) -> str:
    out = tmp_path / "restored.mkv"
    with pytest.raises(RecordingDecryptError) as info:
        decrypt_file(enc, out, master, roomkey)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left"
    return str(info.value)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 7 * CHUNK + 13])
def test_round_trip(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    enc = _encrypted(tmp_path, data)
    chunks = max(1, -(-size // CHUNK))
    assert enc.stat().st_size == HEADER_LEN + size + chunks * TAG_LEN
    out = tmp_path / "restored.mkv"
    decrypt_file(enc, out, MASTER, ROOMKEY)
    assert out.read_bytes() == data
    assert crypto.decrypted_sha256(enc, MASTER, ROOMKEY) == hashlib.sha256(data).hexdigest()


def test_round_trip_default_chunk_size(tmp_path: Path) -> None:
    data = os.urandom(crypto.DEFAULT_CHUNK * 2 + 12345)
    enc = _encrypted(tmp_path, data, chunk=crypto.DEFAULT_CHUNK)
    out = tmp_path / "restored.mkv"
    decrypt_file(enc, out, MASTER, ROOMKEY)
    assert out.read_bytes() == data


def test_header_fields(tmp_path: Path) -> None:
    enc = _encrypted(tmp_path, b"x" * 10)
    header = read_header(enc)
    assert (header.version, header.roomkey, header.chunk_size) == (1, ROOMKEY, CHUNK)
    assert header.key_id == crypto.key_id(MASTER)
    assert len(header.salt) == 16 and len(header.nonce_prefix) == 4
    # A fresh salt per file: the same call encrypted twice gives unrelated files.
    again = tmp_path / "again.enc"
    encrypt_file(tmp_path / "call.mkv", again, MASTER, ROOMKEY, chunk_size=CHUNK)
    assert read_header(again).salt != header.salt
    assert enc.stat().st_mode & 0o077 == 0


def test_same_plaintext_different_rooms_differ(tmp_path: Path) -> None:
    assert crypto.derive_key(MASTER, 1, b"s" * 16) != crypto.derive_key(MASTER, 2, b"s" * 16)


def test_wrong_roomkey_and_wrong_master_fail_cleanly(tmp_path: Path) -> None:
    enc = _encrypted(tmp_path, os.urandom(3 * CHUNK))
    assert "roomkey" in _fails(enc, tmp_path, roomkey=ROOMKEY + 1)
    assert "master secret" in _fails(enc, tmp_path, master=bytes(32))


def test_wrong_roomkey_written_into_header_fails(tmp_path: Path) -> None:
    # Editing the header's roomkey to match a guessed one must not help: the key and AAD change.
    enc = _encrypted(tmp_path, os.urandom(2 * CHUNK))
    raw = bytearray(enc.read_bytes())
    raw[10:18] = (ROOMKEY + 1).to_bytes(8, "big")
    enc.write_bytes(raw)
    _fails(enc, tmp_path, roomkey=ROOMKEY + 1)


@pytest.mark.parametrize("where", ["magic", "version", "roomkey", "key_id", "salt", "nonce",
                                   "chunk_size", "first_ct", "middle_ct", "last_ct",
                                   "first_tag", "last_tag"])
def test_a_flipped_byte_anywhere_fails(tmp_path: Path, where: str) -> None:
    enc = _encrypted(tmp_path, os.urandom(3 * CHUNK + 100))
    size = enc.stat().st_size
    rec = CHUNK + TAG_LEN
    offset = {
        "magic": 0, "version": 8, "roomkey": 12, "key_id": 20, "salt": 30, "nonce": 43,
        "chunk_size": 48,
        "first_ct": HEADER_LEN + 5, "middle_ct": HEADER_LEN + rec + 500,
        "last_ct": size - TAG_LEN - 1, "first_tag": HEADER_LEN + CHUNK + 3,
        "last_tag": size - 1,
    }[where]
    raw = bytearray(enc.read_bytes())
    raw[offset] ^= 0x01
    enc.write_bytes(raw)
    _fails(enc, tmp_path)


def test_every_single_byte_flip_is_detected(tmp_path: Path) -> None:
    enc = _encrypted(tmp_path, os.urandom(2 * CHUNK + 7), chunk=CHUNK)
    original = enc.read_bytes()
    for offset in range(0, len(original), 37):
        raw = bytearray(original)
        raw[offset] ^= 0x80
        enc.write_bytes(raw)
        with pytest.raises(RecordingDecryptError):
            crypto.decrypted_sha256(enc, MASTER, ROOMKEY)


def test_truncation_fails(tmp_path: Path) -> None:
    enc = _encrypted(tmp_path, os.urandom(4 * CHUNK + 50))
    header, records = _records(enc)
    for cut in (records[:-1], records[:-2], records[:1], []):  # whole chunks dropped at the end
        enc.write_bytes(header + b"".join(cut))
        assert "truncated" in _fails(enc, tmp_path)
    enc.write_bytes(header + b"".join(records)[:-5])  # cut inside the last chunk
    _fails(enc, tmp_path)
    enc.write_bytes(header[:20])  # cut inside the header
    assert "not an encrypted recording" in _fails(enc, tmp_path)


def test_truncation_at_a_chunk_boundary_of_an_exact_multiple(tmp_path: Path) -> None:
    enc = _encrypted(tmp_path, os.urandom(4 * CHUNK))  # every chunk full: the final flag counts
    header, records = _records(enc)
    assert len(records) == 4
    enc.write_bytes(header + b"".join(records[:3]))
    _fails(enc, tmp_path)


def test_reordered_duplicated_and_appended_chunks_fail(tmp_path: Path) -> None:
    enc = _encrypted(tmp_path, os.urandom(4 * CHUNK + 50))
    header, r = _records(enc)
    for body in ([r[1], r[0], *r[2:]], [r[0], r[2], r[1], *r[3:]], [r[0], r[0], *r[1:]],
                 [*r, r[-1]], [*r[:-1], r[0]]):
        enc.write_bytes(header + b"".join(body))
        _fails(enc, tmp_path)


def test_chunks_cannot_be_spliced_between_files(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    a = _encrypted(tmp_path, data)
    b = tmp_path / "b.enc"
    encrypt_file(tmp_path / "call.mkv", b, MASTER, ROOMKEY, chunk_size=CHUNK)
    header_a, _ = _records(a)
    _, records_b = _records(b)
    a.write_bytes(header_a + b"".join(records_b))
    _fails(a, tmp_path)


def test_not_a_recording(tmp_path: Path) -> None:
    junk = tmp_path / "junk.enc"
    junk.write_bytes(b"RIFF" + os.urandom(500))
    assert "not an encrypted recording" in _fails(junk, tmp_path)
    assert "cannot read" in _fails(tmp_path / "missing.enc", tmp_path)


def test_decrypt_never_leaves_partial_output(tmp_path: Path) -> None:
    # Damage only the last of many chunks: the first ones decrypt fine before the failure.
    enc = _encrypted(tmp_path, os.urandom(10 * CHUNK))
    raw = bytearray(enc.read_bytes())
    raw[-1] ^= 0xFF
    enc.write_bytes(raw)
    out = tmp_path / "restored.mkv"
    out.write_bytes(b"previous content")  # and an existing output is left alone
    with pytest.raises(RecordingDecryptError):
        decrypt_file(enc, out, MASTER, ROOMKEY)
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["call.mkv", "call.mkv.enc",
                                                          "restored.mkv"]


# ---- the master secret ------------------------------------------------------------------

def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "recording-master.key"
    old = os.umask(0)  # even with a permissive umask
    try:
        master = keys.load_or_create_master(path)
    finally:
        os.umask(old)
    assert len(master) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert keys.load_or_create_master(path) == master
    assert keys.load_master(path) == master
    assert [p.name for p in path.parent.iterdir()] == ["recording-master.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(keys.MasterKeyError, match="chmod 600"):
        keys.load_or_create_master(path)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_of_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(os.urandom(size))
    path.chmod(0o600)
    with pytest.raises(keys.MasterKeyError, match="32 bytes"):
        keys.load_master(path)


def test_key_file_symlink_and_missing_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    real.write_bytes(os.urandom(32))
    real.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(keys.MasterKeyError):
        keys.load_master(link)
    with pytest.raises(keys.MasterKeyError, match="no recording key file"):
        keys.load_master(tmp_path / "absent.key")


def test_master_from_hex() -> None:
    assert keys.master_from_hex(MASTER.hex()) == MASTER
    assert keys.master_from_hex(f"  {MASTER.hex().upper()}\n") == MASTER
    for bad in ("", "zz" * 32, MASTER.hex()[:-2], MASTER.hex() + "00"):
        with pytest.raises(keys.MasterKeyError):
            keys.master_from_hex(bad)


# ---- `appliance decrypt` -----------------------------------------------------------------

def test_cli_decrypt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "master.key"
    master = keys.load_or_create_master(key_file)
    data = os.urandom(3000)
    (tmp_path / "call.mkv").write_bytes(data)
    enc = tmp_path / "out" / "call.mkv.enc"
    enc.parent.mkdir()
    encrypt_file(tmp_path / "call.mkv", enc, master, ROOMKEY)

    assert main_decrypt(["--roomkey", str(ROOMKEY), "--key-file", str(key_file), str(enc)]) == 0
    restored = tmp_path / "out" / "call.mkv"
    assert restored.read_bytes() == data
    assert stat.S_IMODE(restored.stat().st_mode) == 0o600  # plaintext stays private
    assert capsys.readouterr().out.strip() == str(restored)

    # the output exists: refused without --force
    assert main_decrypt(["--roomkey", str(ROOMKEY), "--key-file", str(key_file), str(enc)]) == 1
    assert "already exists" in capsys.readouterr().err
    other = tmp_path / "other.mkv"
    assert main_decrypt(["--roomkey", str(ROOMKEY), "--key-file", str(key_file),
                         "-o", str(other), str(enc)]) == 0
    assert other.read_bytes() == data

    # wrong roomkey: exit 1, one readable line, no output file
    wrong = tmp_path / "wrong.mkv"
    assert main_decrypt(["--roomkey", "1", "--key-file", str(key_file), "-o", str(wrong),
                         str(enc)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("appliance decrypt: error:") and "roomkey" in err
    assert not wrong.exists()

    # without --key-file: the key file the appliance's config names
    config = tmp_path / "appliance.toml"
    config.write_text(f'[recording]\nmaster_key_file = "{key_file}"\n')
    by_config = tmp_path / "by-config.mkv"
    assert main_decrypt(["--roomkey", str(ROOMKEY), "--config", str(config),
                         "-o", str(by_config), str(enc)]) == 0
    assert by_config.read_bytes() == data

    # a key file others can read: refused
    key_file.chmod(0o644)
    assert main_decrypt(["--roomkey", str(ROOMKEY), "--key-file", str(key_file),
                         "-o", str(wrong), str(enc)]) == 1
    assert "chmod 600" in capsys.readouterr().err


# ---- the documented format ---------------------------------------------------------------

def test_the_reference_decryptor_in_the_docs_works(tmp_path: Path) -> None:
    """docs/recording-format.md's ~20-line decryptor (only `cryptography`) reads our files."""
    doc = (Path(__file__).parents[2] / "docs" / "recording-format.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "recording-format.md", "exec"), namespace)
    reference = namespace["decrypt"]
    for size in (0, 5, CHUNK, 3 * CHUNK + 1):
        data = os.urandom(size)
        enc = _encrypted(tmp_path, data)
        reference(str(enc), str(tmp_path / "ref.mkv"), MASTER, ROOMKEY)  # type: ignore[operator]
        assert (tmp_path / "ref.mkv").read_bytes() == data
    header, records = _records(enc)
    enc.write_bytes(header + b"".join(records[:-1]))  # and it detects truncation as well
    with pytest.raises(InvalidTag):
        reference(str(enc), str(tmp_path / "ref2.mkv"), MASTER, ROOMKEY)  # type: ignore[operator]
    assert not (tmp_path / "ref2.mkv").exists()
