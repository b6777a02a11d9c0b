"""Relayed sessions across restarts, in every order: two real agents, one relay in memory.

The agents are real (store, key ring, listener, outbox); only the links are replaced by a
queue of ``Relay`` messages, so the test can restart either side at any point, drop or hold
frames, and count handshakes. A relayed mate's frames come under its identity, so after a
restart the two sides must learn that a session is gone: a node that receives records of a
session it does not hold answers ``SessionGone`` on its own session, and a node whose mate
opened a new session probes its own with a ``Ping`` (``docs/agent.md``).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from pathlib import Path

import pytest

from mesh.agent.agent import Agent, AgentConfig
from mesh.agent.routing import Route
from mesh.protocol import State
from mesh.sim import Simulation
from mesh.wire import Chat, Ping, Relay, encode


class Mission:
    """a and b, each reaching the other through relay "r"; frames wait in ``net``."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.now = time.time()  # inside the provisioned CKs' window
        self.net: deque[Relay] = deque()
        self.agents: dict[str, Agent] = {}
        self.handshakes = 0  # message 1 of new sessions, both ways
        self.loop = asyncio.new_event_loop()  # for what a tick spawns (the token check)
        for name in ("a", "b"):
            self.start(name)

    def start(self, name: str) -> Agent:
        """(Re)start ``name``'s agent on its state folder: what was in memory is gone."""
        old = self.agents.pop(name, None)
        if old is not None:
            old.store.close()
        node = self.sim.nodes[name]
        token, bundle = node.unlock()
        agent = Agent(
            AgentConfig(state_dir=node.state, mdns=False), bundle, token, clock=lambda: self.now
        )
        agent.routing.route = lambda dest: Route(dest, "r", 2)  # type: ignore[method-assign]
        agent._forward = self._forward  # type: ignore[method-assign]
        self.agents[name] = agent
        return agent

    def _forward(self, relay: Relay) -> bool:
        if relay.frame[0] & 0x0F in (0x1, 0x2):
            self.handshakes += 1
        self.net.append(relay)
        return True

    def open(self, name: str) -> None:
        """``name`` opens its relayed session to its mate (as a route appearing does)."""
        self.agents[name]._relay_session("b" if name == "a" else "a", create=True)

    def run(self, limit: int = 2000) -> int:
        """Deliver until quiet; returns the frames moved (a loop would hit ``limit``)."""
        moved = 0
        while self.net and moved < limit:
            relay = self.net.popleft()
            agent = self.agents.get(relay.dst)
            if agent is not None:
                agent._relay_received("r", relay)
            moved += 1
        return moved

    def tick(self, seconds: float, *, only: str | None = None, deliver: bool = True) -> None:
        """Time passes: every agent's housekeeping (or ``only`` one's), then delivery."""
        self.now += seconds

        async def tick_all() -> None:
            for name, agent in self.agents.items():
                if only in (None, name):
                    agent._tick(self.now)
            await asyncio.sleep(0)

        self.loop.run_until_complete(tick_all())
        if deliver:
            self.run()

    def close(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        for agent in self.agents.values():
            agent.store.close()

    def up(self, name: str) -> bool:
        """Does ``name``'s own session reach its mate, who holds it?"""
        mate = "b" if name == "a" else "a"
        ours = self.agents[name].relayed.outgoing.get(mate)
        listener = self.agents[mate].relayed.listener
        theirs = listener.connection(name) if listener is not None else None
        return (
            ours is not None
            and ours.state is State.ESTABLISHED
            and theirs is not None
            and theirs.state is State.ESTABLISHED
            and ours.session_id == theirs.session_id  # the same session, at both ends
        )

    def chat(self, sender: str, text: str) -> bool:
        """Does a chat from ``sender`` reach its mate now (one delivery, no retries)?"""
        mate = "b" if sender == "a" else "a"
        message = Chat(bytes(16), text, self.now)
        sent = self.agents[sender]._send_to(mate, message, create=False)
        self.run()
        return sent and any(
            m.text == text for m in self.agents[mate].store.history(peer=sender, limit=50)
        )


@pytest.fixture
def mission(tmp_path: Path) -> Mission:
    sim = Simulation(["a", "b"], workdir=tmp_path / "sim")
    sim.provision()
    mission = Mission(sim)
    yield mission
    mission.close()
    sim.close()


def _both_up(mission: Mission) -> None:
    mission.open("a")
    mission.open("b")
    assert mission.run() < 2000
    assert mission.up("a") and mission.up("b")


@pytest.mark.parametrize("who", ["a", "b"])
def test_a_restart_of_either_side_is_healed_at_once(mission: Mission, who: str) -> None:
    _both_up(mission)
    mission.tick(1)
    mission.start(who)
    mission.open(who)
    assert mission.run() < 2000  # no loop
    assert mission.up("a") and mission.up("b")
    assert mission.chat("a", "to b") and mission.chat("b", "to a")


def test_restarts_of_both_sides_one_after_the_other_mid_handshake(mission: Mission) -> None:
    """The order a review found stale for ~10 minutes with boot ids: a restarts, its new
    session comes up at b, b's answer is on its way, and b restarts before it lands."""
    _both_up(mission)
    mission.tick(1)
    mission.start("a")
    mission.open("a")
    for _ in range(6):  # a's new session reaches b, and b starts to answer
        relay = mission.net.popleft()
        mission.agents[relay.dst]._relay_received("r", relay)
    mission.net.clear()  # what b had sent is lost with it
    mission.tick(1)
    mission.start("b")
    mission.open("b")
    assert mission.run() < 2000
    for _ in range(3):  # a few heartbeats at most, not the 10-minute rekey
        if mission.up("a") and mission.up("b"):
            break
        mission.tick(5)
    assert mission.up("a") and mission.up("b")
    assert mission.chat("a", "to b") and mission.chat("b", "to a")


def test_a_session_reopened_without_a_restart_leaves_the_other_alone(mission: Mission) -> None:
    """a's own session fails (say its rekey was lost) and a opens a new one: b's stays."""
    _both_up(mission)
    b_session = mission.agents["b"].relayed.outgoing["a"]
    del mission.agents["a"].relayed.outgoing["b"]
    mission.tick(1)
    mission.open("a")
    handshakes = mission.handshakes
    assert mission.run() < 2000
    assert mission.handshakes == handshakes  # (counted when sent: a's one was before)
    assert mission.agents["b"].relayed.outgoing["a"] is b_session
    assert mission.up("a") and mission.up("b")
    mission.tick(5)
    mission.tick(5)
    assert mission.agents["b"].relayed.outgoing["a"] is b_session


def test_no_new_relayed_session_is_accepted_while_the_card_is_out(mission: Mission) -> None:
    """Not even one that would take the place of a live one (a restarted mate's)."""
    _both_up(mission)
    a = mission.agents["a"]
    live = a.relayed.listener.connection("b")  # type: ignore[union-attr]
    a._token_state = "absent"  # the card is pulled out
    mission.tick(1)
    mission.start("b")
    mission.open("b")
    mission.run()
    assert a.relayed.listener.connection("b") is live  # type: ignore[union-attr]
    assert a.relayed.listener.half_open() == 0  # type: ignore[union-attr]
    a._token_state = "ok"  # back in: b's retries get through
    for _ in range(6):
        if mission.up("a") and mission.up("b"):
            break
        mission.tick(2)
    assert mission.up("a") and mission.up("b")


def _heals_within(mission: Mission, seconds: float) -> float:
    """Tick until both directions are up again (the same session at both ends): how long."""
    start = mission.now
    while mission.now - start <= seconds:
        if mission.up("a") and mission.up("b"):
            return mission.now - start
        mission.tick(5)
    raise AssertionError(f"not healed within {seconds} s")


def test_a_restart_whose_key_confirmation_is_lost_heals_in_a_minute(mission: Mission) -> None:
    """b restarts, and its first records (key confirmation, status) are lost: a's candidate
    expires, b's session is unreadable at a and a's is unknown at b. Each side's "gone" rides
    a dead session, so a side that said it twice on one session renews its own (a review
    found this stale until the rekey, ~600 s)."""
    _both_up(mission)
    mission.tick(1)
    mission.start("b")
    mission.tick(0, only="b", deliver=False)  # its housekeeping at start opens its session
    mission.open("b")  # (the one in its handshake already)
    lost = 0
    while mission.net:
        relay = mission.net.popleft()
        if relay.src == "b" and relay.frame[0] & 0x08 and lost < 10:
            lost += 1  # a record of b's: lost
            continue
        mission.agents[relay.dst]._relay_received("r", relay)
    assert lost
    assert _heals_within(mission, 120) <= 90  # two heartbeats, then one handshake
    assert mission.chat("a", "to b") and mission.chat("b", "to a")


def test_a_restart_while_the_mates_card_is_out_heals_once_it_is_back(mission: Mission) -> None:
    """b's new session cannot come up while a's card is out, and times out: a's records then
    reach a b that holds nothing of a's, and has no session to say it on, so it opens one."""
    _both_up(mission)
    a = mission.agents["a"]
    a._token_state = "absent"
    a._token_checking = True  # (keep it out: the tick would look for the token again)
    mission.tick(1)
    mission.start("b")
    mission.open("b")
    mission.run()
    for _ in range(12):  # longer than a handshake's timeout
        mission.tick(1)
    a._token_state, a._token_checking = "ok", False
    assert _heals_within(mission, 120) <= 90
    assert mission.chat("a", "to b") and mission.chat("b", "to a")


@pytest.mark.parametrize("seed", range(int(os.environ.get("RESTART_FUZZ_SEEDS", "12"))))
def test_restarts_loss_duplicates_and_reordering_always_converge_without_a_loop(
    mission: Mission, seed: int
) -> None:
    """Random restarts of either side, 15 % of frames lost, some held back and released
    later, duplicated, reordered; then a quiet network: both directions come up, and then
    no more handshakes happen (a loop would go on). ``RESTART_FUZZ_SEEDS=60`` runs more."""
    rng = random.Random(seed)
    _both_up(mission)
    held: list[Relay] = []

    def deliver(limit: int, drop: float) -> None:
        for _ in range(limit):
            if not mission.net:
                return
            index = rng.randrange(len(mission.net)) if rng.random() < 0.3 else 0
            relay = mission.net[index]
            del mission.net[index]
            if rng.random() < drop:
                continue
            for _ in range(2 if rng.random() < 0.1 else 1):
                mission.agents[relay.dst]._relay_received("r", relay)

    for _ in range(rng.randrange(3, 12)):
        roll = rng.random()
        if roll < 0.25:
            who = rng.choice("ab")
            mission.start(who)
            mission.open(who)
        elif roll < 0.4 and mission.net:
            held.append(mission.net[rng.randrange(len(mission.net))])
        elif roll < 0.5 and held:
            mission.net.extend(held)
            held.clear()
        else:
            deliver(rng.randrange(0, 8), drop=0.15)
        if rng.random() < 0.5:
            mission.now += rng.choice([0.5, 1, 3, 6])
            mission.tick(0)
    mission.net.extend(held)
    mission.run()
    settled = _heals_within(mission, 240)
    assert settled <= 240
    handshakes = mission.handshakes
    for _ in range(60):  # five minutes of quiet, heartbeats and all
        mission.tick(5)
    assert mission.handshakes == handshakes
    assert mission.up("a") and mission.up("b")


def test_forged_records_under_a_mates_name_never_renew_a_working_session(
    mission: Mission,
) -> None:
    """Whoever routes frames can send records "from b" that fail: a answers "gone" (naming
    b's session it holds, which is b's current one), b says so with a ping, and a's session
    stays. A review found a renewing its session every 10 s for one forged frame per 5 s."""
    _both_up(mission)
    a, b = mission.agents["a"], mission.agents["b"]
    theirs = a.relayed.listener.connection("b")  # type: ignore[union-attr]
    ours = a.relayed.outgoing["b"]
    b.relayed.outgoing["a"].send_data(encode(Ping()), mission.now)  # a genuine record...
    [genuine] = b.relayed.outgoing["a"].datagrams_to_send()
    forged = genuine[:-1] + bytes([genuine[-1] ^ 1])  # ... with its tag broken
    handshakes = mission.handshakes
    for _ in range(60):  # five minutes, one forged frame every 5 s
        a._relay_received("r", Relay("b", "a", 8, forged, True))
        mission.tick(5)
    assert a.relayed.outgoing["b"] is ours and a.relayed.listener.connection("b") is theirs  # type: ignore[union-attr]
    assert mission.handshakes == handshakes
    assert mission.up("a") and mission.up("b")


def test_an_idle_pair_whose_handshakes_were_lost_opens_them_again(mission: Mission) -> None:
    """Both message 1s lost, the route unchanged, nothing to send: housekeeping opens both
    sessions again (they used to stay shut until someone typed)."""
    mission.open("a")
    mission.open("b")
    for _ in range(12):  # every frame lost, retransmits too, past the handshakes' timeout
        mission.net.clear()
        mission.tick(1, deliver=False)
    mission.net.clear()
    assert _heals_within(mission, 120) <= 60


def test_a_mate_that_never_answers_is_retried_with_backoff_not_at_every_tick(
    mission: Mission,
) -> None:
    """b's card stays out for 10 minutes: a keeps trying, with full jitter up to 30 s
    between tries (each try sends message 1 with its retransmits), then heals once it is in."""
    b = mission.agents["b"]
    b._token_state, b._token_checking = "absent", True  # out, and not looked for again
    start = mission.handshakes
    for _ in range(600):
        mission.tick(1, only="a")
    tries = mission.handshakes - start
    assert 20 <= tries <= 400  # 155 here; at every tick, with retransmits, some 2,400
    b._token_state, b._token_checking = "ok", False
    assert _heals_within(mission, 120) <= 90
