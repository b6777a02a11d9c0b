"""Key change: new slot keys wrapped under the current KEY_CHANGE key, strictly newer, atomic."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from jwcrypto.common import base64url_decode, base64url_encode

from mesh.token import (
    KEY_SIZE,
    SLOT_COUNT,
    KeyChangeRefused,
    Slot,
    TokenNotReady,
    slot_kid,
)
from mesh.token.keychange import KeyChange, build_key_change, open_key_change
from mesh.token.software import SoftwareToken
from tests.token.tokens import KnownToken


def _new_keys() -> tuple[bytes, ...]:
    return tuple(os.urandom(KEY_SIZE) for _ in range(SLOT_COUNT))


def _message(
    known: KnownToken,
    keys: tuple[bytes, ...],
    *,
    generations: tuple[int, ...] = (2, 2, 2, 2),
    token_id: bytes | None = None,
    current_key: bytes | None = None,
) -> str:
    change = KeyChange(token_id or known.token_id, generations, keys)
    return build_key_change(
        change,
        kid=known.kid(Slot.KEY_CHANGE),
        current_key=current_key or known.key(Slot.KEY_CHANGE),
    )


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def test_key_change_replaces_every_slot_and_survives_reopening(known_token: KnownToken) -> None:
    token = known_token.open()
    new = _new_keys()
    token.key_change(_message(known_token, new))
    assert token.mac(Slot.MAC, b"x") == _hmac(new[Slot.MAC], b"x")
    assert token.info().kid(Slot.WRAP) == slot_kid(known_token.token_id, Slot.WRAP, 2)

    reopened = known_token.open()  # same PIN, new keys, new generations, from the file
    assert [reopened.info().generation(s) for s in Slot] == [2, 2, 2, 2]
    assert reopened.mac(Slot.AUTH, b"x") == _hmac(new[Slot.AUTH], b"x")
    assert reopened.mac(Slot.MAC, b"x") != _hmac(known_token.key(Slot.MAC), b"x")


def test_a_replayed_key_change_is_refused(known_token: KnownToken) -> None:
    token = known_token.open()
    message = _message(known_token, _new_keys())
    token.key_change(message)
    after = known_token.path.read_bytes()
    with pytest.raises(KeyChangeRefused, match="another token or key generation"):
        token.key_change(message)
    assert known_token.path.read_bytes() == after


@pytest.mark.parametrize("generations", [(1, 1, 1, 1), (2, 2, 2, 1)], ids=["same", "one-stale"])
def test_key_change_that_is_not_newer_everywhere_is_refused(
    known_token: KnownToken, generations: tuple[int, ...]
) -> None:
    token = known_token.open()
    before = known_token.path.read_bytes()
    with pytest.raises(KeyChangeRefused):
        token.key_change(_message(known_token, _new_keys(), generations=generations))
    assert known_token.path.read_bytes() == before
    assert token.mac(Slot.MAC, b"x") == _hmac(known_token.key(Slot.MAC), b"x")


def test_forged_or_misaddressed_key_changes_are_refused(known_token: KnownToken) -> None:
    token = known_token.open()
    before = known_token.path.read_bytes()
    forged = _message(known_token, _new_keys(), current_key=os.urandom(KEY_SIZE))
    other = _message(known_token, _new_keys(), token_id=os.urandom(16))
    for message, reason in [
        (forged, "failed authentication"),
        (other, "another token"),
        ("not.a.key.change.message", "not base64url JSON"),
        ("x" * 5000, "too large"),
        (base64url_encode("[" * 3000) + ".AAAA" * 4, "not base64url JSON"),
    ]:
        with pytest.raises(KeyChangeRefused, match=reason):
            token.key_change(message)
    assert known_token.path.read_bytes() == before


def test_key_change_needs_a_verified_pin(known_token: KnownToken) -> None:
    with pytest.raises(TokenNotReady):
        SoftwareToken(known_token.path).key_change(_message(known_token, _new_keys()))


def test_key_change_message_does_not_carry_keys_in_the_clear(known_token: KnownToken) -> None:
    new = _new_keys()
    message = _message(known_token, new)
    parts = [base64url_decode(part) for part in message.split(".")]
    assert len(parts) == 5 and len(parts[3]) > 4 * KEY_SIZE  # the keys are in the ciphertext...
    for key in new:
        assert all(key not in part for part in parts)  # ...encrypted
        assert base64url_encode(key) not in message
    opened = open_key_change(message, current_key=known_token.key(Slot.KEY_CHANGE))
    assert opened.keys == new
    assert all(key.hex() not in repr(opened) for key in new)


@pytest.mark.parametrize("generation", [2**31, 2**63, 2**64 + 5])
def test_a_key_change_to_a_generation_no_store_takes_is_refused(
    known_token: KnownToken, generation: int
) -> None:
    """Authentic (under the KEY_CHANGE key) but past any AS's or file's bound: taken, it left
    a token refused by every AS, or one whose file no longer loads (secure-phase fuzz)."""
    change = object.__new__(KeyChange)  # past the constructor's check, as a hostile AS's would be
    for name, value in (
        ("token_id", known_token.token_id),
        ("generations", (generation,) * SLOT_COUNT),
        ("keys", _new_keys()),
    ):
        object.__setattr__(change, name, value)
    message = build_key_change(
        change, kid=known_token.kid(Slot.KEY_CHANGE), current_key=known_token.key(Slot.KEY_CHANGE)
    )
    token = known_token.open()
    before = known_token.path.read_bytes()
    with pytest.raises(KeyChangeRefused, match="generations must be"):
        token.key_change(message)
    assert known_token.path.read_bytes() == before
    assert known_token.open().info().generation(Slot.AUTH) == 1
