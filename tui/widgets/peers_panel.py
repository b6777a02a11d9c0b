"""The peers panel: every dialogue mate with link, heartbeat, position, battery and CK countdown.

A table with one row per mate, keyed by identity. Rows are updated in place
when only their cells change (every second, for the countdowns) and rebuilt
only when mates come or go, so the cursor stays on the mate it was on.
Enter opens the chat with the mate under the cursor.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import DataTable

from tui.format import LINK_SYMBOL, battery, countdown, link_label, position, since
from tui.messages import ConversationSelected
from tui.model import AppState
from tui.state import Conversation, LinkState, Peer
from tui.widgets.styling import component_style

__all__ = ["CK_WARNING_SECONDS", "LOW_BATTERY", "STALE_HEARTBEAT_SECONDS", "PeersPanel"]

CK_WARNING_SECONDS = 15 * 60
"""A CK closer than this to expiry is shown as a warning."""
LOW_BATTERY = 20
STALE_HEARTBEAT_SECONDS = 5 * 60
NOTE_WIDTH = 40
"""Status texts and refusal reasons are cut here; the chat title shows them whole."""

COLUMNS = (
    ("mate", "mate"),
    ("role", "role"),
    ("link", "link"),
    ("seen", "seen"),
    ("batt", "batt"),
    ("ck", "CK ends"),
    ("pos", "position"),
    ("note", "note"),
)


class PeersPanel(DataTable[Text]):
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "peers--direct",
        "peers--relayed",
        "peers--offline",
        "peers--refused",
        "peers--warn",
        "peers--dim",
    }

    state: reactive[AppState] = reactive(AppState)
    now: reactive[float] = reactive(0.0)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._keys: tuple[str, ...] = ()

    def on_mount(self) -> None:
        self.border_title = "Peers"
        self.show_cursor = False
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def notify_style_update(self) -> None:
        """Cells carry their own styles: rebuild them when the CSS or theme changes."""
        super().notify_style_update()
        self._keys = ()
        self.call_later(self._sync)

    def watch_state(self) -> None:
        self._sync()

    def watch_now(self) -> None:
        self._sync()

    def _sync(self) -> None:
        if not self.is_mounted:
            return
        peers = self.state.peers
        keys = tuple(p.identity for p in peers)
        self.border_title = f"Peers ({len(peers)})"
        if keys == self._keys:
            for peer in peers:
                for (column, _), cell in zip(COLUMNS, self._cells(peer), strict=True):
                    if self.get_cell(peer.identity, column) != cell:
                        self.update_cell(peer.identity, column, cell, update_width=True)
            return
        current = self._keys[self.cursor_row] if 0 <= self.cursor_row < len(self._keys) else None
        self.clear()
        for peer in peers:
            self.add_row(*self._cells(peer), key=peer.identity)
        self._keys = keys
        if current in keys:
            self.move_cursor(row=keys.index(current), animate=False)

    def _cells(self, peer: Peer) -> tuple[Text, ...]:
        now, style = self.now, partial(component_style, self)
        link_style = style(f"peers--{peer.state.value}")
        seen_stale = peer.last_seen is None or now - peer.last_seen > STALE_HEARTBEAT_SECONDS
        ck_warn = peer.ck_expires is not None and peer.ck_expires - now < CK_WARNING_SECONDS
        low = peer.battery is not None and peer.battery < LOW_BATTERY
        note = peer.refused_reason if peer.state is LinkState.REFUSED else peer.text
        return (
            Text(f"{LINK_SYMBOL[peer.state]} {peer.identity}", style=link_style),
            Text(peer.role),
            Text(link_label(peer), style=link_style),
            Text(since(now, peer.last_seen), style=style("peers--dim") if seen_stale else ""),
            Text(battery(peer.battery), style=style("peers--warn") if low else ""),
            Text(countdown(now, peer.ck_expires), style=style("peers--warn") if ck_warn else ""),
            Text(position(peer.position)),
            Text(_cut(note or "", NOTE_WIDTH), style=style("peers--dim")),
        )

    def on_focus(self) -> None:
        self.show_cursor = True  # a cursor only where the keys go

    def on_blur(self) -> None:
        self.show_cursor = False

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(ConversationSelected(Conversation("peer", event.row_key.value)))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
