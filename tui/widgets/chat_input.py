"""The chat input: one line, Enter sends, Up/Down walk through what was sent before.

The history also holds lines that failed to send (agent unreachable, text
too long), so nothing typed is lost: Up brings it back.
"""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.widgets import Input

from tui.messages import SendRequested
from tui.state import MAX_TEXT_CHARS

__all__ = ["MAX_HISTORY", "ChatInput"]

MAX_HISTORY = 100
"""Lines kept for Up/Down."""


class ChatInput(Input):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "history(-1)", "Previous", show=False),
        Binding("down", "history(1)", "Next", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            placeholder="Type a message; Enter sends, ↑/↓ history",
            max_length=MAX_TEXT_CHARS,
            id=id,
        )
        self.history: list[str] = []
        self._position: int | None = None
        self._draft = ""

    def action_history(self, step: int) -> None:
        """Step through sent lines; stepping past the newest gives back the unsent draft."""
        if not self.history:
            return
        if self._position is None:
            if step > 0:
                return
            self._draft = self.value
            position = len(self.history) - 1
        else:
            position = self._position + step
        if position < 0:
            position = 0
        if position >= len(self.history):
            self._position = None
            self.value = self._draft
        else:
            self._position = position
            self.value = self.history[position]
        self.cursor_position = len(self.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text:
            return
        if not self.history or self.history[-1] != text:
            self.history.append(text)
            del self.history[:-MAX_HISTORY]
        self._position = None
        self._draft = ""
        self.value = ""
        self.post_message(SendRequested(text))
