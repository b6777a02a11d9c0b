"""Recipe-style wrappers around the ``cryptography`` primitives we use.

Every length is checked before any work is done, and failures surface as
``InvalidTag`` (authentication failed) or ``CryptoError`` (misuse), both
rooted in :class:`mesh.errors.MeshError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag as _CryptographyInvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap as _aes_key_unwrap
from cryptography.hazmat.primitives.keywrap import aes_key_wrap as _aes_key_wrap

from mesh.errors import MeshError

__all__ = [
    "AEAD_KEY_SIZE",
    "GCM_NONCE_SIZE",
    "CryptoError",
    "InvalidTag",
    "aes_key_unwrap",
    "aes_key_wrap",
    "aesgcm_decrypt",
    "aesgcm_encrypt",
    "hkdf_sha256",
    "hmac_sha256",
    "random_bytes",
    "sha256",
]

AEAD_KEY_SIZE = 32
GCM_NONCE_SIZE = 12
MAX_HKDF_OUTPUT = 255 * 32


class CryptoError(MeshError):
    """A cryptographic operation was called with unusable arguments."""


class InvalidTag(CryptoError):
    """Authentication failed: wrong key, or the data was modified."""


def random_bytes(n: int) -> bytes:
    """Fresh bytes from the operating system's CSPRNG."""
    if n < 0:
        raise CryptoError("negative length")
    return os.urandom(n)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256."""
    if not 0 < length <= MAX_HKDF_OUTPUT:
        raise CryptoError("HKDF output length out of range")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _check_key(key: bytes) -> None:
    if len(key) != AEAD_KEY_SIZE:
        raise CryptoError(f"key must be {AEAD_KEY_SIZE} bytes")


def aesgcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes | None) -> bytes:
    """AES-256-GCM; returns ciphertext with the 16-byte tag appended."""
    _check_key(key)
    if len(nonce) != GCM_NONCE_SIZE:
        raise CryptoError("AES-GCM nonce must be 12 bytes")
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aesgcm_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes | None) -> bytes:
    _check_key(key)
    if len(nonce) != GCM_NONCE_SIZE:
        raise CryptoError("AES-GCM nonce must be 12 bytes")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except _CryptographyInvalidTag:
        raise InvalidTag("AES-GCM authentication failed") from None


def aes_key_wrap(kek: bytes, key: bytes) -> bytes:
    """RFC 3394 AES key wrap (the ``A256KW`` of RFC 7518 when ``kek`` is 32 bytes)."""
    _check_key(kek)
    return _aes_key_wrap(kek, key)


def aes_key_unwrap(kek: bytes, wrapped: bytes) -> bytes:
    _check_key(kek)
    try:
        return _aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise InvalidTag("AES key unwrap failed") from None
