"""Snapshot tests: the main screen at 80x24 and 120x40, the help screen, and a lost agent.

Time is frozen (the app's clock and the scripted agent's data share
``FIXED_NOW``), so countdowns and 'seen' columns are the same on every run.
The agent runs in a thread because ``snap_compare`` gives the app its own
event loop. Regenerate after a deliberate change with
``python3 -m pytest tests/tui/test_snapshots.py --snapshot-update`` and look
at the SVGs before committing them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from tests.tui.conftest import loaded, make_app, wait_until
from tests.tui.fake_agent import AgentThread, FakeAgent
from tui.client import RetryPolicy
from tui.messages import ConversationSelected
from tui.model import Connection
from tui.state import Conversation
from tui.widgets import ChatInput

SnapCompare = Callable[..., bool]

# A fixed path: the socket's path is printed on the screen when the agent is lost.
SNAPSHOT_SOCKET = Path("/tmp/snrmesh-tui-snapshots/control.sock")
STEADY_RETRY = RetryPolicy(first=0.05, factor=1.0, longest=0.05)


@pytest.fixture
def agent() -> Iterator[AgentThread]:
    SNAPSHOT_SOCKET.parent.mkdir(exist_ok=True)
    try:
        with AgentThread(FakeAgent(SNAPSHOT_SOCKET)) as thread:
            yield thread
    finally:
        shutil.rmtree(SNAPSHOT_SOCKET.parent, ignore_errors=True)


async def open_gs1(pilot: Pilot[None]) -> None:
    """Load, open the chat with gs-1 and wait until its unread message is marked read."""
    await loaded(pilot)
    app = pilot.app
    app.post_message(ConversationSelected(Conversation("peer", "gs-1")))
    await wait_until(pilot, lambda: app.state.unread(Conversation("peer", "gs-1")) == 0, "read")
    await pilot.pause(0.1)
    app.screen.query_one(ChatInput).cursor_blink = False


def test_main_screen_80x24(snap_compare: SnapCompare, agent: AgentThread) -> None:
    app = make_app(SNAPSHOT_SOCKET)
    assert snap_compare(app, terminal_size=(80, 24), run_before=open_gs1)


def test_main_screen_120x40(snap_compare: SnapCompare, agent: AgentThread) -> None:
    app = make_app(SNAPSHOT_SOCKET)
    assert snap_compare(app, terminal_size=(120, 40), run_before=open_gs1)


def test_help_screen_80x24(snap_compare: SnapCompare, agent: AgentThread) -> None:
    app = make_app(SNAPSHOT_SOCKET)
    assert snap_compare(app, terminal_size=(80, 24), run_before=loaded, press=["f1"])


def test_agent_lost_80x24(snap_compare: SnapCompare, agent: AgentThread) -> None:
    """The last known state stays, dimmed; the status bar says why and that it retries."""

    async def lose_agent(pilot: Pilot[None]) -> None:
        await loaded(pilot)
        await agent.call(agent.agent.stop())
        app = pilot.app
        await wait_until(pilot, lambda: "retrying" in app.state.connection_detail, "a retry")
        assert app.state.connection is Connection.DISCONNECTED
        app.clear_notifications()  # the toast would cover the screen being documented

    app = make_app(SNAPSHOT_SOCKET, retry=STEADY_RETRY)
    assert snap_compare(app, terminal_size=(80, 24), run_before=lose_agent)
