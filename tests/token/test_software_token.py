"""The software token: PIN lockout, integrity of the file, key separation.

Each wrong PIN costs one scrypt (~0.1 s), so lockout tests are kept to the
minimum number of tries that proves the rule.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from pathlib import Path

import cbor2
import pytest

from mesh.token import (
    MAX_PIN_TRIES,
    Slot,
    TokenCorrupt,
    TokenError,
    TokenLocked,
    TokenNotReady,
    WrongPin,
    software,
)
from mesh.token.keychange import KeyChange, build_key_change
from mesh.token.software import MAX_TOKEN_FILE_SIZE, SoftwareToken
from tests.token.tokens import PIN, KnownToken, make_token

WRONG = "9999"
MAGIC = b"SNRTOKEN\x01"  # docs/keysets.md: MAGIC || CBOR(header) || SHA-256(both)


def _fields(raw: bytes) -> dict[str, object]:
    assert raw.startswith(MAGIC)
    fields: dict[str, object] = cbor2.loads(raw[len(MAGIC) : -32])
    return fields


def _encode(fields: dict[str, object]) -> bytes:
    body = MAGIC + cbor2.dumps(fields)
    return body + hashlib.sha256(body).digest()


# -- identity, key separation --------------------------------------------------------------------


def test_info_needs_no_pin_and_key_operations_do(known_token: KnownToken) -> None:
    token = SoftwareToken(known_token.path)
    info = token.info()
    assert (info.identity, info.role, info.token_id) == ("alpha-1", "soldier", known_token.token_id)
    assert [info.generation(s) for s in Slot] == [1, 1, 1, 1]
    assert info.pin_tries_left == MAX_PIN_TRIES and not info.locked
    assert info.kid(Slot.WRAP) == known_token.kid(Slot.WRAP)
    with pytest.raises(TokenNotReady):
        token.mac(Slot.MAC, b"data")
    with pytest.raises(TokenNotReady):
        token.unwrap("a.b.c.d.e")


def test_mac_slots_compute_hmac_with_their_own_key_only(known_token: KnownToken) -> None:
    token = known_token.open()
    data = b"signing input"
    for slot in (Slot.MAC, Slot.AUTH):
        expected = hmac.new(known_token.key(slot), data, hashlib.sha256).digest()
        assert token.mac(slot, data) == expected
        assert token.verify_mac(slot, data, expected)
        assert not token.verify_mac(slot, data + b"!", expected)
    assert token.mac(Slot.MAC, data) != token.mac(Slot.AUTH, data)
    for slot in (Slot.WRAP, Slot.KEY_CHANGE):  # key separation: never a MAC oracle
        with pytest.raises(TokenError, match="not a MAC slot"):
            token.mac(slot, data)


def test_token_file_holds_no_key_in_the_clear(known_token: KnownToken) -> None:
    raw = known_token.path.read_bytes()
    for key in known_token.keys:
        assert key not in raw and key.hex().encode() not in raw
    mode = stat.S_IMODE(known_token.path.stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)


# -- PIN lockout ---------------------------------------------------------------------------------


def test_five_wrong_pins_lock_the_token_for_good(known_token: KnownToken) -> None:
    token = SoftwareToken(known_token.path)
    for left in range(MAX_PIN_TRIES - 1, 0, -1):
        with pytest.raises(WrongPin) as caught:
            token.verify_pin(WRONG)
        assert caught.value.tries_left == left
        assert f"{left} {'try' if left == 1 else 'tries'} left" in str(caught.value)
    with pytest.raises(TokenLocked):
        token.verify_pin(WRONG)

    reopened = SoftwareToken(known_token.path)  # the lock is in the file, not in the object
    assert reopened.info().locked and reopened.info().pin_tries_left == 0
    with pytest.raises(TokenLocked):
        reopened.verify_pin(PIN)
    with pytest.raises(TokenNotReady):
        reopened.mac(Slot.MAC, b"x")
    assert SoftwareToken(known_token.path).info().pin_tries_left == 0  # still locked


def test_wrong_pin_is_counted_in_the_file_before_it_is_reported(known_token: KnownToken) -> None:
    for _ in range(2):
        with pytest.raises(WrongPin):
            SoftwareToken(known_token.path).verify_pin(WRONG)
    assert SoftwareToken(known_token.path).info().pin_tries_left == MAX_PIN_TRIES - 2


def test_tries_counted_through_another_handle_are_seen(known_token: KnownToken) -> None:
    first, second = SoftwareToken(known_token.path), SoftwareToken(known_token.path)
    for _ in range(MAX_PIN_TRIES - 1):
        with pytest.raises(WrongPin):
            first.verify_pin(WRONG)
    # ``second`` was opened with 5 tries left; it must re-read the file, not trust its copy.
    with pytest.raises(TokenLocked):
        second.verify_pin(WRONG)


def test_exclusive_holds_the_file_against_another_handle(
    known_token: KnownToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two handles stand for two processes (``flock`` locks are per open file)."""
    monkeypatch.setattr(software, "LOCK_WAIT", 0.2)
    first, second = SoftwareToken(known_token.path), SoftwareToken(known_token.path)
    with (
        first.exclusive(),
        pytest.raises(TokenError, match="in use by another process"),
        second.exclusive(),
    ):
        pass
    with second.exclusive():  # released with the first
        pass


