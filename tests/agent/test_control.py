"""The control API over a real Unix socket: what a client that misbehaves, or a failing store,
costs the agent and its other clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from mesh.agent.agent import Agent, AgentConfig
from mesh.agent.client import ControlClient, ControlUnavailable, RequestFailed
from mesh.agent.control import EVENT_QUEUE, MAX_LINE, ControlServer
from mesh.sim import Simulation


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A socket path short enough for AF_UNIX (pytest's tmp_path can pass 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="snrctl-", dir="/tmp"))
    try:
        yield folder / "control.sock"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _dispatch(op: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"subscribed": True} if op == "subscribe" else {}


def test_a_subscriber_that_stopped_reading_does_not_break_the_agents_stop(
    socket_path: Path,
) -> None:
    """`snrmesh events | less`, paused: its queue fills; stopping the agent raised QueueFull."""

    async def run() -> None:
        server = ControlServer(socket_path, _dispatch)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        writer.write(b'{"id": 1, "op": "subscribe"}\n')
        await writer.drain()
        assert b'"subscribed":true' in await reader.readline()
        # never read again: the socket's buffers fill, then the queue
        for i in range(20 * EVENT_QUEUE):
            server.broadcast("peer", peer={"identity": "b", "text": "x" * 500})
            if i % 100 == 0:
                await asyncio.sleep(0)
        await server.close()
        assert not socket_path.exists()
        writer.close()

    asyncio.run(run())


def test_a_store_that_fails_is_an_internal_error_not_a_dropped_client(
    make_sim: Callable[..., Simulation],
) -> None:
    """A full disk made mark_read raise sqlite3's error through the control server: the client
    was dropped unanswered (the TUI took it for a lost agent, reconnected, marked the open chat
    read again, and so on) and a traceback went to the log."""
    sim = make_sim(["a", "b"])
    sim.provision()
    node = sim.nodes["a"]

    async def run() -> list[dict[str, Any]]:
        token, bundle = node.unlock()
        config = AgentConfig(state_dir=node.state, listen=("127.0.0.1", node.port), mdns=False)
        agent = Agent(config, bundle, token)
        await agent.start()
        try:
            agent.store.db.execute("PRAGMA query_only = ON")  # every write fails, as on a full disk
            reader, writer = await asyncio.open_unix_connection(str(node.control))
            answers = []
            for request in (
                {"id": 1, "op": "mark_read", "peer": "b"},
                {"id": 2, "op": "send", "to": "b", "text": "hello"},
                {"id": 3, "op": "hello"},
            ):
                writer.write(json.dumps(request).encode() + b"\n")
                answers.append(json.loads(await asyncio.wait_for(reader.readline(), 10)))
            writer.close()
            return answers
        finally:
            await agent.stop()

    mark_read, send, hello = asyncio.run(run())
    assert mark_read["id"] == 1 and mark_read["error"]["code"] == "internal", mark_read
    assert send["id"] == 2 and send["error"]["code"] == "internal", send
    assert hello["id"] == 3 and hello["ok"] is True  # the same connection, still answered


def test_the_line_limit_counts_the_newline(socket_path: Path) -> None:
    """docs/agent.md: over 64 KiB, ``\\n`` included, is too large (and the TUI stops at that
    size); a line one byte longer was still answered."""

    async def answer(size: int) -> dict[str, Any]:
        start, end = b'{"op": "hello", "pad": "', b'"}\n'
        line = start + b"x" * (size - len(start) - len(end)) + end
        assert len(line) == size
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        writer.write(line)
        await writer.drain()
        answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
        writer.close()
        return cast(dict[str, Any], answer)

    async def run() -> None:
        server = ControlServer(socket_path, _dispatch)
        await server.start()
        try:
            assert (await answer(MAX_LINE))["ok"] is True
            for size in (MAX_LINE + 1, MAX_LINE + 2):
                refused = await answer(size)
                assert refused["ok"] is False and refused["error"]["code"] == "too-large", size
        finally:
            await server.close()

    asyncio.run(run())


def test_snrmesh_events_gives_up_on_an_agent_that_never_answers_subscribe(
    socket_path: Path,
) -> None:
    """Every other command says "did not answer in time" after its timeout; 'snrmesh events'
    dropped the timeout before subscribing and hung, silent, on a wedged agent."""
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wedged.bind(str(socket_path))
    wedged.listen()  # connections complete in the backlog; nobody ever reads or answers
    outcome: list[BaseException | None] = []

    def follow() -> None:
        try:
            with ControlClient(str(socket_path), timeout=0.5) as client:
                client.events()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    thread.join(5)
    wedged.close()  # (lets a hung client go)
    thread.join(5)
    assert outcome and isinstance(outcome[0], ControlUnavailable), outcome
    assert "did not answer in time" in str(outcome[0])


@pytest.mark.parametrize("how", ["too-long", "reset"])
def test_the_cli_client_turns_a_broken_connection_into_its_own_errors(
    socket_path: Path, how: str
) -> None:
    """A request the agent refuses before it has all of it (the agent closes: a broken pipe
    under ``sendall``), or a connection reset, was an OSError traceback from the client."""
    loop = asyncio.new_event_loop()
    server = ControlServer(socket_path, _dispatch)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        with ControlClient(str(socket_path)) as client:
            if how == "too-long":
                with pytest.raises((RequestFailed, ControlUnavailable)) as caught:
                    client.request("hello", pad="x" * (64 * MAX_LINE))
                if isinstance(caught.value, RequestFailed):
                    assert caught.value.code == "too-large"
            else:
                client._sock.setsockopt(  # (a reset from our side, the same error either way)
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                client._sock.shutdown(socket.SHUT_RDWR)
                with pytest.raises(ControlUnavailable):
                    client.request("hello")
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
