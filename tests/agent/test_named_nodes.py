"""Nodes named on the agent's command line (``--peer NODE@``, ``--block NODE``) are held to the
bundle: a name that is not a dialogue mate would otherwise do nothing, silently."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mesh.agent.agent import Agent, AgentConfig
from mesh.errors import MeshError
from mesh.sim import Simulation


def _agent(tmp_path: Path, **config: object) -> Agent:
    with Simulation(["a", "b"], workdir=tmp_path / "sim") as sim:
        sim.provision()
        node = sim.nodes["a"]
        token, bundle = node.unlock()
        return Agent(
            AgentConfig(state_dir=node.state, mdns=False, **config),  # type: ignore[arg-type]
            bundle,
            token,
        )


def test_blocking_a_node_that_is_not_a_mate_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="snrmesh.agent"):
        agent = _agent(tmp_path, blocked=frozenset({"b", "nosuch"}))
    agent.store.close()
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["--block nosuch: not a dialogue mate in this bundle (no link to block)"]


def test_a_peer_named_as_a_node_that_is_not_a_mate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="nosuch is not a dialogue mate"):
        _agent(tmp_path, peers=("nosuch@127.0.0.1:7717",))
    agent = _agent(tmp_path / "2", peers=("b@127.0.0.1:7717", "127.0.0.1"))
    agent.store.close()
    assert [(s.identity, s.host, s.port) for s in agent.static] == [
        ("b", "127.0.0.1", 7717),
        (None, "127.0.0.1", 7717),
    ]
