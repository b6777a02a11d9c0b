"""The conversation list: one entry per dialogue mate and per group, with unread counts.

The link symbol of a mate is repeated here so the list alone tells who can
be reached; a group is marked ``#``, the open conversation ``▸``. Unread
counts are in brackets so they read without colour. Enter opens the
conversation.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tui.format import LINK_SYMBOL
from tui.messages import ConversationSelected
from tui.model import AppState
from tui.state import Conversation
from tui.widgets.styling import component_style

__all__ = ["ConversationList"]


class ConversationList(OptionList):
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "conversations--direct",
        "conversations--relayed",
        "conversations--offline",
        "conversations--refused",
        "conversations--group",
        "conversations--unread",
        "conversations--active",
    }

    state: reactive[AppState] = reactive(AppState)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: tuple[Text, ...] = ()
        self._active: Conversation | None = None

    def on_mount(self) -> None:
        self.border_title = "Chats"

    def notify_style_update(self) -> None:
        """Prompts carry their own styles: rebuild them when the CSS or theme changes."""
        super().notify_style_update()
        self._shown = ()
        self.call_later(self.watch_state)

    def watch_state(self) -> None:
        if not self.is_mounted:
            return
        conversations = self.state.conversations()
        prompts = tuple(self._prompt(c) for c in conversations)
        if prompts == self._shown:
            return
        highlighted = self.highlighted_option.id if self.highlighted_option else None
        if self.state.active != self._active:  # opened elsewhere (peers, palette): follow it
            self._active = self.state.active
            highlighted = self._active.key if self._active else highlighted
        self.set_options(Option(p, id=c.key) for c, p in zip(conversations, prompts, strict=True))
        self._shown = prompts
        keys = [c.key for c in conversations]
        if highlighted in keys:
            self.highlighted = keys.index(highlighted)
        elif self.state.active is not None and self.state.active.key in keys:
            self.highlighted = keys.index(self.state.active.key)
        elif keys:
            self.highlighted = 0
        total = sum(self.state.unread(c) for c in conversations)
        self.border_title = f"Chats ({total} unread)" if total else "Chats"

    def _prompt(self, conversation: Conversation) -> Text:
        style = partial(component_style, self)
        if conversation.kind == "group":
            symbol, symbol_style = "#", style("conversations--group")
        else:
            peer = self.state.peer(conversation.name)
            state_name = peer.state.value if peer else "offline"
            symbol = LINK_SYMBOL[peer.state] if peer else "?"
            symbol_style = style(f"conversations--{state_name}")
        text = Text(no_wrap=True, overflow="ellipsis")
        active = conversation == self.state.active
        text.append("▸" if active else " ", style("conversations--active"))
        text.append(f"{symbol} ", symbol_style)
        text.append(conversation.name, style("conversations--active") if active else "")
        unread = self.state.unread(conversation)
        if unread:
            text.append(f" ({unread})", style("conversations--unread"))
        return text

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.post_message(ConversationSelected(Conversation.from_key(event.option.id)))
