"""The Communication Keyset (CK): what two dialogue mates share to talk.

A CK is issued by the provisioning desk (or, later, an Authentication Server)
for one pair of nodes and one epoch of a mission. Its ``ck_id`` is random, not
derived from names, so that it reveals nothing on the wire where it travels in
the clear. The pair key is the Noise PSK of the session handshake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.keyset.errors import KeysetError

__all__ = [
    "CK_ID_SIZE",
    "MAX_IDENTITY_LENGTH",
    "MISSION_ID_SIZE",
    "PAIR_KEY_SIZE",
    "CommunicationKeyset",
    "check_identity",
]

CK_ID_SIZE = 16
PAIR_KEY_SIZE = 32
MISSION_ID_SIZE = 16
MAX_IDENTITY_LENGTH = 64
# a-z or 0-9 first, then a-z, 0-9, '-', '_', '.' (ASCII only: ``re`` classes are literal)
_IDENTITY = re.compile(r"[a-z0-9][a-z0-9_.\-]*")


def check_identity(identity: str) -> str:
    """Node identities are short lowercase names (``alpha-1``): safe in files, logs and headers.

    Checked wherever one enters (every message, CK and copy header), several
    times per AS link: hence one precompiled ``fullmatch``.
    """
    if not identity or len(identity) > MAX_IDENTITY_LENGTH:
        raise KeysetError(f"identity must be 1-{MAX_IDENTITY_LENGTH} characters")
    if _IDENTITY.fullmatch(identity) is None:
        raise KeysetError(f"invalid identity {identity!r}: use a-z, 0-9, '-', '_', '.'")
    return identity


@dataclass(frozen=True, slots=True, repr=False)
class CommunicationKeyset:
    """One CK in the clear, as held in memory by a node that unwrapped its copy.

    ``party_a`` < ``party_b`` (sorted), so a CK does not say who dials whom;
    the handshake prologue binds the actual initiator and responder.
    Times are POSIX seconds; the CK is valid for ``not_before <= t < not_after``.
    """

    ck_id: bytes
    pair_key: bytes
    mission_id: bytes
    party_a: str
    party_b: str
    not_before: int
    not_after: int

    def __post_init__(self) -> None:
        if len(self.ck_id) != CK_ID_SIZE:
            raise KeysetError(f"ck_id must be {CK_ID_SIZE} bytes")
        if len(self.pair_key) != PAIR_KEY_SIZE:
            raise KeysetError(f"pair key must be {PAIR_KEY_SIZE} bytes")
        if len(self.mission_id) != MISSION_ID_SIZE:
            raise KeysetError(f"mission id must be {MISSION_ID_SIZE} bytes")
        check_identity(self.party_a)
        check_identity(self.party_b)
        if not self.party_a < self.party_b:
            raise KeysetError("CK parties must be distinct and sorted")
        if not self.not_before < self.not_after:
            raise KeysetError("CK validity window is empty")

    def __repr__(self) -> str:  # never print the pair key
        return (
            f"CommunicationKeyset(ck_id={self.ck_id.hex()}, {self.party_a}<->{self.party_b}, "
            f"[{self.not_before}, {self.not_after}))"
        )

    def involves(self, identity: str) -> bool:
        return identity in (self.party_a, self.party_b)

    def peer_of(self, identity: str) -> str:
        if identity == self.party_a:
            return self.party_b
        if identity == self.party_b:
            return self.party_a
        raise KeysetError(f"{identity} is not a party of this CK")

    def is_valid_at(self, now: float, *, skew: float = 0.0) -> bool:
        """True when ``now`` lies in the window, widened by ``skew`` seconds on each side."""
        return self.not_before - skew <= now < self.not_after + skew
