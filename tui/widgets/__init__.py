"""The main screen's widgets; each takes the app state as attributes and posts messages up."""

from __future__ import annotations

from tui.widgets.alerts_panel import AlertsPanel
from tui.widgets.chat_input import ChatInput
from tui.widgets.chat_log import ChatLog
from tui.widgets.conversation_list import ConversationList
from tui.widgets.peers_panel import PeersPanel
from tui.widgets.status_bar import StatusBar

__all__ = ["AlertsPanel", "ChatInput", "ChatLog", "ConversationList", "PeersPanel", "StatusBar"]
