"""Wrapped CK copies: one JWE (RFC 7516 compact) per party of a CK.

``alg`` is ``A256KW`` under the party token's ``WRAP`` slot key (named by
``kid``), ``enc`` is ``A256GCM``; the payload is the 32-byte pair key. The
protected header -- authenticated as GCM associated data -- carries everything
else about the CK, so a node learns the CK's identities, mission and window
only from a copy whose tag verified. Field by field: ``docs/keysets.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jwcrypto import jwe, jwk
from jwcrypto.common import JWException, base64url_decode, base64url_encode

from mesh.crypto import CryptoError, b64url, encrypt_compact_a256kw
from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import CK_ID_SIZE, MISSION_ID_SIZE, CommunicationKeyset, check_identity
from mesh.token.interface import SecureElement, is_slot_kid

__all__ = [
    "COPY_TYPE",
    "DISCOVERY_TYPE",
    "MAX_COPY_SIZE",
    "CopyHeader",
    "DiscoveryKey",
    "b64url_decode_strict",
    "decrypt_copy",
    "open_copy",
    "open_discovery_key",
    "read_copy_header",
    "read_wrapped_kid",
    "wrap_copy",
    "wrap_discovery_key",
]

COPY_TYPE = "snrmesh-ck"
DISCOVERY_TYPE = "snrmesh-discovery"
_WRAPPED_TYPES = frozenset({COPY_TYPE, DISCOVERY_TYPE})
MAX_COPY_SIZE = 2048
_JWE_PARTS = 5


@dataclass(frozen=True, slots=True)
class CopyHeader:
    """The protected header of a CK copy, as parsed (not yet authenticated)."""

    kid: str
    ck_id: bytes
    mission_id: bytes
    party_a: str
    party_b: str
    holder: str
    not_before: int
    not_after: int

    def to_json(self) -> dict[str, Any]:
        return {
            "alg": "A256KW",
            "enc": "A256GCM",
            "typ": COPY_TYPE,
            "kid": self.kid,
            "ck": b64url(self.ck_id),
            "mis": b64url(self.mission_id),
            "a": self.party_a,
            "b": self.party_b,
            "for": self.holder,
            "nbf": self.not_before,
            "exp": self.not_after,
        }


def _kek(wrap_key: jwk.JWK | bytes) -> bytes:
    """The raw ``WRAP`` slot key, whether given as bytes or as its symmetric JWK."""
    if isinstance(wrap_key, bytes):
        return wrap_key
    if wrap_key.get("kty") != "oct" or not isinstance(wrap_key.get("k"), str):
        raise KeysetError("a WRAP key must be a symmetric (oct) JWK")
    try:
        raw: bytes = base64url_decode(wrap_key["k"])
    except ValueError:
        raise KeysetError("the WRAP key's JWK is not base64url") from None
    return raw


def _encrypt(wrap_key: jwk.JWK | bytes, header: dict[str, Any], secret: bytes) -> str:
    """One JWE under a token's ``WRAP`` key, by the project's own encoder (``mesh.crypto.jose``).

    jwcrypto deep-copies its header registry in every object it builds, which
    made it the main cost of issuing a copy; it still decodes every copy.
    """
    try:
        return encrypt_compact_a256kw(_kek(wrap_key), header, secret)
    except CryptoError as exc:
        raise KeysetError(f"cannot wrap for this key: {exc}") from None


def wrap_copy(ck: CommunicationKeyset, *, holder: str, kid: str, wrap_key: jwk.JWK | bytes) -> str:
    """Wrap ``ck``'s pair key for ``holder`` under its token's ``WRAP`` slot key (raw or JWK)."""
    if not ck.involves(holder):
        raise KeysetError(f"{holder} is not a party of {ck!r}")
    header = CopyHeader(
        kid=kid,
        ck_id=ck.ck_id,
        mission_id=ck.mission_id,
        party_a=ck.party_a,
        party_b=ck.party_b,
        holder=holder,
        not_before=ck.not_before,
        not_after=ck.not_after,
    )
    return _encrypt(wrap_key, header.to_json(), ck.pair_key)


def _field(header: dict[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise KeysetError(f"CK copy header field {name!r} missing or not {kind.__name__}")
    return value


def _b64_field(header: dict[str, Any], name: str, size: int) -> bytes:
    try:
        raw: bytes = base64url_decode(_field(header, name, str))
    except ValueError:
        raise KeysetError(f"CK copy header field {name!r} is not base64url") from None
    if len(raw) != size:
        raise KeysetError(f"CK copy header field {name!r} must be {size} bytes")
    return raw


def b64url_decode_strict(text: str) -> bytes:
    """Decode unpadded base64url, refusing every spelling of the bytes but the canonical one.

    ``base64url_decode`` skips stray characters and ignores the unused low bits
    of the last character, so a flipped byte there would decode to the same
    bytes and pass the JWE tag or the JWS MAC unnoticed.
    """
    raw: bytes = base64url_decode(text)
    if base64url_encode(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def _protected_header(copy: str, allowed_types: frozenset[str]) -> dict[str, Any]:
    """The protected header of a wrapped secret of one of ``allowed_types`` (not authenticated)."""
    if not isinstance(copy, str) or len(copy) > MAX_COPY_SIZE:
        raise KeysetError("wrapped key too large or not text")
    parts = copy.split(".")
    if len(parts) != _JWE_PARTS:
        raise KeysetError("wrapped key is not a JWE compact serialization")
    try:
        for part in parts[1:]:
            b64url_decode_strict(part)
        header = json.loads(b64url_decode_strict(parts[0]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise KeysetError("wrapped key is not canonical base64url JSON") from None
    if not isinstance(header, dict):
        raise KeysetError("wrapped key header is not a JSON object")
    typ = header.get("typ")
    if (header.get("alg"), header.get("enc")) != ("A256KW", "A256GCM") or not (
        isinstance(typ, str) and typ in allowed_types
    ):
        raise KeysetError(
            f"wrapped key must be typ {'/'.join(sorted(allowed_types))} "
            "with alg A256KW, enc A256GCM"
        )
    if not is_slot_kid(_field(header, "kid", str)):
        raise KeysetError("wrapped key's kid does not name a token's slot key")
    return header


def read_wrapped_kid(copy: str) -> str:
    """The ``kid`` of any secret a desk wraps for a token (CK copy or discovery key)."""
    kid: str = _protected_header(copy, _WRAPPED_TYPES)["kid"]
    return kid


def read_copy_header(copy: str) -> CopyHeader:
    """Parse a copy's protected header (bounded, typed); says nothing about authenticity."""
    header = _protected_header(copy, frozenset({COPY_TYPE}))
    parsed = CopyHeader(
        kid=_field(header, "kid", str),
        ck_id=_b64_field(header, "ck", CK_ID_SIZE),
        mission_id=_b64_field(header, "mis", MISSION_ID_SIZE),
        party_a=check_identity(_field(header, "a", str)),
        party_b=check_identity(_field(header, "b", str)),
        holder=check_identity(_field(header, "for", str)),
        not_before=_field(header, "nbf", int),
        not_after=_field(header, "exp", int),
    )
    if parsed.holder not in (parsed.party_a, parsed.party_b):
        raise KeysetError("CK copy holder is not a party of the CK")
    return parsed


