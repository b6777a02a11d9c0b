"""The main screen: status bar, peers, conversations, chat, input, alerts, footer.

The screen owns no state of its own: it mirrors the App's ``state`` and
``now`` into its reactives, and every widget is data-bound to those
("attributes down"). What the operator does goes back up as messages.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer

from tui.model import AppState
from tui.widgets import AlertsPanel, ChatInput, ChatLog, ConversationList, PeersPanel, StatusBar

__all__ = ["MainScreen"]


class MainScreen(Screen[None]):
    # Textual declares these as (mutable) instance attributes, hence the noqa.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # noqa: RUF012
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]  # noqa: RUF012

    state: reactive[AppState] = reactive(AppState)
    now: reactive[float] = reactive(0.0)

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status").data_bind(MainScreen.state, MainScreen.now)
        yield PeersPanel(id="peers").data_bind(MainScreen.state, MainScreen.now)
        with Horizontal(id="body"):
            yield ConversationList(id="conversations").data_bind(MainScreen.state)
            with Vertical(id="chat"):
                yield ChatLog(id="log").data_bind(MainScreen.state, MainScreen.now)
                yield ChatInput(id="input")
        yield AlertsPanel(id="alerts").data_bind(MainScreen.state, MainScreen.now)
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "state", self._mirror_state)
        self.watch(self.app, "now", self._mirror_now)
        self.query_one(ConversationList).focus()

    def _mirror_state(self, state: AppState) -> None:
        self.state = state
        self.set_class(not state.online, "-offline")

    def _mirror_now(self, now: float) -> None:
        self.now = now
