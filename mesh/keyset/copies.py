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

from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import CK_ID_SIZE, MISSION_ID_SIZE, CommunicationKeyset, check_identity
from mesh.token.interface import SecureElement

__all__ = [
    "COPY_TYPE",
    "MAX_COPY_SIZE",
    "CopyHeader",
    "decrypt_copy",
    "open_copy",
    "read_copy_header",
    "wrap_copy",
]

COPY_TYPE = "snrmesh-ck"
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
            "ck": base64url_encode(self.ck_id),
            "mis": base64url_encode(self.mission_id),
            "a": self.party_a,
            "b": self.party_b,
            "for": self.holder,
            "nbf": self.not_before,
            "exp": self.not_after,
        }


def wrap_copy(ck: CommunicationKeyset, *, holder: str, kid: str, wrap_key: jwk.JWK) -> str:
    """Wrap ``ck``'s pair key for ``holder`` under the JWK of its token's ``WRAP`` slot."""
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
    token = jwe.JWE(ck.pair_key, protected=json.dumps(header.to_json(), separators=(",", ":")))
    token.add_recipient(wrap_key)
    return str(token.serialize(compact=True))


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


def read_copy_header(copy: str) -> CopyHeader:
    """Parse a copy's protected header (bounded, typed); says nothing about authenticity."""
    if not isinstance(copy, str) or len(copy) > MAX_COPY_SIZE:
        raise KeysetError("CK copy too large or not text")
    parts = copy.split(".")
    if len(parts) != _JWE_PARTS:
        raise KeysetError("CK copy is not a JWE compact serialization")
    try:
        header = json.loads(base64url_decode(parts[0]))
    except (ValueError, UnicodeDecodeError):
        raise KeysetError("CK copy header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise KeysetError("CK copy header is not a JSON object")
    if (header.get("alg"), header.get("enc"), header.get("typ")) != (
        "A256KW",
        "A256GCM",
        COPY_TYPE,
    ):
        raise KeysetError("CK copy must be typ snrmesh-ck with alg A256KW, enc A256GCM")
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
    """Decrypt a copy with a plain JWK (what a token does inside; used by tokens and tests)."""
    if len(copy) > MAX_COPY_SIZE:
        raise KeysetError("CK copy too large")
    token = jwe.JWE()
    try:
        token.deserialize(copy, key=key)
    except (JWException, ValueError, TypeError):
        raise KeysetError("CK copy did not decrypt") from None
    return bytes(token.payload)
