"""The control server alone, over a real Unix socket: what clients that misbehave cost the agent."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.agent.control import EVENT_QUEUE, ControlServer


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
