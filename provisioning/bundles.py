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
    "MATES_OF",
    "PERMITTED_PAIRS",
    "REVOKED_MATES",
    "Rows",
    "build_bundle",
    "discovery_key",
    "mates_of",
    "surely_too_many_mates",
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

# one node's dialogue-mate candidates (shared groups, explicit pairs), read by index only
# (groups by member, pairs by a and by b): a bundle is asked over the network, in a store of
# a million meters. MATES_OF keeps those not revoked (nor suspended, for the AS: ``{extra}``);
# REVOKED_MATES the revoked ones, the only revocations this node's bundle needs to list.
_CANDIDATES = """(
        SELECT g2.member AS m FROM groups g1 JOIN groups g2 ON g2.name = g1.name
         WHERE g1.member = ? AND g2.member <> g1.member
        UNION SELECT b FROM pairs WHERE a = ?
        UNION SELECT a FROM pairs WHERE b = ?) AS mates
    JOIN nodes n ON n.identity = mates.m"""
MATES_OF = (
    "SELECT mates.m FROM "
    + _CANDIDATES
    + """
    WHERE n.revoked_at IS NULL{extra}
      AND NOT EXISTS (SELECT 1 FROM nodes r WHERE r.identity = ? AND r.revoked_at IS NOT NULL)
    LIMIT ?"""
)
REVOKED_MATES = "SELECT mates.m FROM " + _CANDIDATES + " WHERE n.revoked_at IS NOT NULL LIMIT ?"

# an upper bound of one node's mates (pairs and group entries, duplicates counted), each part
# cut at its LIMIT: a head-end with a million meters is told "too many" without reading them
MATE_ENTRIES = """
    SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM pairs WHERE a = ? LIMIT ?) AS pa)
         + (SELECT COUNT(*) FROM (SELECT 1 FROM pairs WHERE b = ? LIMIT ?) AS pb)
         + (SELECT COUNT(*) FROM (SELECT 1 FROM groups g1 JOIN groups g2 ON g2.name = g1.name
                                  WHERE g1.member = ? LIMIT ?) AS gm)"""

Rows = Callable[[str, Sequence[Any]], Iterable[Sequence[Any]]]


def mates_of(
    rows: Rows, identity: str, limit: int | None = None, *, suspended: bool = False
) -> list[str]:
    """``identity``'s dialogue mates, sorted, revoked ones left out (none if it is revoked).

    ``limit``: stop reading after that many (a head-end has a million); sorted here,
    so that the store stops early instead of sorting them all first. ``suspended``:
    leave suspended nodes out too (the AS's store has the column; a desk's may not).
    """
    bound = 2**62 if limit is None else limit  # SQLite and PostgreSQL both take a number
    sql = MATES_OF.format(extra=" AND n.suspended_at IS NULL" if suspended else "")
    return sorted(m for (m,) in rows(sql, (*(identity,) * 4, bound)))


def surely_too_many_mates(rows: Rows, identity: str, limit: int) -> bool:
    """True when ``identity`` has more mate entries than 3 x ``limit`` (reading at most that)."""
    cap = 3 * limit + 1
    ((entries,),) = list(rows(MATE_ENTRIES, (identity, cap) * 3))
    return int(entries) > 3 * limit


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
    suspended: bool = False,
) -> Bundle:
    """``identity``'s bundle from the store (not sealed: the caller seals it under its MAC key).

    ``suspended``: leave suspended mates out (and their CKs), as the AS's issuance does.
    Raises ``ValueError`` for a node with more mates (or revoked ones) than a bundle lists.
    """
    mates = mates_of(rows, identity, MAX_MATES + 1, suspended=suspended)
    revoked = {m for (m,) in rows(REVOKED_MATES, (identity,) * 3 + (MAX_MATES + 1,))}
    if len(mates) > MAX_MATES or len(revoked) > MAX_MATES:
        raise ValueError(f"{identity} has more dialogue mates than a bundle lists ({MAX_MATES})")
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
