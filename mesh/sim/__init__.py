"""Simulated missions: provisioning plus real agent processes on loopback (tests, demos, bench)."""

from __future__ import annotations

from mesh.sim.harness import MAX_RUN_SECONDS, SimError, SimNode, Simulation, free_ports
from mesh.sim.topology import TOPOLOGIES, reachable_pairs

__all__ = [
    "MAX_RUN_SECONDS",
    "TOPOLOGIES",
    "SimError",
    "SimNode",
    "Simulation",
    "free_ports",
    "reachable_pairs",
]
