"""Key-change messages: new slot keys delivered wrapped under a current key.

This is the seed's key change (DMS ESAC 1): the desk or an Authentication
Server replaces every static key of a token without the keys ever travelling
in the clear. A message is a JWE compact (``A256KW`` under the token's current
``KEY_CHANGE`` slot key, ``enc`` ``A256GCM``), header ``typ`` =
``snrmesh-keychange``; the payload is CBOR ``{"token": id, "gens": [4 ints],
"keys": [4 x 32 bytes]}``. AES-GCM authenticates it (the "MAC" of the seed),
and every generation must strictly increase, so an old message replayed to a
token that has moved on is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import cbor2
from jwcrypto import jwe, jwk
from jwcrypto.common import JWException, base64url_decode, base64url_encode

from mesh.token.errors import KeyChangeRefused, Refusal
from mesh.token.interface import KEY_SIZE, SLOT_COUNT, TOKEN_ID_SIZE, is_slot_kid

__all__ = [
    "KEY_CHANGE_TYPE",
    "MAX_KEY_CHANGE_SIZE",
    "KeyChange",
    "build_key_change",
    "check_newer",
    "key_change_kid",
    "open_key_change",
]

KEY_CHANGE_TYPE = "snrmesh-keychange"
# the highest generation any store or wire takes (the AS's HELLO: 31 bits; a card: 32): one
# past it, a token would be refused everywhere, or no longer load (its file takes < 2**63)
MAX_GENERATION = 2**31 - 1
MAX_KEY_CHANGE_SIZE = 4096


@dataclass(frozen=True, slots=True, repr=False)
class KeyChange:
    token_id: bytes
    generations: tuple[int, ...]
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.token_id) != TOKEN_ID_SIZE:
            raise KeyChangeRefused("key change names a malformed token id")
        if len(self.generations) != SLOT_COUNT or len(self.keys) != SLOT_COUNT:
            raise KeyChangeRefused(f"key change must carry {SLOT_COUNT} slots")
        if any(len(k) != KEY_SIZE for k in self.keys):
            raise KeyChangeRefused(f"key change keys must be {KEY_SIZE} bytes")
        if any(
            not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= MAX_GENERATION
            for g in self.generations
        ):
            raise KeyChangeRefused(f"key change generations must be 1..{MAX_GENERATION:,}")

    def __repr__(self) -> str:
        return f"KeyChange(token={self.token_id.hex()}, generations={self.generations})"


def key_change_kid(message: str) -> str:
    """The ``kid`` of a key-change message (unauthenticated; for routing only)."""
    if not isinstance(message, str) or len(message) > MAX_KEY_CHANGE_SIZE:
        raise KeyChangeRefused("key-change message too large or not text")
    parts = message.split(".")
    if len(parts) != 5:
        raise KeyChangeRefused("key-change message is not a JWE compact serialization")
    try:
        header = json.loads(base64url_decode(parts[0]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise KeyChangeRefused("key-change header is not base64url JSON") from None
    if not isinstance(header, dict) or header.get("typ") != KEY_CHANGE_TYPE:
        raise KeyChangeRefused("not a key-change message")
    kid = header.get("kid")
    if not is_slot_kid(kid):
        raise KeyChangeRefused("key-change message has no kid naming a token's slot key")
    return kid


def build_key_change(change: KeyChange, *, kid: str, current_key: bytes) -> str:
    """Wrap ``change`` under the token's current ``KEY_CHANGE`` key (named by ``kid``)."""
    payload = cbor2.dumps(
        {"token": change.token_id, "gens": list(change.generations), "keys": list(change.keys)}
    )
    header = {"alg": "A256KW", "enc": "A256GCM", "typ": KEY_CHANGE_TYPE, "kid": kid}
    message = jwe.JWE(payload, protected=json.dumps(header, separators=(",", ":")))
    message.add_recipient(jwk.JWK(kty="oct", k=base64url_encode(current_key)))
    return str(message.serialize(compact=True))


def open_key_change(message: str, *, current_key: bytes) -> KeyChange:
    """Decrypt and parse a key-change message; raise ``KeyChangeRefused`` on any defect."""
    key_change_kid(message)  # size and shape checks first
    token = jwe.JWE()
    try:
        token.deserialize(message, key=jwk.JWK(kty="oct", k=base64url_encode(current_key)))
        body = cbor2.loads(token.payload)
    except (JWException, ValueError, TypeError, cbor2.CBORDecodeError):
        raise KeyChangeRefused(
            "key-change message failed authentication", refusal=Refusal.FAILED_AUTH
        ) from None
    if not isinstance(body, dict):
        raise KeyChangeRefused("key-change payload is not a map")
    token_id, gens, keys = body.get("token"), body.get("gens"), body.get("keys")
    if not isinstance(token_id, bytes) or not isinstance(gens, list) or not isinstance(keys, list):
        raise KeyChangeRefused("key-change payload is malformed")
    if not all(isinstance(k, bytes) for k in keys):
        raise KeyChangeRefused("key-change keys are malformed")
    return KeyChange(token_id=token_id, generations=tuple(gens), keys=tuple(keys))


def check_newer(current: Sequence[int], proposed: Sequence[int]) -> None:
    """Every proposed generation must be strictly newer than the one it replaces."""
    if any(new <= old for old, new in zip(current, proposed, strict=True)):
        raise KeyChangeRefused(
            "key change is not newer than the keys held (replay?)", refusal=Refusal.NOT_NEWER
        )
