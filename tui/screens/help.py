"""The help screen: every key, and what each symbol and colour on the main screen means."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from tui.format import ALERT_LABEL, DELIVERY_MARK, LINK_SYMBOL
from tui.state import AlertKind, Delivery, LinkState

__all__ = ["HelpScreen"]

KEYS = (
    ("F1  ?", "this help (Esc closes it)"),
    ("Ctrl+P", "command palette: open a chat, dismiss an alert, change theme…"),
    ("F2", "peers panel: Enter opens the chat with the mate under the cursor"),
    ("F3", "chats: Enter opens the conversation"),
    ("F4", "alerts: d or Delete dismisses the highlighted alert"),
    ("F5", "write: Enter sends, ↑/↓ walk through what you sent"),
    ("Tab  Shift+Tab", "next / previous panel"),
    ("Ctrl+Q", "quit (the agent keeps running)"),
)

LINK_MEANING = {
    LinkState.DIRECT: "direct link, session up",
    LinkState.RELAYED: "reached through a relay (shown as 'via X')",
    LinkState.OFFLINE: "not reachable; messages wait as pending",
    LinkState.REFUSED: "handshake refused: possible man-in-the-middle or stranger",
}

DELIVERY_MEANING = {
    Delivery.PENDING: "queued by the agent (mate offline or not yet sent)",
    Delivery.SENT: "sent on the link",
    Delivery.UNDELIVERABLE: "never to be delivered: the mate was revoked",
    Delivery.DELIVERED: "received by the mate's agent",
    Delivery.READ: "read by the mate",
}

ALERT_MEANING = {
    AlertKind.REFUSED: "a handshake was refused",
    AlertKind.EXPIRING: "a keyset (CK) is about to expire",
    AlertKind.REVOKED: "a node was revoked",
    AlertKind.TOKEN: "the token (secure element) has a problem",
    AlertKind.UPLINK: "no bundle from the Authentication Server (agent --as)",
}


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, expand=True)
    table.add_column(no_wrap=True, style="bold")
    table.add_column(ratio=1)
    for key, meaning in rows:
        table.add_row(key, meaning)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Close"),
        Binding("f1", "app.pop_screen", "Close", show=False),
        Binding("q", "app.pop_screen", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body") as body:
            body.border_title = "snrmesh: help"
            body.border_subtitle = "Esc closes"
            yield Static(
                Text(
                    "The TUI shows what your agent knows and never holds a key. "
                    "Times are UTC; 'seen' is the time since a mate's last heartbeat; "
                    "'CK ends' counts down to the end of the keyset in use with that mate."
                ),
                classes="help-intro",
            )
            yield Static(_table("Keys", list(KEYS)))
            yield Static(
                _table(
                    "Links", [(f"{LINK_SYMBOL[s]} {s.value}", m) for s, m in LINK_MEANING.items()]
                )
            )
            yield Static(
                _table(
                    "Your messages", [(DELIVERY_MARK[d], m) for d, m in DELIVERY_MEANING.items()]
                )
            )
            yield Static(_table("Alerts", [(ALERT_LABEL[k], m) for k, m in ALERT_MEANING.items()]))
        yield Footer()
