"""A node's bundle as the store holds it: the desk's ``export`` and the AS's ``as bundle`` both.

One builder for both writers, so that a bundle fetched from an Authentication
Server is the file the desk would have exported at that moment -- mates and
groups as the store has them, revocations, every CK of the node not yet
expired (its copy and the ticket) and the epochs' discovery keys wrapped under
the node's *current* WRAP key. It reads through ``rows(sql, params)`` with
``?`` placeholders (the AS's PostgreSQL store rewrites them), so the SQL here
is the subset both SQLite and PostgreSQL speak.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import hkdf_sha256
from mesh.keyset.bundle import MAX_MATES, Bundle, BundleDiscoveryKey, BundleKeyset, Mate
from mesh.keyset.copies import DiscoveryKey, wrap_discovery_key
from mesh.keyset.mission import Epoch, Mission

__all__ = [
    "DISCOVERY_SECRET",
    "PERMITTED_PAIRS",
    "Rows",
    "build_bundle",
    "discovery_key",
    "mates_of",
]

DISCOVERY_SECRET = "discovery"  # the store's sealed secret the epochs' discovery keys come from
DISCOVERY_KEY_INFO = b"snrmesh discovery key v1"

# every pair allowed to talk (a shared group or an explicit pair), neither party revoked
PERMITTED_PAIRS = """
    WITH p(a, b) AS (
        SELECT g1.member, g2.member FROM groups g1
          JOIN groups g2 ON g1.name = g2.name AND g1.member < g2.member
        UNION SELECT a, b FROM pairs)
    SELECT a, b FROM p
    WHERE a NOT IN (SELECT identity FROM nodes WHERE revoked_at IS NOT NULL)
      AND b NOT IN (SELECT identity FROM nodes WHERE revoked_at IS NOT NULL)"""

Rows = Callable[[str, Sequence[Any]], Iterable[Sequence[Any]]]


def mates_of(rows: Rows, identity: str) -> list[str]:
    """``identity``'s dialogue mates, sorted, revoked ones left out."""
    return [
        b if a == identity else a
        for a, b in rows(PERMITTED_PAIRS + " AND ? IN (a, b) ORDER BY a, b", (identity,))
    ]


def discovery_key(secret: bytes, mission: Mission, epoch: Epoch) -> DiscoveryKey:
    """The mission's discovery key for ``epoch``: HKDF of the store's discovery secret."""
    key = hkdf_sha256(
        secret,
        salt=mission.mission_id,
        info=DISCOVERY_KEY_INFO + epoch.index.to_bytes(4, "big"),
    )
    return DiscoveryKey(mission.mission_id, epoch.index, epoch.start, epoch.end, key)


def build_bundle(
    rows: Rows,
    *,
    mission: Mission,
    identity: str,
    role: str,
    token_id: bytes,
    wrap_kid: str,
    wrap_key: bytes,
    discovery_secret: bytes,
    now: int,
) -> Bundle:
    """``identity``'s bundle from the store (not sealed: the caller seals it under its MAC key).

    Raises ``ValueError`` for a node with more mates than a bundle may list.
    """
    mates = mates_of(rows, identity)
    if len(mates) > MAX_MATES:
        raise ValueError(f"{identity} has {len(mates)} dialogue mates; a bundle lists {MAX_MATES}")
    revoked = {r[0] for r in rows("SELECT identity FROM nodes WHERE revoked_at IS NOT NULL", ())}
    roles = {}
    for mate in mates:  # one row each: a head-end's store may hold a million other nodes
        for name, mate_role in rows("SELECT identity, role FROM nodes WHERE identity = ?", (mate,)):
            roles[name] = mate_role
    mate_set = set(mates)
    keysets = []
    for ck_id, a, b, nbf, exp, copy_a, copy_b in rows(
        "SELECT ck_id, a, b, not_before, not_after, copy_a, copy_b FROM keysets "
        "WHERE a = ? AND not_after > ? UNION ALL "
        "SELECT ck_id, a, b, not_before, not_after, copy_a, copy_b FROM keysets "
        "WHERE b = ? AND not_after > ? ORDER BY 4, 2, 3",
        (identity, now, identity, now),
    ):
        mine = a == identity
        peer = b if mine else a
        if peer in mate_set:
            own, ticket = (copy_a, copy_b) if mine else (copy_b, copy_a)
            keysets.append(BundleKeyset(bytes(ck_id), peer, nbf, exp, own=own, ticket=ticket))
    groups = {}
    for (name,) in rows(
        "SELECT DISTINCT name FROM groups WHERE member = ? ORDER BY name", (identity,)
    ):
        groups[name] = tuple(
            m
            for (m,) in rows("SELECT member FROM groups WHERE name = ? ORDER BY member", (name,))
            if m not in revoked
        )
    wrapping = jwk.JWK(kty="oct", k=base64url_encode(wrap_key))
    discovery = tuple(
        BundleDiscoveryKey(
            epoch.index,
            epoch.start,
            epoch.end,
            wrap_discovery_key(
                discovery_key(discovery_secret, mission, epoch),
                holder=identity,
                kid=wrap_kid,
                wrap_key=wrapping,
            ),
        )
        for epoch in mission.epochs()
        if epoch.end > now
    )
    return Bundle(
        mission=mission,
        identity=identity,
        role=role,
        token_id=token_id,
        issued_at=now,
        mates=tuple(Mate(m, roles[m]) for m in mates),
        groups=groups,
        revoked=frozenset(revoked),
        keysets=tuple(keysets),
        discovery=discovery,
    )
