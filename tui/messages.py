"""The messages that carry news up to the App ("attributes down, messages up").

Widgets post what the operator asked for (:class:`ConversationSelected`,
:class:`SendRequested`, :class:`DismissRequested`); the App's agent worker
posts what the agent said. The App alone turns them into requests and into
a new :class:`~tui.model.AppState`.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from tui.link import Snapshot
from tui.state import AgentEvent, Conversation

__all__ = [
    "AgentEventReceived",
    "AgentLost",
    "AgentNotice",
    "AgentUnreachable",
    "ConversationSelected",
    "DismissRequested",
    "SendRequested",
    "SnapshotLoaded",
]


@dataclass
class ConversationSelected(Message):
    """The operator opened a conversation (from the list, the peers panel or the palette)."""

    conversation: Conversation


@dataclass
class SendRequested(Message):
    """The operator submitted a line in the chat input."""

    text: str


@dataclass
class DismissRequested(Message):
    """The operator dismissed an alert."""

    alert_id: int


@dataclass
class SnapshotLoaded(Message):
    """A (re)connection fetched the agent's state."""

    snapshot: Snapshot
    reconnected: bool


@dataclass
class AgentEventReceived(Message):
    event: AgentEvent


@dataclass
class AgentUnreachable(Message):
    """A connection attempt failed; the next one is in ``retry_in`` seconds."""

    reason: str
    retry_in: float


@dataclass
class AgentLost(Message):
    """An established connection ended."""

    reason: str


@dataclass
class AgentNotice(Message):
    """Something the operator should see once, e.g. a malformed object the agent sent."""

    text: str
    severity: str = "warning"
