"""A mate's restart is told by its boot id (``Status.boot``), not by its sessions.

A relayed mate that restarted lost its end of our session to it, so ours must be
replaced; a mate that merely opened a new session to us (its own had failed) did
not, and taking that for a restart had two agents replacing each other's sessions
for ever (a review of the first fix found the loop).
"""

from __future__ import annotations

from pathlib import Path

from mesh.agent.agent import Agent, AgentConfig
from mesh.protocol import Connection, Role
from mesh.sim import Simulation
from mesh.wire import BOOT_ID_SIZE, Status, encode


def test_only_a_new_boot_id_replaces_our_relayed_session(tmp_path: Path) -> None:
    with Simulation(["a", "b"], workdir=tmp_path / "sim") as sim:
        sim.provision()
        node = sim.nodes["a"]
        token, bundle = node.unlock()
        agent = Agent(AgentConfig(state_dir=node.state, mdns=False), bundle, token)
        try:
            ours = Connection(config=agent._relay_config, keys=agent.keys, role=Role.INITIATOR)
            agent.relayed.outgoing["b"] = ours

            def status(boot: bytes | None) -> None:
                message = Status("operator", agent.clock(), boot=boot)
                agent._handle_messages("b", [encode(message)], link=None)

            first, second = b"\x01" * BOOT_ID_SIZE, b"\x02" * BOOT_ID_SIZE
            for boot in (None, first, first, None, first):  # first seen, then the same start
                status(boot)
                assert agent.relayed.outgoing.get("b") is ours
            status(second)  # b started again
            assert "b" not in agent.relayed.outgoing  # (no route here to open a new one)
            assert agent.peers["b"].boot == second
        finally:
            agent.store.close()
    # and every status this agent sends carries its own boot id, the same all along
    own = agent._status_message().boot
    assert own is not None and len(own) == BOOT_ID_SIZE and agent._status_message().boot == own