def test_exclusive_with_no_wait_fails_at_once_on_a_held_file(known_token: KnownToken) -> None:
    """What the agent does on its event loop: a busy file is a failure tried again later."""
    first, second = SoftwareToken(known_token.path), SoftwareToken(known_token.path)
    with first.exclusive():
        with first.exclusive(wait=0):  # the same handle again (the agent's fetch inside a hold)
            pass
        started = time.monotonic()
        with pytest.raises(TokenError, match="in use by another process"), second.exclusive(wait=0):
            pass
        assert time.monotonic() - started < 1.0


def test_exclusive_follows_another_process_key_change_without_the_pin(
    known_token: KnownToken,
) -> None:
    """An agent beside an ``as request`` on its token file takes the new keys on its next hold."""
    agent, other = known_token.open(), known_token.open()
    keys = tuple(os.urandom(32) for _ in range(4))
    change = KeyChange(known_token.token_id, (2, 2, 2, 2), keys)
    message = build_key_change(
        change, kid=known_token.kid(Slot.KEY_CHANGE), current_key=known_token.key(Slot.KEY_CHANGE)
    )
    with other.exclusive():
        other.key_change(message)
    assert agent.mac(Slot.MAC, b"x") != other.mac(Slot.MAC, b"x")  # still the old keys
    with agent.exclusive(wait=0):
        assert agent.info().generation(Slot.MAC) == 2
        assert agent.mac(Slot.MAC, b"x") == hmac.new(keys[Slot.MAC], b"x", hashlib.sha256).digest()


def test_right_pin_before_lockout_resets_the_counter(known_token: KnownToken) -> None:
    token = SoftwareToken(known_token.path)
    for _ in range(MAX_PIN_TRIES - 1):
        with pytest.raises(WrongPin):
            token.verify_pin(WRONG)
    token.verify_pin(PIN)
    assert SoftwareToken(known_token.path).info().pin_tries_left == MAX_PIN_TRIES
    for _ in range(MAX_PIN_TRIES - 1):
        with pytest.raises(WrongPin):
            token.verify_pin(WRONG)
    token.verify_pin(PIN)  # four more wrong ones did not lock: the count had restarted
    assert (
        token.mac(Slot.MAC, b"x")
        == hmac.new(known_token.key(Slot.MAC), b"x", hashlib.sha256).digest()
    )


def test_pin_length_is_checked_before_a_file_is_written(tmp_path: Path) -> None:
    for pin in ("123", "x" * 65):
        with pytest.raises(TokenError, match="PIN must be"):
            make_token(tmp_path / "t.token", pin=pin)
    assert list(tmp_path.iterdir()) == []


