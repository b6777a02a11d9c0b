"""Connections that never speak: they cannot keep mates out, nor hold descriptors for good."""

from __future__ import annotations

import asyncio
import contextlib
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


class _Cable:
    """A TCP relay between two agents that can be cut without a FIN or a reset: a mate gone
    out of radio range, or powered off, as the other side's sockets see it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.cut.is_set():
                    await asyncio.Event().wait()  # hold the socket; forward nothing again
                dst.write(data)

        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_an_established_link_that_hears_nothing_is_closed(make_sim: MakeSim) -> None:
    """Each side sends routes every 10 s on every link, so a link that has carried nothing
    for a minute leads nowhere. It stayed up (and ``direct``) until TCP gave up, some
    15 minutes later; a cable cut without a reset left it up for good, so a mate gone out of
    range was never reached through a relay. The clocks run 40 times faster than real time."""
    sim = make_sim(["a", "b"])
    sim.provision()
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    async def run() -> None:
        nonlocal offset
        agents: dict[str, Agent] = {}
        cable = _Cable(("127.0.0.1", sim.nodes["b"].port))
        port = await cable.start()
        for name, peers in (("b", ()), ("a", (f"b@127.0.0.1:{port}",))):
            node = sim.nodes[name]
            token, bundle = node.unlock()
            config = AgentConfig(
                state_dir=node.state,
                listen=("127.0.0.1", node.port),
                mdns=False,
                peers=peers,
            )
            agents[name] = Agent(config, bundle, token, clock=clock)
            await agents[name].start()
        a, b = agents["a"], agents["b"]
        try:

            async def run_clock(seconds: float) -> None:
                nonlocal offset
                for _ in range(int(seconds / 2.0)):
                    offset += 2.0
                    await asyncio.sleep(0.05)

            for _ in range(100):
                if "b" in a.links and "a" in b.links:
                    break
                await asyncio.sleep(0.05)
            link = a.links["b"]
            await run_clock(90.0)  # a healthy link stays, idle or not
            assert a.links.get("b") is link and "a" in b.links
            cable.cut.set()
            await run_clock(90.0)
            assert "b" not in a.links and "a" not in b.links
            assert a.peer_state("b") == ("offline", None)
        finally:
            cable.close()
            for agent in agents.values():
                await agent.stop()

    asyncio.run(run())
