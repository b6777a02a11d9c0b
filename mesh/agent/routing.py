"""Who can reach whom: a distance-vector table, pure data (no I/O, no clock).

Each agent tells its link neighbours, over their authenticated link session,
which identities it can forward to and in how many hops (``Routes``). Rules:

* a neighbour's advertisement **replaces** its previous one (no stale routes
  survive a neighbour forgetting them);
* **split horizon**: we never advertise to a neighbour a destination whose
  best route goes through that neighbour, so two nodes cannot bounce a frame;
* hop counts are bounded by :data:`mesh.wire.MAX_HOPS`; routes longer than
  that are dropped, and every relayed frame carries a TTL as a second bound;
* a direct link always wins (1 hop); ties break on the neighbour's identity so
  that every node decides the same way.

Only identities from the mission's dialogue mates list are ever installed:
the agent filters before calling :meth:`RoutingTable.update`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.wire import MAX_HOPS

__all__ = ["Route", "RoutingTable"]


@dataclass(frozen=True, slots=True)
class Route:
    destination: str
    next_hop: str
    hops: int


class RoutingTable:
    def __init__(self, me: str, *, max_hops: int = MAX_HOPS) -> None:
        self.me = me
        self.max_hops = max_hops
        self._neighbours: set[str] = set()
        self._learned: dict[str, dict[str, int]] = {}  # neighbour -> {destination: hops via it}

    @property
    def neighbours(self) -> frozenset[str]:
        return frozenset(self._neighbours)

    def link_up(self, neighbour: str) -> None:
        self._neighbours.add(neighbour)

    def link_down(self, neighbour: str) -> None:
        self._neighbours.discard(neighbour)
        self._learned.pop(neighbour, None)

    def update(self, neighbour: str, reach: tuple[tuple[str, int], ...]) -> bool:
        """Install ``neighbour``'s advertisement; return True if any best route changed."""
        if neighbour not in self._neighbours:
            return False
        before = self.routes()
        self._learned[neighbour] = {
            dest: hops
            for dest, hops in reach
            if dest != self.me and dest != neighbour and hops + 1 <= self.max_hops
        }
        return self.routes() != before

    def route(self, destination: str) -> Route | None:
        if destination in self._neighbours:
            return Route(destination, destination, 1)
        best: Route | None = None
        for neighbour in sorted(self._learned):
            hops = self._learned[neighbour].get(destination)
            if hops is not None and (best is None or hops + 1 < best.hops):
                best = Route(destination, neighbour, hops + 1)
        return best

    def routes(self) -> dict[str, Route]:
        destinations = set(self._neighbours)
        for learned in self._learned.values():
            destinations.update(learned)
        found = {d: self.route(d) for d in sorted(destinations)}
        return {d: r for d, r in found.items() if r is not None}

    def advertisement(self, neighbour: str) -> tuple[tuple[str, int], ...]:
        """What to tell ``neighbour`` (split horizon applied)."""
        return tuple(
            (dest, route.hops)
            for dest, route in self.routes().items()
            if dest != neighbour and route.next_hop != neighbour and route.hops < self.max_hops
        )