@dataclass(frozen=True, slots=True, repr=False)
class DiscoveryKey:
    """The mission's discovery key for one epoch (keys the HMAC tags agents advertise)."""

    mission_id: bytes
    epoch: int
    not_before: int
    not_after: int
    key: bytes

    def __repr__(self) -> str:
        return f"DiscoveryKey(epoch={self.epoch}, [{self.not_before}, {self.not_after}))"


def wrap_discovery_key(
    key: DiscoveryKey, *, holder: str, kid: str, wrap_key: jwk.JWK | bytes
) -> str:
    """Wrap an epoch's discovery key for ``holder`` (same JWE shape as a CK copy)."""
    header = {
        "alg": "A256KW",
        "enc": "A256GCM",
        "typ": DISCOVERY_TYPE,
        "kid": kid,
        "mis": base64url_encode(key.mission_id),
        "ep": key.epoch,
        "for": holder,
        "nbf": key.not_before,
        "exp": key.not_after,
    }
    return _encrypt(wrap_key, header, key.key)


def open_discovery_key(token: SecureElement, copy: str) -> DiscoveryKey:
    """Unwrap an epoch's discovery key through ``token``; the header is trusted after the tag."""
    header = _protected_header(copy, frozenset({DISCOVERY_TYPE}))
    if _field(header, "for", str) != token.info().identity:
        raise KeysetError("discovery key is wrapped for another node")
    return DiscoveryKey(
        mission_id=_b64_field(header, "mis", MISSION_ID_SIZE),
        epoch=_field(header, "ep", int),
        not_before=_field(header, "nbf", int),
        not_after=_field(header, "exp", int),
        key=token.unwrap(copy),
    )


def open_copy(token: SecureElement, copy: str) -> CommunicationKeyset:
    """Unwrap a copy through ``token`` and return the authenticated CK.

    The header is only trusted after the token's AES-GCM check succeeded, since
    it is the associated data of that check.
    """
    header = read_copy_header(copy)
    if header.holder != token.info().identity:
        raise KeysetError(f"CK copy is for {header.holder}, not for this token")
    pair_key = token.unwrap(copy)
    return CommunicationKeyset(
        ck_id=header.ck_id,
        pair_key=pair_key,
        mission_id=header.mission_id,
        party_a=header.party_a,
        party_b=header.party_b,
        not_before=header.not_before,
        not_after=header.not_after,
    )


def decrypt_copy(copy: str, key: jwk.JWK) -> bytes:
    """Decrypt a wrapped key with a plain JWK (what a token does inside; tokens, tests)."""
    if len(copy) > MAX_COPY_SIZE:
        raise KeysetError("CK copy too large")
    token = jwe.JWE()
    try:
        for part in copy.split("."):
            b64url_decode_strict(part)
        token.deserialize(copy, key=key)
    except (JWException, ValueError, TypeError, RecursionError):
        raise KeysetError("CK copy did not decrypt") from None
    return bytes(token.payload)
