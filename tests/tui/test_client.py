"""The asyncio client over a real Unix socket: ids, errors, events, limits, loss and retry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.tui.fake_agent import FakeAgent
from tui.client import ControlClient, RetryPolicy, connect_with_retry
from tui.errors import AgentProtocolError, AgentUnavailable, LocalRequestError, RequestRefused
from tui.link import AgentLink
from tui.state import MAX_TEXT_CHARS, Conversation, Delivery, MessageUpdate
from tui.wire import MAX_LINE_BYTES


@contextlib.asynccontextmanager
async def raw_server(
    path: Path, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[None]:
    """A misbehaving 'agent' whose every answer is scripted by ``serve``."""
    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def test_requests_are_answered_by_id_and_refusals_carry_the_code(socket_path: Path) -> None:
    async with FakeAgent(socket_path), await ControlClient.connect(socket_path) as client:
        hello, peers = await asyncio.gather(client.request("hello"), client.request("peers"))
        assert hello["identity"] == "alpha-1" and len(peers["peers"]) == 4
        with pytest.raises(RequestRefused) as refused:
            await client.request("send", to="zulu-9", text="hi")
        assert refused.value.code == "unknown-peer"
        with pytest.raises(RequestRefused) as unknown:
            await client.request("launch")
        assert unknown.value.code == "bad-request"


async def test_link_loads_sends_and_follows_events(socket_path: Path) -> None:
    async with FakeAgent(socket_path) as agent, await ControlClient.connect(socket_path) as client:
        link = AgentLink(client)
        snapshot = await link.load()
        assert [p.identity for p in snapshot.peers] == ["alpha-2", "bravo-9", "gs-1", "uav-1"]
        assert len(snapshot.messages) == 9 and len(snapshot.alerts) == 2 and not snapshot.problems
        message_id, state = await link.send(Conversation("group", "squad"), "Moving.")
        assert state is Delivery.PENDING
        event = await link.next_event()
        assert isinstance(event, MessageUpdate) and event.message.id == message_id
        assert event.message.conversation == Conversation("group", "squad")
        assert await link.mark_read(Conversation("peer", "gs-1")) == 1
        history, _ = await link.history(Conversation("peer", "alpha-2"))
        assert [m.text for m in history] == ["Where are you?"]
        await link.dismiss_alert(1)
        with pytest.raises(RequestRefused):
            await link.dismiss_alert(1)
        with pytest.raises(LocalRequestError):
            await link.send(Conversation("peer", "gs-1"), "x" * (MAX_TEXT_CHARS + 1))
        assert not any(r["op"] == "send" and r.get("to") == "gs-1" for r in agent.requests)


async def test_missing_socket_is_unavailable(socket_path: Path) -> None:
    with pytest.raises(AgentUnavailable, match="no agent socket"):
        await ControlClient.connect(socket_path)


async def test_losing_the_agent_fails_waiting_requests_and_the_event_stream(
    socket_path: Path,
) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # read the request, never answer, hang up
        writer.close()

    async with raw_server(socket_path, swallow):
        client = await ControlClient.connect(socket_path)
        with pytest.raises(AgentUnavailable, match="closed"):
            await client.request("hello")
        with pytest.raises(AgentUnavailable):
            await client.next_event()
        with pytest.raises(AgentUnavailable):
            await client.request("peers")
        assert client.closed
        await client.close()


@pytest.mark.parametrize(
    "reply",
    [b"x" * (MAX_LINE_BYTES + 10) + b"\n", b"this is not json\n", b'{"id": 99, "ok": true}\n'],
    ids=["over-64KiB", "not-json", "unknown-id"],
)
async def test_an_agent_breaking_the_protocol_is_blamed(socket_path: Path, reply: bytes) -> None:
    async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(reply)
        await writer.drain()
        await reader.read()  # keep the connection open until the client gives up

    async with raw_server(socket_path, misbehave):
        client = await ControlClient.connect(socket_path)
        with pytest.raises(AgentProtocolError):
            await client.request("hello")
        await client.close()


async def test_connect_with_retry_backs_off_until_the_agent_appears(socket_path: Path) -> None:
    agent = FakeAgent(socket_path)
    waits: list[float] = []
    reasons: list[str] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 4:
            await agent.start()

    def on_retry(error: AgentUnavailable, delay: float) -> None:
        reasons.append(str(error))

    policy = RetryPolicy(first=0.5, factor=2.0, longest=3.0)
    client = await connect_with_retry(socket_path, policy, on_retry, sleep=sleep)
    try:
        assert waits == [0.5, 1.0, 2.0, 3.0]
        assert all("no agent socket" in r for r in reasons)
        assert (await client.request("hello"))["identity"] == "alpha-1"
    finally:
        await client.close()
        await agent.stop()


def test_retry_delay_is_capped_even_after_very_many_attempts() -> None:
    policy = RetryPolicy(first=0.25, factor=2.0, longest=5.0)
    assert [policy.delay(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0]
    assert policy.delay(10_000) == 5.0