def test_personalise_refuses_to_overwrite(known_token: KnownToken) -> None:
    before = known_token.path.read_bytes()
    with pytest.raises(TokenError, match="already exists"):
        make_token(known_token.path)
    assert known_token.path.read_bytes() == before


def test_counter_writes_are_atomic(known_token: KnownToken) -> None:
    with pytest.raises(WrongPin):
        SoftwareToken(known_token.path).verify_pin(WRONG)
    assert [p.name for p in known_token.path.parent.iterdir()] == [known_token.path.name]


@pytest.mark.parametrize("planted", ["symlink", "world-readable-file"])
def test_a_file_planted_where_the_write_makes_its_temporary_is_never_written_through(
    known_token: KnownToken, tmp_path: Path, planted: str
) -> None:
    """The temporary file is made anew (``O_EXCL``, no symlink followed): the counter written
    back lands in the token file alone, a regular file of mode 0600 whatever was there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    # the name a predictable scheme (``.<name>.<pid>.tmp``) gives this process's write
    temporary = known_token.path.with_name(f".{known_token.path.name}.{os.getpid()}.tmp")
    if planted == "symlink":
        temporary.symlink_to(elsewhere)
    else:
        temporary.write_bytes(b"")
        temporary.chmod(0o644)
    with pytest.raises(WrongPin):
        SoftwareToken(known_token.path).verify_pin(WRONG)
    assert elsewhere.read_bytes() == b"untouched"
    assert not known_token.path.is_symlink()
    assert stat.S_IMODE(known_token.path.stat().st_mode) == 0o600
    assert SoftwareToken(known_token.path).info().pin_tries_left == MAX_PIN_TRIES - 1


# -- integrity of the file -----------------------------------------------------------------------


def test_every_flipped_byte_of_a_token_file_is_reported_corrupt(known_token: KnownToken) -> None:
    raw = known_token.path.read_bytes()
    probe = known_token.path.with_name("probe.token")
    for i in range(len(raw)):
        for mask in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[i] ^= mask
            probe.write_bytes(bytes(flipped))
            with pytest.raises(TokenCorrupt):
                SoftwareToken(probe)
    probe.write_bytes(raw)
    assert SoftwareToken(probe).info().token_id == known_token.token_id  # the probe is sound


def test_a_token_file_of_another_format_version_says_so(known_token: KnownToken) -> None:
    raw = bytearray(known_token.path.read_bytes())
    raw[len(b"SNRTOKEN")] = 2  # the version byte after the magic
    known_token.path.write_bytes(bytes(raw))
    with pytest.raises(TokenCorrupt, match="format version 2, this snrmesh reads 1"):
        SoftwareToken(known_token.path)


def test_every_truncation_or_extension_is_reported_corrupt(known_token: KnownToken) -> None:
    raw = known_token.path.read_bytes()
    probe = known_token.path.with_name("probe.token")
    for variant in [raw[:n] for n in range(len(raw))] + [raw + b"\x00", b"\x00" + raw]:
        probe.write_bytes(variant)
        with pytest.raises(TokenCorrupt):
            SoftwareToken(probe)


def test_unreadable_token_files_raise_token_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="does not exist"):
        SoftwareToken(tmp_path / "missing.token")
    with pytest.raises(TokenError):
        SoftwareToken(tmp_path)  # a directory
    big = tmp_path / "big.token"
    big.write_bytes(MAGIC + os.urandom(MAX_TOKEN_FILE_SIZE))
    with pytest.raises(TokenCorrupt, match="too large"):
        SoftwareToken(big)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("identity", "alpha-2"),
        ("role", "authority"),
        ("gens", [2, 2, 2, 2]),
        ("id", bytes(16)),
        ("kdf", [bytes(16), 2**15, 8, 1]),
    ],
)
def test_edited_header_with_valid_checksum_never_releases_keys(
    known_token: KnownToken, field: str, value: object
) -> None:
    """The checksum is no seal: the AEAD binds identity, role, generations, id and KDF salt."""
    fields = _fields(known_token.path.read_bytes())
    assert fields[field] != value
    fields[field] = value
    known_token.path.write_bytes(_encode(fields))
    token = SoftwareToken(known_token.path)  # well-formed, so it loads...
    with pytest.raises(TokenError):
        token.verify_pin(PIN)  # ...but the right PIN does not open it
    with pytest.raises(TokenNotReady):
        token.mac(Slot.MAC, b"x")


@pytest.mark.parametrize(
    "kdf",
    [["s" * 16, 2**15, 8, 1], [bytes(16), 2**15, 8.0, 1], [bytes(16), 2**15, 8, 1.0]],
    ids=["text-salt", "float-r", "float-p"],
)
def test_ill_typed_kdf_parameters_are_corrupt_not_a_crash(
    known_token: KnownToken, kdf: list[object]
) -> None:
    fields = _fields(known_token.path.read_bytes())
    fields["kdf"] = kdf
    known_token.path.write_bytes(_encode(fields))
    with pytest.raises(TokenError):
        SoftwareToken(known_token.path).verify_pin(PIN)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("identity", "Alpha\x1b[31m"),  # what `info` would print, unchecked
        ("identity", ""),
        ("role", "soldier\n"),
        ("gens", [2**63, 1, 1, 1]),
    ],
)
def test_a_token_file_with_an_impossible_field_is_corrupt(
    known_token: KnownToken, field: str, value: object
) -> None:
    """Read before the PIN (``info`` needs none): held to the desk's own rules."""
    fields = _fields(known_token.path.read_bytes())
    fields[field] = value
    known_token.path.write_bytes(_encode(fields))
    with pytest.raises(TokenCorrupt, match="bad field"):
        SoftwareToken(known_token.path)


