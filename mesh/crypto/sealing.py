"""Passphrase sealing: scrypt (RFC 7914) derives a key, ChaCha20-Poly1305 seals.

Used for the software token file (sealed under its PIN) and for every secret
in the desk store (sealed under the desk passphrase). The scrypt cost is paid
once per process: :class:`Sealer` keeps the derived key, never the passphrase.
A sealed blob is ``nonce (12) || ciphertext || tag (16)``; the caller passes
associated data that binds the blob to its context (file header, row id), so
a blob moved elsewhere fails to open.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag as _CryptographyInvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mesh.crypto.primitives import CryptoError, InvalidTag, random_bytes

__all__ = ["SCRYPT_MIN_N", "SEAL_OVERHEAD", "Sealer", "SealingParams"]

SCRYPT_MIN_N = 2**15
SCRYPT_MAX_N = 2**18
SCRYPT_MAX_R = 8
SCRYPT_MAX_P = 4
SALT_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE


@dataclass(frozen=True, slots=True)
class SealingParams:
    """scrypt parameters, stored in the clear next to what they seal.

    Bounds are checked on load so that a hostile file cannot make us allocate
    more than 256 MiB (scrypt needs 128 * r * N bytes: at most 128 * 8 * 2^18) or
    skip the work factor (``n`` too small).
    """

    salt: bytes
    n: int = SCRYPT_MIN_N
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes) or len(self.salt) != SALT_SIZE:
            raise CryptoError(f"scrypt salt must be {SALT_SIZE} bytes")
        if any(type(v) is not int for v in (self.n, self.r, self.p)):
            raise CryptoError("scrypt N, r and p must be integers")
        if not (SCRYPT_MIN_N <= self.n <= SCRYPT_MAX_N) or self.n & (self.n - 1):
            raise CryptoError("scrypt N must be a power of two in [2^15, 2^18]")
        if not (1 <= self.r <= SCRYPT_MAX_R and 1 <= self.p <= SCRYPT_MAX_P):
            raise CryptoError("scrypt r/p out of range")

    @classmethod
    def generate(cls) -> SealingParams:
        return cls(salt=random_bytes(SALT_SIZE))


class Sealer:
    """Seals and opens blobs under a key derived from a passphrase or PIN."""

    __slots__ = ("_aead", "params")

    def __init__(self, passphrase: str, params: SealingParams) -> None:
        key = Scrypt(salt=params.salt, length=32, n=params.n, r=params.r, p=params.p).derive(
            passphrase.encode("utf-8")
        )
        self._aead = ChaCha20Poly1305(key)
        self.params = params

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = random_bytes(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Return the plaintext, or raise :class:`InvalidTag` (wrong secret or tampering)."""
        if len(blob) < SEAL_OVERHEAD:
            raise InvalidTag("sealed blob too short")
        try:
            return self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
        except _CryptographyInvalidTag:
            raise InvalidTag("sealed blob did not open") from None
