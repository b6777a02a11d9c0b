"""The chat log of the open conversation: time, sender, text and delivery mark per message.

Delivery marks are words and ticks, not colour alone: ``◷ pending`` (queued,
e.g. for an offline mate), ``✓`` sent, ``✓✓`` delivered, ``✓✓ read``, ``✗ undeliverable``
(its mate was revoked first). The log
re-renders only when the open conversation's messages change, and then
scrolls to the newest.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.widgets import Static

from tui.format import DELIVERY_MARK, LINK_SYMBOL, clock_time, link_label
from tui.model import AppState
from tui.state import Conversation, Delivery, LinkState, Message
from tui.widgets.styling import component_style

__all__ = ["ChatLog"]

ME = "me"


class ChatLog(VerticalScroll):
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "chat--time",
        "chat--me",
        "chat--them",
        "chat--pending",
        "chat--mark",
        "chat--read",
        "chat--undeliverable",
        "chat--hint",
    }

    state: reactive[AppState] = reactive(AppState)
    now: reactive[float] = reactive(0.0)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, can_focus=True)
        self._shown: tuple[Conversation | None, tuple[Message, ...], int] | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="chat-text")

    def notify_style_update(self) -> None:
        """What is shown carries its own styles: render it again when the CSS or theme changes."""
        super().notify_style_update()
        self._shown = None
        self.call_later(self._sync)

    def watch_state(self) -> None:
        self._sync()

    def watch_now(self) -> None:
        self._sync()

    def _sync(self) -> None:
        if not self.is_mounted:
            return
        state = self.state
        active = state.active
        messages = state.history(active) if active else ()
        shown = (active, messages, int(self.now // 86400))  # times gain a date past midnight
        self.border_title = self._title()
        if shown == self._shown:
            return
        self._shown = shown
        self.query_one("#chat-text", Static).update(self._render_messages(active, messages))
        self.scroll_end(animate=False)

    def _title(self) -> str:
        active = self.state.active
        if active is None:
            return "Chat"
        if active.kind == "group":
            group = self.state.group(active.name)
            members = ", ".join(group.members) if group else "?"
            return f"# {active.name}: {members}"
        peer = self.state.peer(active.name)
        if peer is None:
            return active.name
        title = f"{active.name} ({peer.role}) {LINK_SYMBOL[peer.state]} {link_label(peer)}"
        if peer.state is LinkState.REFUSED and peer.refused_reason:
            title += f": {peer.refused_reason}"
        return title

    def _render_messages(
        self, active: Conversation | None, messages: tuple[Message, ...]
    ) -> RenderableType:
        style = partial(component_style, self)
        if active is None:
            return Text(
                "No conversation open. Pick a mate or a group in Chats (F3) or Peers (F2) "
                "and press Enter.",
                style("chat--hint"),
            )
        if not messages:
            return Text("No messages yet. Type below (F5) and press Enter.", style("chat--hint"))
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True, max_width=12)
        table.add_column(ratio=1, overflow="fold")
        table.add_column(no_wrap=True, justify="right")
        for message in messages:
            mine = message.direction == "out"
            pending = mine and message.state is Delivery.PENDING
            if not mine:
                mark = Text("")
            elif message.state is Delivery.READ:
                mark = Text(DELIVERY_MARK[message.state], style("chat--read"))
            elif pending:
                mark = Text(DELIVERY_MARK[message.state], style("chat--pending"))
            elif message.state is Delivery.UNDELIVERABLE:
                mark = Text(DELIVERY_MARK[message.state], style("chat--undeliverable"))
            else:
                mark = Text(DELIVERY_MARK[message.state], style("chat--mark"))
            table.add_row(
                Text(clock_time(message.at, self.now), style("chat--time")),
                Text(ME if mine else message.peer, style("chat--me" if mine else "chat--them")),
                Text(message.text, style("chat--pending") if pending else ""),
                mark,
            )
        return table