def test_derive_is_hkdf_of_the_auth_key_and_refuses_other_slots(tmp_path: Path) -> None:
    """DERIVE gives HKDF(AUTH key, context) -- the static key itself never leaves the token."""
    from mesh.crypto import hkdf_sha256
    from mesh.token.interface import DERIVE_INFO

    keys = [bytes([i]) * 32 for i in range(4)]
    token = SoftwareToken.personalise(
        tmp_path / "t.token",
        pin="1234",
        token_id=b"\x01" * 16,
        identity="alpha-1",
        role="soldier",
        keys=keys,
        generations=[1, 1, 1, 1],
    )
    with pytest.raises(TokenNotReady):
        token.derive(Slot.AUTH, b"ctx")
    token.verify_pin("1234")
    derived = token.derive(Slot.AUTH, b"ctx-1")
    assert derived == hkdf_sha256(keys[Slot.AUTH], salt=None, info=DERIVE_INFO + b"ctx-1")
    assert derived != token.derive(Slot.AUTH, b"ctx-2")
    assert derived not in keys
    for slot in (Slot.WRAP, Slot.MAC, Slot.KEY_CHANGE):
        with pytest.raises(TokenError, match="does not derive"):
            token.derive(slot, b"ctx")
    with pytest.raises(TokenError, match="context"):
        token.derive(Slot.AUTH, b"x" * 257)


def test_a_token_on_read_only_media_fails_with_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong PIN must be counted; if the file cannot be written, say so (no traceback)."""
    import errno

    import mesh.token.software as software

    token = SoftwareToken.personalise(
        tmp_path / "t.token",
        pin="1234",
        token_id=b"\x02" * 16,
        identity="alpha-1",
        role="soldier",
        keys=[bytes([i]) * 32 for i in range(4)],
        generations=[1, 1, 1, 1],
    )

    def read_only(path: object, data: bytes, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(software, "write_atomic", read_only)
    with pytest.raises(TokenError, match=r"cannot write token file .*Read-only file system"):
        token.verify_pin("9999")
