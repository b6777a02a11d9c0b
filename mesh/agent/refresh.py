"""When an agent that can reach an Authentication Server fetches its bundle again.

``snrmesh agent --as HOST:PORT``: a ground station with an uplink, or a squad
before it leaves, fetches its bundle from the AS (``BUNDLE-REQUEST``: a CK with
every mate for this epoch and the next ones, its mates and revocations as the
AS has them now) and takes it in place of the one it runs on, without a
restart. A fetch is due

* at start, and then every ``every`` seconds: new mates, revocations and
  the AS's routine key changes reach the node;
* sooner when a mate lacks a CK for now, or for the next epoch once this one
  ends within ``lead`` seconds -- but not more often than ``lacking_gap``,
  since a CK the AS would not mint stays missing;
* after a failure, at a random time in ``[0, min(cap, base * 2**n)]`` (full
  jitter, as every client of the AS backs off), or after the AS's
  ``retry-after``; after a refusal that asking again will not change, after
  ``every``.

Pure: time is passed in, and the agent does the fetching
(:meth:`mesh.agent.agent.Agent`). The fetch itself is a ``BundleSource`` the
command line builds from the AS's client, so this package does not depend on
the server's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from mesh.backoff import full_jitter
from mesh.errors import MeshError

__all__ = ["BundleSource", "RefreshPolicy", "RefreshSchedule", "UplinkError"]

BundleSource = Callable[[], Coroutine[Any, Any, bytes]]
"""Fetch this node's bundle from its AS; raises :class:`UplinkError`."""


class UplinkError(MeshError):
    """A bundle fetch failed; ``permanent`` when asking again soon would get the same answer."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, permanent: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshPolicy:
    """How often to fetch (seconds); ``snrmesh agent --as-refresh`` sets ``every``."""

    every: float = 3600.0
    lacking_gap: float = 60.0
    lead: float = 3600.0
    base: float = 5.0
    cap: float = 600.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.every) and self.every > 0):
            raise MeshError("the refresh period must be a positive number of seconds")


class RefreshSchedule:
    """The state of fetching: when the next fetch is due, and how the last ones went.

    ``state`` is what ``hello`` reports: ``pending`` (none yet), ``ok`` (the last
    fetch was taken), ``retrying`` (temporary failures, backing off) or
    ``refused`` (the AS said no in a way asking again soon will not change).
    """

    def __init__(self, policy: RefreshPolicy) -> None:
        self.policy = policy
        self.running = False
        self.state = "pending"
        self.failures = 0  # temporary ones in a row, for the backoff
        self.last_success = -math.inf
        self._last_end = -math.inf
        self._next = -math.inf  # the next fetch, at the latest

    def due(self, now: float, *, lacking: Callable[[], bool]) -> bool:
        """Whether to fetch now; ``lacking`` (a look at every mate) is asked only if it decides."""
        if self.running:
            return False
        if now >= self._next:
            return True
        if self.state != "ok":  # backing off, or refused: the lack is no reason to ask sooner
            return False
        gap = min(self.policy.lacking_gap, self.policy.every)
        return now - self._last_end >= gap and lacking()

    def clock_stepped(self, step: float) -> None:
        """The clock moved by ``step`` seconds: the times to come move with it."""
        self._last_end += step
        self._next += step

    def started(self) -> None:
        self.running = True

    def succeeded(self, now: float) -> None:
        self.running = False
        self.state = "ok"
        self.failures = 0
        self.last_success = self._last_end = now
        self._next = now + self.policy.every

    def failed(self, now: float, error: UplinkError, rng: random.Random) -> float:
        """Record a failure; returns the time of the next attempt."""
        self.running = False
        self._last_end = now
        if error.permanent:
            self.state = "refused"
            self.failures = 0
            self._next = now + self.policy.every  # the routine one, a period from now
            return self._next
        self.state = "retrying"
        wait = full_jitter(self.failures, base=self.policy.base, cap=self.policy.cap, rng=rng)
        self.failures += 1
        self._next = now + max(wait, error.retry_after or 0.0)
        return self._next
