"""Alerts: raised once per minute for the same cause, so a flood cannot grow them."""

from __future__ import annotations

from pathlib import Path

from mesh.agent.agent import ALERT_COALESCE, Agent, AgentConfig
from mesh.sim import Simulation


def test_the_same_refusal_is_alerted_once_per_window(tmp_path: Path) -> None:
    with Simulation(["a", "b"], workdir=tmp_path / "sim") as sim:
        sim.provision()
        node = sim.nodes["a"]
        token, bundle = node.unlock()
        now = [1_000.0]
        agent = Agent(
            AgentConfig(state_dir=node.state, mdns=False), bundle, token, clock=lambda: now[0]
        )
        try:
            for port in range(40000, 40500):  # a stranger, from ever new source ports
                agent._alert(
                    "refused",
                    None,
                    f"refused a handshake from 10.0.0.9:{port}: x",
                    key=("refused", "10.0.0.9", "unknown-ck"),
                )
            agent._alert(
                "refused",
                None,
                "refused a handshake from 10.0.0.8:1: x",
                key=("refused", "10.0.0.8", "unknown-ck"),
            )
            assert len(agent.store.alerts()) == 2
            now[0] += ALERT_COALESCE
            agent._alert(
                "refused",
                None,
                "refused a handshake from 10.0.0.9:1: x",
                key=("refused", "10.0.0.9", "unknown-ck"),
            )
            assert len(agent.store.alerts()) == 3
        finally:
            agent.store.close()
