"""Discovery tags: how an agent names itself on the LAN without telling outsiders who it is.

An agent advertises ``tag = base32(HMAC-SHA256(discovery key of the epoch,
"snrmesh-discovery-tag" || identity))[:20]``. Mission members hold the
epoch's discovery key (wrapped for their token in their bundle), so they map a
tag back to an identity by computing the tags of their own dialogue mates;
outsiders see a random-looking name that changes every epoch and cannot link
two epochs' tags of the same node.
"""

from __future__ import annotations

import base64

from mesh.crypto import hmac_sha256

__all__ = ["TAG_LENGTH", "discovery_tag", "tag_map"]

TAG_LENGTH = 20  # base32 characters: 100 bits
_LABEL = b"snrmesh-discovery-tag"


def discovery_tag(key: bytes, identity: str) -> str:
    digest = hmac_sha256(key, _LABEL + identity.encode("utf-8"))
    return base64.b32encode(digest).decode("ascii").lower()[:TAG_LENGTH]


def tag_map(key: bytes, identities: list[str] | tuple[str, ...] | frozenset[str]) -> dict[str, str]:
    """``{tag: identity}`` for the identities we are willing to recognise."""
    return {discovery_tag(key, identity): identity for identity in identities}
