"""Cryptographic recipes: the only place that imports ``cryptography.hazmat``.

The rest of the code base calls these small, explicit functions, so that a
reviewer finds every primitive and its parameters in one folder.
"""

from __future__ import annotations

from mesh.crypto.jose import b64url, encrypt_compact_a256kw
from mesh.crypto.primitives import (
    AEAD_KEY_SIZE,
    CryptoError,
    InvalidTag,
    aes_key_unwrap,
    aes_key_wrap,
    aesgcm_decrypt,
    aesgcm_encrypt,
    hkdf_sha256,
    hmac_sha256,
    random_bytes,
)
from mesh.crypto.sealing import SCRYPT_MIN_N, Sealer, SealingParams

__all__ = [
    "AEAD_KEY_SIZE",
    "SCRYPT_MIN_N",
    "CryptoError",
    "InvalidTag",
    "Sealer",
    "SealingParams",
    "aes_key_unwrap",
    "aes_key_wrap",
    "aesgcm_decrypt",
    "aesgcm_encrypt",
    "b64url",
    "encrypt_compact_a256kw",
    "hkdf_sha256",
    "hmac_sha256",
    "random_bytes",
]
