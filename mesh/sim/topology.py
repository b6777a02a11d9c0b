"""Who can reach whom in a simulated mission (pure: identities in, pairs out).

``full``: every pair in direct reach. ``line``: each node reaches only its
neighbours in order, so a message from one end to the other crosses every
node. ``squads``: squads of :data:`SQUAD_SIZE` in full reach internally, and
the squad leaders (first of each squad) in a line. A cut list removes pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

__all__ = ["SQUAD_SIZE", "TOPOLOGIES", "reachable_pairs", "squads_of"]

TOPOLOGIES = ("full", "line", "squads")
SQUAD_SIZE = 5

Pair = frozenset[str]


def squads_of(identities: Sequence[str]) -> list[list[str]]:
    return [list(identities[i : i + SQUAD_SIZE]) for i in range(0, len(identities), SQUAD_SIZE)]


def reachable_pairs(
    topology: str, identities: Sequence[str], cuts: Iterable[tuple[str, str]] = ()
) -> set[Pair]:
    names = list(identities)
    pairs: set[Pair] = set()
    if topology == "full":
        pairs = {frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1 :]}
    elif topology == "line":
        pairs = {frozenset(p) for p in itertools.pairwise(names)}
    elif topology == "squads":
        groups = squads_of(names)
        for squad in groups:
            pairs |= {frozenset((a, b)) for i, a in enumerate(squad) for b in squad[i + 1 :]}
        leaders = [squad[0] for squad in groups]
        pairs |= {frozenset(p) for p in itertools.pairwise(leaders)}
    else:
        raise ValueError(f"unknown topology {topology!r}: choose one of {', '.join(TOPOLOGIES)}")
    return pairs - {frozenset(c) for c in cuts}
