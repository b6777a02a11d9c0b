"""Full-jitter backoff: how every snrmesh client waits before trying again.

Attempt *n* waits a random time in ``[0, min(cap, base * 2**n)]`` ("full jitter",
as AWS's architecture blog named it): nodes that failed together -- a fleet that
lost its AS, mates that lost a link -- do not come back in lockstep. Used by the
agent's dialling and its fetches from an AS, and by the AS's client.
"""

from __future__ import annotations

import random

__all__ = ["full_jitter"]

_MAX_DOUBLINGS = 64  # past this, base * 2**n is above any cap (and stays a float)


def full_jitter(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """A random wait in ``[0, min(cap, base * 2**attempt)]`` seconds."""
    bound = min(cap, base * 2 ** min(attempt, _MAX_DOUBLINGS))
    return (rng or random).uniform(0.0, bound)
