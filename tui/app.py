"""The snrmesh terminal UI: a Textual app attached to the local agent's control socket.

The App is the only owner of state. A long-lived worker keeps the
connection to the agent (connect with backoff, subscribe, load, then turn
each pushed event into a message); short workers carry out what the
operator asks (send, mark read, dismiss). Handlers replace
:attr:`SnrmeshApp.state` with a new :class:`~tui.model.AppState`, and the
screens and widgets follow it. The TUI never holds a key or a token: all
it can do is what the control API offers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.screen import Screen

from tui.client import RetryPolicy, connect_with_retry
from tui.commands import MeshCommands
from tui.errors import AgentProtocolError, AgentUnavailable, RequestRefused, TuiError
from tui.link import AgentLink
from tui.messages import (
    AgentEventReceived,
    AgentLost,
    AgentNotice,
    AgentUnreachable,
    ConversationSelected,
    DismissRequested,
    SendRequested,
    SnapshotLoaded,
)
from tui.model import AppState, Connection
from tui.screens import HelpScreen, MainScreen
from tui.state import (
    AlertKind,
    AlertUpdate,
    BundleReplaced,
    Conversation,
    Lagged,
    Message,
    MessageUpdate,
    PeerUpdate,
)
from tui.widgets import ChatInput

__all__ = ["DEFAULT_RETRY", "SnrmeshApp"]

DEFAULT_RETRY = RetryPolicy()
_GONE = ("unknown-peer", "unknown-group")  # history of a name the bundle no longer has

TICK_SECONDS = 1.0
"""How often countdowns and 'seen' times are refreshed."""


class SnrmeshApp(App[None]):
    """``snrmesh tui``: peers, chat, status and alerts of the agent at ``control_path``."""

    CSS_PATH = "snrmesh.tcss"
    TITLE = "snrmesh"
    COMMANDS = App.COMMANDS | {MeshCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("f2", "focus('peers')", "Peers"),
        Binding("f3", "focus('conversations')", "Chats"),
        Binding("f4", "focus('alerts')", "Alerts"),
        Binding("f5", "focus('input')", "Write"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    state: reactive[AppState] = reactive(AppState)
    now: reactive[float] = reactive(0.0)

    def __init__(
        self,
        control_path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__()
        self.control_path = os.fspath(control_path)
        self.clock = clock
        self.retry = retry
        self._link: AgentLink | None = None

    def get_default_screen(self) -> Screen[None]:
        return MainScreen()

    def on_mount(self) -> None:
        self.now = self.clock()
        self.state = self.state.with_connection(
            Connection.CONNECTING, f"looking for the agent at {self.control_path}"
        )
        self.set_interval(TICK_SECONDS, self._tick)
        self._keep_linked()

    def _tick(self) -> None:
        self.now = self.clock()

    # -- the connection to the agent ----------------------------------------------------------

    @work(exclusive=True, group="agent-link", name="agent link")
    async def _keep_linked(self) -> None:
        """Connect, load, follow events; on any loss, say so and start again. Never returns."""
        lost = False
        while True:
            client = await connect_with_retry(self.control_path, self.retry, self._unreachable)
            link = AgentLink(client)
            try:
                async with client:
                    snapshot = await link.load()
                    self._link = link
                    self.post_message(SnapshotLoaded(snapshot, reconnected=lost))
                    while True:
                        try:
                            event = await link.next_event()
                        except AgentProtocolError as exc:
                            if client.closed:
                                raise
                            self.post_message(AgentNotice(f"ignored a malformed event: {exc}"))
                            continue
                        if isinstance(event, Lagged | BundleReplaced):  # refetch it all
                            self.post_message(SnapshotLoaded(await link.fetch(), reconnected=False))
                        elif event is not None:
                            self.post_message(AgentEventReceived(event))
            except TuiError as exc:
                self._link = None
                lost = True
                self.post_message(AgentLost(str(exc)))
            await asyncio.sleep(self.retry.first)

    def _unreachable(self, error: AgentUnavailable, retry_in: float) -> None:
        self.post_message(AgentUnreachable(str(error), retry_in))

    def on_snapshot_loaded(self, message: SnapshotLoaded) -> None:
        connection = Connection.RECONNECTED if message.reconnected else Connection.CONNECTED
        self.state = self.state.with_snapshot(message.snapshot, connection)
        if message.reconnected:
            self.notify("Reconnected to the agent.", title="Agent")
        for problem in message.snapshot.problems:
            self.notify(f"The agent sent a malformed object: {problem}", severity="warning")
        active = self.state.active
        if active is not None:
            self._fetch_history(active)

    def on_agent_event_received(self, message: AgentEventReceived) -> None:
        event = message.event
        before = self.state
        self.state = before.with_event(event)
        if isinstance(event, MessageUpdate):
            incoming = event.message
            if incoming.unread and incoming.conversation == self.state.active:
                self._mark_read(incoming.conversation)
        elif isinstance(event, PeerUpdate):
            old = before.peer(event.peer.identity)
            if old is None or old.state is not event.peer.state:
                self._refresh_hello()  # the link count is only in hello
        elif isinstance(event, AlertUpdate):
            alert = event.alert
            if alert.kind is AlertKind.TOKEN:
                self._refresh_hello()
            who = f" {alert.peer}" if alert.peer else ""
            if not alert.repeats:  # (a repeat updates the panel's line, with its count)
                self.notify(
                    alert.message, title=f"Alert: {alert.kind.value}{who}", severity="warning"
                )

    def on_agent_unreachable(self, message: AgentUnreachable) -> None:
        connection = Connection.CONNECTING if self.state.info is None else Connection.DISCONNECTED
        self.state = self.state.with_connection(
            connection, f"{message.reason}; retrying in {message.retry_in:g}s"
        )

    def on_agent_lost(self, message: AgentLost) -> None:
        self.state = self.state.with_connection(Connection.DISCONNECTED, message.reason)
        self.notify(
            f"Lost the agent ({message.reason}). Reconnecting; the last known state stays shown.",
            title="Agent",
            severity="error",
        )

    def on_agent_notice(self, message: AgentNotice) -> None:
        self.notify(message.text, severity="warning")

    # -- what the operator asks for -----------------------------------------------------------

    def on_conversation_selected(self, message: ConversationSelected) -> None:
        conversation = message.conversation
        had_unread = self.state.unread(conversation) > 0
        self.state = self.state.with_active(conversation)
        if had_unread:
            self._mark_read(conversation)
        self._fetch_history(conversation)
        for chat_input in self.screen.query(ChatInput):
            chat_input.focus()

    def on_send_requested(self, message: SendRequested) -> None:
        conversation = self.state.active
        if conversation is None:
            self.notify("Open a conversation first (F3).", severity="warning")
            return
        self._send(conversation, message.text)

    def on_dismiss_requested(self, message: DismissRequested) -> None:
        self._dismiss(message.alert_id)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def _linked(self, doing: str) -> AgentLink | None:
        if self._link is None:
            self.notify(f"Not connected to the agent: cannot {doing}.", severity="error")
        return self._link

    @work(group="requests")
    async def _send(self, conversation: Conversation, text: str) -> None:
        link = self._linked("send (the text is in the input history: press ↑)")
        if link is None:
            return
        try:
            message_id, delivery = await link.send(conversation, text)
        except TuiError as exc:
            self.notify(f"Not sent: {exc}. The text is in the input history (↑).", severity="error")
            return
        self.state = self.state.with_messages(
            (
                Message(
                    id=message_id,
                    direction="out",
                    peer=conversation.name if conversation.kind == "peer" else "",
                    group=conversation.name if conversation.kind == "group" else None,
                    text=text,
                    at=self.clock(),
                    state=delivery,
                    read=False,
                ),
            )
        )

    @work(group="requests")
    async def _mark_read(self, conversation: Conversation) -> None:
        self.state = self.state.with_read(conversation)
        link = self._link
        if link is None:
            return
        try:
            await link.mark_read(conversation)
        except TuiError as exc:
            self.notify(f"Could not mark {conversation.name} read: {exc}", severity="warning")

    @work(group="requests")
    async def _fetch_history(self, conversation: Conversation) -> None:
        link = self._link
        if link is None:
            return
        try:
            messages, problems = await link.history(conversation)
        except TuiError as exc:
            gone = isinstance(exc, RequestRefused) and exc.code in _GONE
            if gone and conversation == self.state.active:
                # a new bundle dropped the mate (or group), and nothing was ever said there:
                # close it, or every refetch would say this again
                self.state = self.state.with_active(None)
                self.notify(
                    f"{conversation.name} is no longer in the bundle and has no history: "
                    "closed the conversation.",
                    severity="warning",
                )
            else:
                self.notify(
                    f"Could not load {conversation.name}'s history: {exc}", severity="warning"
                )
            return
        self.state = self.state.with_messages(messages)
        if conversation == self.state.active and self.state.unread(conversation):
            self._mark_read(conversation)
        for problem in problems:
            self.notify(f"The agent sent a malformed message: {problem}", severity="warning")

    @work(group="requests")
    async def _dismiss(self, alert_id: int) -> None:
        link = self._linked("dismiss the alert")
        if link is None:
            return
        try:
            await link.dismiss_alert(alert_id)
        except TuiError as exc:
            self.notify(f"Could not dismiss alert {alert_id}: {exc}", severity="error")
            return
        self.state = self.state.without_alert(alert_id)

    @work(exclusive=True, group="hello")
    async def _refresh_hello(self) -> None:
        link = self._link
        if link is None:
            return
        try:
            info = await link.hello()
        except TuiError:
            return  # a lost connection is reported by the link worker
        self.state = self.state.with_info(info)
