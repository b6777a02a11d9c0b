"""The compact-JWE encoder (``mesh.crypto.jose``) against jwcrypto, the reference decoder."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwe, jwk
from jwcrypto.common import JWSEHeaderRegistry, base64url_decode, base64url_encode

from mesh.crypto import CryptoError, b64url, encrypt_compact_a256kw
from mesh.crypto.jose import MAX_JWE_PLAINTEXT, UNSUPPORTED_HEADERS

FUZZ = settings(max_examples=200, deadline=None)
BASE = {"alg": "A256KW", "enc": "A256GCM"}

_json_values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.booleans(),
    st.none(),
)
# the registered names (jku, x5c, epk, ...) have typed meanings for a decoder: our headers use
# private names (kid and typ aside, which the tests of mesh.keyset cover), so fuzz those
_REGISTERED = set(JWSEHeaderRegistry(jwe.JWEHeaderRegistry))
_headers = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in _REGISTERED),
    _json_values,
    max_size=10,
)


def _oct(key: bytes) -> jwk.JWK:
    return jwk.JWK(kty="oct", k=base64url_encode(key))


def _decrypt(token: str, key: bytes) -> tuple[bytes, dict[str, object]]:
    """What plain jwcrypto makes of ``token``: payload and protected header."""
    message = jwe.JWE()
    message.deserialize(token, key=_oct(key))
    return bytes(message.payload), json.loads(message.objects["protected"])


def _jwcrypto_encrypt(key: bytes, header: dict[str, object], plaintext: bytes) -> str:
    message = jwe.JWE(plaintext, protected=json.dumps(header, separators=(",", ":")))
    message.add_recipient(_oct(key))
    return str(message.serialize(compact=True))


@FUZZ
@given(
    key=st.binary(min_size=32, max_size=32),
    extra=_headers,
    plaintext=st.binary(min_size=1, max_size=MAX_JWE_PLAINTEXT),
)
def test_jwcrypto_decrypts_every_form_and_sees_the_same_protected_header(
    key: bytes, extra: dict[str, object], plaintext: bytes
) -> None:
    header = {**BASE, **extra}
    token = encrypt_compact_a256kw(key, header, plaintext)
    payload, protected = _decrypt(token, key)
    assert payload == plaintext
    assert protected == header
    # byte for byte the header part jwcrypto itself writes for the same header
    assert token.split(".")[0] == _jwcrypto_encrypt(key, header, plaintext).split(".")[0]


@FUZZ
@given(key=st.binary(min_size=32, max_size=32), plaintext=st.binary(min_size=1, max_size=64))
def test_the_shape_is_rfc_7516_compact(key: bytes, plaintext: bytes) -> None:
    parts = encrypt_compact_a256kw(key, {**BASE, "kid": "k"}, plaintext).split(".")
    assert len(parts) == 5
    assert all("=" not in p and "+" not in p and "/" not in p for p in parts)
    sizes = [len(base64url_decode(p)) for p in parts[1:]]
    assert sizes == [40, 12, len(plaintext), 16]  # wrapped CEK, IV, ciphertext, tag


def test_fresh_cek_and_iv_per_message() -> None:
    key, header = os.urandom(32), {**BASE, "kid": "k"}
    a, b = (encrypt_compact_a256kw(key, header, b"same").split(".") for _ in range(2))
    assert a[0] == b[0]
    assert a[1] != b[1] and a[2] != b[2] and a[3] != b[3]


@pytest.mark.parametrize("part", [0, 1, 2, 3, 4])
def test_jwcrypto_refuses_any_altered_part(part: int) -> None:
    key = os.urandom(32)
    parts = encrypt_compact_a256kw(key, {**BASE, "kid": "k"}, os.urandom(32)).split(".")
    raw = bytearray(base64url_decode(parts[part]))
    raw[0] ^= 1
    parts[part] = base64url_encode(bytes(raw))
    with pytest.raises((jwe.InvalidJWEData, ValueError)):
        _decrypt(".".join(parts), key)


def test_jwcrypto_refuses_another_key() -> None:
    token = encrypt_compact_a256kw(os.urandom(32), dict(BASE), b"secret")
    with pytest.raises(jwe.InvalidJWEData):
        _decrypt(token, os.urandom(32))


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"alg": "A256KW"},
        {"alg": "A128KW", "enc": "A256GCM"},
        {"alg": "A256KW", "enc": "A128GCM"},
        {"alg": "dir", "enc": "A256GCM"},
    ],
)
def test_refuses_a_header_naming_other_algorithms(header: dict[str, object]) -> None:
    with pytest.raises(CryptoError):
        encrypt_compact_a256kw(os.urandom(32), header, b"x")


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_refuses_a_key_that_is_not_256_bits(size: int) -> None:
    with pytest.raises(CryptoError):
        encrypt_compact_a256kw(os.urandom(size), dict(BASE), b"x")


@pytest.mark.parametrize("size", [0, MAX_JWE_PLAINTEXT + 1])
def test_refuses_an_empty_or_oversized_plaintext(size: int) -> None:
    with pytest.raises(CryptoError):
        encrypt_compact_a256kw(os.urandom(32), dict(BASE), bytes(size))


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_HEADERS))
def test_refuses_compression_and_critical_extensions(name: str) -> None:
    with pytest.raises(CryptoError):
        encrypt_compact_a256kw(os.urandom(32), {**BASE, name: "DEF"}, b"x")


@given(st.binary(max_size=512))
def test_b64url_is_jwcryptos_base64url(data: bytes) -> None:
    assert b64url(data) == base64url_encode(data)
    assert base64url_decode(b64url(data)) == data
