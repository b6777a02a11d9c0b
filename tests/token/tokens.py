"""Software tokens with keys the test knows, shared by the token and keyset tests.

``SoftwareToken.personalise`` is the same call the desk makes; building tokens
here (instead of through a desk) lets a test hold the slot keys and check a
token's output with plain ``jwcrypto``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.token import KEY_SIZE, SLOT_COUNT, TOKEN_ID_SIZE, Slot, slot_kid
from mesh.token.software import SoftwareToken

__all__ = ["PIN", "KnownToken", "make_token", "oct_jwk"]

PIN = "2468"


def oct_jwk(key: bytes) -> jwk.JWK:
    return jwk.JWK(kty="oct", k=base64url_encode(key))


@dataclass(frozen=True)
class KnownToken:
    path: Path
    token_id: bytes
    identity: str
    keys: tuple[bytes, ...]
    generation: int

    def key(self, slot: Slot) -> bytes:
        return self.keys[int(slot)]

    def kid(self, slot: Slot) -> str:
        return slot_kid(self.token_id, slot, self.generation)

    def open(self, pin: str = PIN) -> SoftwareToken:
        """A token object with its PIN verified (one scrypt)."""
        token = SoftwareToken(self.path)
        token.verify_pin(pin)
        return token


def make_token(
    path: Path,
    *,
    identity: str = "alpha-1",
    role: str = "soldier",
    generation: int = 1,
    pin: str = PIN,
    token_id: bytes | None = None,
) -> KnownToken:
    keys = tuple(os.urandom(KEY_SIZE) for _ in range(SLOT_COUNT))
    token_id = token_id or os.urandom(TOKEN_ID_SIZE)
    SoftwareToken.personalise(
        path,
        pin=pin,
        token_id=token_id,
        identity=identity,
        role=role,
        keys=keys,
        generations=[generation] * SLOT_COUNT,
    )
    return KnownToken(path, token_id, identity, keys, generation)
