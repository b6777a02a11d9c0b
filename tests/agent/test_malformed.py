"""A mate's malformed or oversized messages are dropped and logged; the link stays up."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import cbor2
import pytest

from mesh.agent.agent import Agent, AgentConfig
from mesh.agent.client import ControlClient, RequestFailed
from mesh.protocol import Connection, Role
from mesh.sim import Simulation
from mesh.wire import MAX_HOPS, MAX_TEXT, Relay, encode

MakeSim = Callable[..., Simulation]


async def _misbehaving(sim: Simulation, name: str, mate: str) -> Agent:
    """``name``'s agent, started in this process (so the test can misbehave), linked to
    ``mate``'s, which runs as a process."""
    node = sim.nodes[name]
    token, bundle = node.unlock()
    config = AgentConfig(
        state_dir=node.state,
        listen=("127.0.0.1", node.port),
        mdns=False,
        peers=(f"{mate}@127.0.0.1:{sim.nodes[mate].port}",),
    )
    agent = Agent(config, bundle, token)
    await agent.start()
    for _ in range(200):
        if mate in agent.links:
            break
        await asyncio.sleep(0.05)
    return agent


def test_garbage_from_an_authenticated_mate_closes_nothing(make_sim: MakeSim) -> None:
    sim = make_sim(["a", "b"])
    sim.provision()
    sim.start("b", topology=False)

    async def run() -> None:
        agent = await _misbehaving(sim, "a", "b")
        try:
            link = agent.links["b"]
            for junk in (
                b"\xff\x00 not cbor",
                cbor2.dumps({"t": "chat", "id": b"short", "text": "x", "at": 1.0}),
                cbor2.dumps(
                    {"t": "chat", "id": b"i" * 16, "text": "x" * (MAX_TEXT + 1), "at": 1.0}
                ),
                cbor2.dumps({"t": "rcpt", "ids": [b"i" * 16] * 600, "s": "read"}),
                cbor2.dumps({"t": "nonsense"}),
                cbor2.dumps([[[[[]]]]] * 100),
                # CBOR bignums past float's range (they used to close the link: OverflowError)
                cbor2.dumps({"t": "chat", "id": b"i" * 16, "text": "x", "at": 10**400}),
                cbor2.dumps({"t": "status", "role": "r", "at": 1, "pos": [10**400, 0, 0]}),
                cbor2.dumps({"t": "status", "role": "r", "at": 1, "bat": -(10**400)}),
            ):
                link.send(junk)
            await agent._op_send({"to": "b", "text": "still talking"})
            for _ in range(200):
                if agent.store.counts().get("delivered"):
                    break
                await asyncio.sleep(0.05)
            assert agent.store.counts().get("delivered") == 1
            assert agent.links.get("b") is link  # the same link: nothing was closed
        finally:
            await agent.stop()

    asyncio.run(run())
    assert [m["text"] for m in sim.history("b")] == ["still talking"]
    assert sim.peer_states("b") == {"a": "offline"}  # a stopped; b is fine
    log = sim.nodes["b"].log.read_text()
    assert log.count("dropped a malformed message from a") == 9
    assert "Traceback" not in log


def test_hostile_control_lines_get_a_bad_request_answer(make_sim: MakeSim) -> None:
    """The control API answers what it cannot take; it used to drop the client on these."""
    lines = [
        b"[" * 60_000,  # RecursionError in json.loads
        b'{"op": "dismiss_alert", "alert_id": 9223372036854775808}',  # past SQLite's INTEGER
        b'{"op": "dismiss_alert", "alert_id": true}',  # was alert 1
        b'{"op": "history", "peer": "\\ud800"}',  # a lone surrogate: valid JSON, no text
        b'{"op": "mark_read", "peer": "\\ud800"}',
        b'{"op": "set_status", "battery": 1' + b"0" * 400 + b"}",  # an int past float's range
        b'{"op": "set_status", "battery": 1e400}',  # json reads it as inf
        b'{"op": "history", "peer": "b", "group": "all"}',  # was unknown-group
    ]
    sim = make_sim(["a"])
    sim.provision()
    sim.start()
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(sim.nodes["a"].control))
        reader = client.makefile("rb")
        for line in lines:
            client.sendall(line + b"\n")
            answer = json.loads(reader.readline())
            assert answer["ok"] is False and answer["error"]["code"] == "bad-request", answer
        # a name that is no mate and has no history is a typo, not an empty conversation
        for line, code in (
            (b'{"op": "history", "peer": "zulu"}', "unknown-peer"),
            (b'{"op": "history", "group": "nosuch"}', "unknown-group"),
        ):
            client.sendall(line + b"\n")
            answer = json.loads(reader.readline())
            assert answer["ok"] is False and answer["error"]["code"] == code, answer
    # a request line past the agent's limit is answered before it hangs up: 'snrmesh send'
    # with a 70 kB text said only "the agent closed the control connection"
    with ControlClient(str(sim.nodes["a"].control)) as control:
        with pytest.raises(RequestFailed) as refused:
            control.request("send", to="b", text="x" * 70_000)
        assert refused.value.code == "too-large"
    assert sim.nodes["a"].request("alerts") == {"alerts": []}  # the agent is fine
    assert "Traceback" not in sim.nodes["a"].log.read_text()


def test_a_relay_cannot_speak_as_another_mate_with_its_own_ck(make_sim: MakeSim) -> None:
    """b relays for a, and holds a CK with c: a relayed session "from a" under b's CK is refused.

    The relayed listener's source is the identity the relay claims (``Relay.src``); it used to
    take any CK of c's, so b could open a session that c's agent took as a's.
    """
    sim = make_sim(["a", "b", "c"])
    sim.provision()
    sim.start("c", topology=False)

    async def run() -> None:
        agent = await _misbehaving(sim, "b", "c")
        try:
            now = agent.clock()
            keyset = agent.keys.keyset_for("c", now)
            assert keyset is not None
            forged = Connection(config=agent._relay_config, keys=agent.keys, role=Role.INITIATOR)
            forged.connect(keyset.ck.ck_id, now)
            for frame in forged.datagrams_to_send():
                agent.links["c"].send(encode(Relay("a", "c", MAX_HOPS, frame, True)))
            for _ in range(200):
                if "identity-mismatch" in sim.nodes["c"].log.read_text():
                    break
                await asyncio.sleep(0.05)
        finally:
            await agent.stop()

    asyncio.run(run())
    log = sim.nodes["c"].log.read_text()
    assert "refused a relayed handshake from a: identity-mismatch" in log
    assert "relayed session from a up" not in log
