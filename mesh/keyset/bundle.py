"""Node bundles: everything a node carries into the field, in one file.

A bundle is a JWS compact serialization (RFC 7515, ``alg`` ``HS256``) whose
``kid`` names the node token's ``MAC`` slot key: only that token can check it,
so a single flipped byte, a bundle for another token or one made before a
rekey is refused. The payload (JSON) lists the mission, the node, its dialogue
mates and groups, revoked identities, and for each CK the node's own wrapped
copy and the peer's wrapped copy (the *ticket* it hands a peer that lacks the
CK). There is no plaintext key anywhere in the file. Field by field:
``docs/keysets.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jwcrypto import jwk, jws
from jwcrypto.common import base64url_decode, base64url_encode

from mesh.keyset.copies import MAX_COPY_SIZE, b64url_decode_strict
from mesh.keyset.errors import BundleError, BundleStale, KeysetError
from mesh.keyset.keyset import CK_ID_SIZE, MISSION_ID_SIZE, check_identity
from mesh.keyset.mission import MAX_EPOCHS, Mission
from mesh.token.interface import SecureElement, Slot

__all__ = [
    "BUNDLE_MAGIC",
    "BUNDLE_TYPE",
    "MAX_BUNDLE_SIZE",
    "Bundle",
    "BundleDiscoveryKey",
    "BundleKeyset",
    "Mate",
    "open_bundle",
    "seal_bundle",
]

BUNDLE_TYPE = "snrmesh-bundle"
BUNDLE_VERSION = 1
MAX_BUNDLE_SIZE = 64 * 1024 * 1024
BUNDLE_MAGIC = b"eyJ"  # how every bundle begins: a JWS compact serialization, base64url of '{"'
MAX_KEYSETS = 200_000
MAX_MATES = 20_000
MAX_GROUPS = 1_000
MAX_HEADER_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Mate:
    identity: str
    role: str


@dataclass(frozen=True, slots=True)
class BundleKeyset:
    """One CK as the bundle lists it: our copy, and the peer's copy (ticket)."""

    ck_id: bytes
    peer: str
    not_before: int
    not_after: int
    own: str
    ticket: str


@dataclass(frozen=True, slots=True)
class BundleDiscoveryKey:
    """An epoch's mission discovery key, wrapped for this node's token."""

    epoch: int
    not_before: int
    not_after: int
    wrapped: str


@dataclass(frozen=True, slots=True)
class Bundle:
    mission: Mission
    identity: str
    role: str
    token_id: bytes
    issued_at: int
    mates: tuple[Mate, ...]
    groups: Mapping[str, tuple[str, ...]]
    revoked: frozenset[str]
    keysets: tuple[BundleKeyset, ...]
    discovery: tuple[BundleDiscoveryKey, ...] = ()

    def keysets_with(self, peer: str) -> tuple[BundleKeyset, ...]:
        return tuple(k for k in self.keysets if k.peer == peer)

    def to_json(self) -> dict[str, Any]:
        m = self.mission
        return {
            "typ": BUNDLE_TYPE,
            "v": BUNDLE_VERSION,
            "issued": self.issued_at,
            "mission": {
                "id": base64url_encode(m.mission_id),
                "name": m.name,
                "start": m.start,
                "end": m.end,
                "epoch": m.epoch_seconds,
            },
            "node": {"id": self.identity, "role": self.role, "token": self.token_id.hex()},
            "mates": [{"id": mate.identity, "role": mate.role} for mate in self.mates],
            "groups": {name: list(members) for name, members in self.groups.items()},
            "revoked": sorted(self.revoked),
            "keysets": [
                {
                    "ck": base64url_encode(k.ck_id),
                    "peer": k.peer,
                    "nbf": k.not_before,
                    "exp": k.not_after,
                    "own": k.own,
                    "ticket": k.ticket,
                }
                for k in self.keysets
            ],
            "discovery": [
                {"ep": d.epoch, "nbf": d.not_before, "exp": d.not_after, "key": d.wrapped}
                for d in self.discovery
            ],
        }


def seal_bundle(bundle: Bundle, *, kid: str, mac_key: bytes) -> bytes:
    """Serialise and MAC a bundle (desk side: it holds a copy of the token's MAC key)."""
    payload = json.dumps(bundle.to_json(), separators=(",", ":"))
    signer = jws.JWS(payload.encode())
    signer.add_signature(
        jwk.JWK(kty="oct", k=base64url_encode(mac_key)),
        alg="HS256",
        protected=json.dumps({"alg": "HS256", "typ": BUNDLE_TYPE, "kid": kid}),
    )
    return str(signer.serialize(compact=True)).encode("ascii")


# -- parsing (hostile input) --------------------------------------------------------------------


def _get(obj: Any, name: str, kind: type) -> Any:
    if not isinstance(obj, dict):
        raise BundleError("bundle payload is malformed (expected an object)")
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"bundle field {name!r} missing or not {kind.__name__}")
    return value


def _b64(obj: Any, name: str, size: int) -> bytes:
    try:
        raw: bytes = base64url_decode(_get(obj, name, str))
    except ValueError:
        raise BundleError(f"bundle field {name!r} is not base64url") from None
    if len(raw) != size:
        raise BundleError(f"bundle field {name!r} must be {size} bytes")
    return raw


