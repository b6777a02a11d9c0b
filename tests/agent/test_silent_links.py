"""Connections that never speak: they cannot keep mates out, nor hold descriptors for good."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from mesh.agent.agent import Agent, AgentConfig
from mesh.protocol.listener import DEFAULT_MAX_HALF_OPEN, SILENT_GRACE
from mesh.sim import Simulation

MakeSim = Callable[..., Simulation]
FLOOD = 100


def _closed(sock: socket.socket) -> bool:
    """Has the agent closed this connection (EOF or reset), without waiting?"""
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        return False
    except ConnectionError:
        pass
    return True


def test_a_flood_of_silent_connections_neither_keeps_a_mate_out_nor_leaks(
    make_sim: MakeSim,
) -> None:
    """100 connections to a that never send a byte (64 may wait half-open, the rest are
    refused): once they have sat silent for the grace, b links up at once, the oldest silent
    one closed to make room, and the rest are closed once past the handshake timeout.
    Before, b was refused until a timeout freed a slot, and every silent socket stayed open
    at a for good (a file descriptor each)."""
    sim = make_sim(["a", "b"])
    sim.provision()
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    async def run() -> None:
        nonlocal offset
        a_node, b_node = sim.nodes["a"], sim.nodes["b"]
        token, bundle = a_node.unlock()
        listen = ("127.0.0.1", a_node.port)
        a = Agent(
            AgentConfig(state_dir=a_node.state, listen=listen, mdns=False),
            bundle,
            token,
            clock=clock,
        )
        await a.start()
        flood: list[socket.socket] = []
        b: Agent | None = None
        try:
            for _ in range(FLOOD):
                sock = socket.create_connection(listen, timeout=5)
                sock.setblocking(False)
                flood.append(sock)
            await asyncio.sleep(0.5)  # a accepts them all: 64 wait, the rest are refused
            offset = SILENT_GRACE  # the 64 have sat silent long enough to make room
            token, bundle = b_node.unlock()
            b_config = AgentConfig(
                state_dir=b_node.state,
                listen=("127.0.0.1", b_node.port),
                mdns=False,
                peers=(f"a@127.0.0.1:{a_node.port}",),
            )
            b = Agent(b_config, bundle, token, clock=clock)
            await b.start()
            for _ in range(100):  # b's first dial gets in (its backoff would be seconds)
                if "b" in a.links:
                    break
                await asyncio.sleep(0.03)
            assert "b" in a.links
            await asyncio.sleep(0.2)
            dropped = sum(_closed(sock) for sock in flood)
            assert dropped >= FLOOD - DEFAULT_MAX_HALF_OPEN + 1  # room for b, too
            offset = 11.0 + SILENT_GRACE  # past the handshake timeout (10 s): the rest closed
            a._tick(clock())
            await asyncio.sleep(0.2)
            assert all(_closed(sock) for sock in flood)
            assert a._all_links == {a.links["b"]}
        finally:
            for sock in flood:
                sock.close()
            if b is not None:
                await b.stop()
            await a.stop()

    asyncio.run(run())
