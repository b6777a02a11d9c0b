"""The agent's clock is the wall clock (CK windows are POSIX times), and it may step.

An NTP correction or an operator setting the time moves it back by hours. Every interval
the agent keeps (the card check every second, dialling backoffs, the next fetch from the
AS, routes, heartbeats, retries) is a time read from that clock, so each is moved by the
same step; they used to wait until the clock came back to where it had been, hours later.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mesh.agent.agent import Agent, AgentConfig
from mesh.sim import Simulation
from mesh.token import TokenAbsent
from mesh.token.software import SoftwareToken

HOURS = 3600.0


def test_a_clock_stepped_back_by_hours_keeps_every_timer_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = Simulation(["a", "b"], workdir=tmp_path / "sim", epoch_hours=12)
    sim.provision(now=time.time() - 6 * HOURS)  # a step back of 3 h stays in this epoch
    token, bundle = sim.nodes["a"].unlock()
    now = time.time()
    clock = [now]
    fetches: list[float] = []
    dials: list[float] = []

    async def source() -> bytes:
        fetches.append(clock[0])
        return sim.nodes["a"].bundle.read_bytes()

    async def dial(*_: object, **__: object) -> bool:
        dials.append(clock[0])
        return False

    async def main() -> None:
        agent = Agent(
            AgentConfig(state_dir=tmp_path / "a", mdns=False),
            bundle,
            token,
            clock=lambda: clock[0],
            bundle_source=source,
        )
        monkeypatch.setattr(agent, "_dial", dial)
        agent.peers["b"].address = ("127.0.0.1", 9)  # (never dialled: _dial is the fake)

        async def tick(seconds: float) -> None:
            clock[0] += seconds
            agent._tick(clock[0])
            for _ in range(5):  # what the tick spawned (the card check runs in a thread)
                await asyncio.sleep(0.01)

        try:
            await tick(0)
            await tick(1.5)
            assert len(fetches) == 1 and agent.refresh.state == "ok"  # the next in an hour
            assert agent.peers["b"].next_dial > clock[0]  # a failed dial: backing off
            assert agent.token_ok

            def pulled(self: SoftwareToken) -> None:
                raise TokenAbsent("no card in reader test")

            monkeypatch.setattr(SoftwareToken, "check_present", pulled)
            clock[0] -= 3 * HOURS  # the clock steps back
            for _ in range(4):
                await tick(1.0)
            assert not agent.token_ok  # the card check went on every second
            monkeypatch.undo()
            monkeypatch.setattr(agent, "_dial", dial)
            for _ in range(4):
                await tick(1.0)
            assert agent.token_ok
            for _ in range(70):
                await tick(1.0)
            assert len(dials) >= 2  # its backoff, not three hours more
            await tick(HOURS)
            assert len(fetches) == 2  # a period after the last fetch, not 4 h
        finally:
            for task in list(agent._tasks):
                task.cancel()
            await asyncio.gather(*agent._tasks, return_exceptions=True)
            agent.store.close()

    try:
        asyncio.run(main())
    finally:
        sim.close()