def _bounded_list(obj: Any, name: str, limit: int) -> list[Any]:
    value: list[Any] = _get(obj, name, list)
    if len(value) > limit:
        raise BundleError(f"bundle field {name!r} has more than {limit} entries")
    return value


def _copy(obj: Any, name: str) -> str:
    value: str = _get(obj, name, str)
    if len(value) > MAX_COPY_SIZE:
        raise BundleError(f"bundle field {name!r} is too large")
    return value


def _parse_payload(doc: Any) -> Bundle:
    if _get(doc, "typ", str) != BUNDLE_TYPE or _get(doc, "v", int) != BUNDLE_VERSION:
        raise BundleError("not a snrmesh bundle of a supported version")
    m = _get(doc, "mission", dict)
    mission = Mission(
        mission_id=_b64(m, "id", MISSION_ID_SIZE),
        name=_get(m, "name", str),
        start=_get(m, "start", int),
        end=_get(m, "end", int),
        epoch_seconds=_get(m, "epoch", int),
    )
    node = _get(doc, "node", dict)
    try:
        token_id = bytes.fromhex(_get(node, "token", str))
    except ValueError:
        raise BundleError("bundle token id is not hex") from None
    groups_doc = _get(doc, "groups", dict)
    if len(groups_doc) > MAX_GROUPS:
        raise BundleError(f"bundle lists more than {MAX_GROUPS} groups")
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in groups_doc.items():
        if not isinstance(members, list) or len(members) > MAX_MATES:
            raise BundleError(f"bundle group {name!r} is malformed")
        groups[check_identity(name)] = tuple(check_identity(_str(x)) for x in members)
    return Bundle(
        mission=mission,
        identity=check_identity(_get(node, "id", str)),
        role=_get(node, "role", str),
        token_id=token_id,
        issued_at=_get(doc, "issued", int),
        mates=tuple(
            Mate(check_identity(_get(x, "id", str)), _get(x, "role", str))
            for x in _bounded_list(doc, "mates", MAX_MATES)
        ),
        groups=groups,
        revoked=frozenset(
            check_identity(_str(x)) for x in _bounded_list(doc, "revoked", MAX_MATES)
        ),
        keysets=tuple(
            BundleKeyset(
                ck_id=_b64(k, "ck", CK_ID_SIZE),
                peer=check_identity(_get(k, "peer", str)),
                not_before=_get(k, "nbf", int),
                not_after=_get(k, "exp", int),
                own=_copy(k, "own"),
                ticket=_copy(k, "ticket"),
            )
            for k in _bounded_list(doc, "keysets", MAX_KEYSETS)
        ),
        discovery=tuple(
            BundleDiscoveryKey(
                epoch=_get(d, "ep", int),
                not_before=_get(d, "nbf", int),
                not_after=_get(d, "exp", int),
                wrapped=_copy(d, "key"),
            )
            for d in _bounded_list(doc, "discovery", MAX_EPOCHS)
        ),
    )


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise BundleError("bundle lists a non-text identity")
    return value


def _split(raw: bytes) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """Return (header, signing input, payload bytes, tag) of a JWS compact serialization."""
    if len(raw) > MAX_BUNDLE_SIZE:
        raise BundleError(f"bundle is larger than {MAX_BUNDLE_SIZE} bytes")
    parts = raw.strip().split(b".")
    if len(parts) != 3 or len(parts[0]) > MAX_HEADER_SIZE:
        raise BundleError("not a snrmesh bundle (not a JWS compact serialization)")
    try:
        header = json.loads(b64url_decode_strict(parts[0].decode("ascii")))
        payload = b64url_decode_strict(parts[1].decode("ascii"))
        tag = b64url_decode_strict(parts[2].decode("ascii"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BundleError("bundle is corrupt (bad base64url or header)") from None
    if (
        not isinstance(header, dict)
        or header.get("alg") != "HS256"
        or header.get("typ") != BUNDLE_TYPE
    ):
        raise BundleError("not a snrmesh bundle (wrong JWS header)")
    if not isinstance(header.get("kid"), str):
        raise BundleError("bundle header names no key")
    return header, parts[0] + b"." + parts[1], payload, tag


def open_bundle(raw: bytes, token: SecureElement) -> Bundle:
    """Check a bundle's integrity with ``token`` (PIN already verified) and parse it."""
    header, signing_input, payload, tag = _split(raw)
    info = token.info()
    kid: str = header["kid"]
    if kid != info.kid(Slot.MAC):
        if not kid.startswith(info.token_id.hex() + "."):
            raise BundleError(f"bundle was issued for another token, not {info.identity}'s")
        raise BundleStale(
            f"bundle was made for an older key generation of {info.identity}'s token "
            "(the node was rekeyed: export a new bundle, or fetch one from the AS with "
            "snrmesh as bundle or snrmesh agent --as)"
        )
    if not token.verify_mac(Slot.MAC, signing_input, tag):
        raise BundleError("bundle integrity check failed (modified or corrupt)")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BundleError("bundle payload is not JSON") from None
    try:
        bundle = _parse_payload(doc)
    except KeysetError as exc:
        raise BundleError(f"bundle is malformed: {exc}") from None
    if bundle.identity != info.identity or bundle.token_id != info.token_id:
        raise BundleError("bundle names another node than this token's")
    return bundle
