"""The app's state as one frozen value, and the pure transitions the agent's events drive.

The App holds one :class:`AppState` in a reactive attribute and replaces it
on every change; screens and widgets only read it ("attributes down").
Every transition here is idempotent where the control API may repeat
itself: a message is keyed by its id and its delivery state only moves
forward (pending < sent < delivered < read), a peer or an alert is keyed by
its identity or id. That is what lets a reconnection replay the events that
arrived while its snapshot was being fetched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from tui.link import Snapshot
from tui.state import (
    AgentEvent,
    AgentInfo,
    Alert,
    AlertUpdate,
    Conversation,
    Delivery,
    EpochUpdate,
    Group,
    Message,
    MessageUpdate,
    Peer,
    PeerUpdate,
    ReceiptUpdate,
)

__all__ = ["MAX_MESSAGES_PER_CONVERSATION", "AppState", "Connection"]

MAX_MESSAGES_PER_CONVERSATION = 500
"""Older messages are dropped from the TUI's memory (the agent keeps them)."""


class Connection(StrEnum):
    """The TUI's connection to its agent, as the status bar reports it."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTED = "reconnected"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True)
class AppState:
    connection: Connection = Connection.CONNECTING
    connection_detail: str = ""
    """Why the agent is unreachable, or where it is being looked for."""
    info: AgentInfo | None = None
    peers: tuple[Peer, ...] = ()
    groups: tuple[Group, ...] = ()
    messages: Mapping[Conversation, tuple[Message, ...]] = field(default_factory=dict)
    alerts: tuple[Alert, ...] = ()
    active: Conversation | None = None

    # -- reading ------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        return self.connection in (Connection.CONNECTED, Connection.RECONNECTED)

    def peer(self, identity: str) -> Peer | None:
        return next((p for p in self.peers if p.identity == identity), None)

    def group(self, name: str) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)

    def conversations(self) -> tuple[Conversation, ...]:
        """Every mate, then every group, then any conversation only known from its messages."""
        known = [Conversation("peer", p.identity) for p in self.peers]
        known += [Conversation("group", g.name) for g in self.groups]
        extra = sorted(set(self.messages) - set(known))
        return (*known, *extra)

    def history(self, conversation: Conversation) -> tuple[Message, ...]:
        return self.messages.get(conversation, ())

    def unread(self, conversation: Conversation) -> int:
        return sum(1 for m in self.history(conversation) if m.unread)

    # -- transitions --------------------------------------------------------------------------

    def with_connection(self, connection: Connection, detail: str = "") -> AppState:
        return dataclasses.replace(self, connection=connection, connection_detail=detail)

    def with_snapshot(self, snapshot: Snapshot, connection: Connection) -> AppState:
        """What the agent says now replaces what the TUI knew; message histories merge.

        Peers and alerts are keyed by identity and id (the widgets draw one row per key), so one
        the agent lists twice is kept once: the last.
        """
        peers = {p.identity: p for p in snapshot.peers}
        alerts = {a.alert_id: a for a in snapshot.alerts}
        return dataclasses.replace(
            self,
            connection=connection,
            connection_detail="",
            info=snapshot.info,
            peers=tuple(sorted(peers.values(), key=lambda p: p.identity)),
            groups=snapshot.groups,
            alerts=tuple(sorted(alerts.values(), key=_alert_order)),
        ).with_messages(snapshot.messages)

    def with_info(self, info: AgentInfo) -> AppState:
        return dataclasses.replace(self, info=info)

    def with_event(self, event: AgentEvent) -> AppState:
        if isinstance(event, PeerUpdate):
            return self.with_peer(event.peer)
        if isinstance(event, MessageUpdate):
            return self.with_messages((event.message,))
        if isinstance(event, ReceiptUpdate):
            return self.with_receipt(event.message_id, event.state)
        if isinstance(event, AlertUpdate):
            return self.with_alert(event.alert)
        if isinstance(event, EpochUpdate):
            if self.info is None:
                return self
            return dataclasses.replace(self, info=dataclasses.replace(self.info, epoch=event.epoch))
        return self  # Lagged: the link worker refetches; nothing to apply here

    def with_peer(self, peer: Peer) -> AppState:
        others = [p for p in self.peers if p.identity != peer.identity]
        return dataclasses.replace(
            self, peers=tuple(sorted([*others, peer], key=lambda p: p.identity))
        )

    def with_messages(self, messages: Iterable[Message]) -> AppState:
        """Add or update messages by id and sender, as the agent keys them (a mate may send
        under another's id); a delivery state never moves backwards."""
        by_conversation = {c: list(ms) for c, ms in self.messages.items()}
        for message in messages:
            thread = by_conversation.setdefault(message.conversation, [])
            key = (message.id, message.direction, message.peer)
            index = next(
                (i for i, m in enumerate(thread) if (m.id, m.direction, m.peer) == key), None
            )
            if index is None:
                thread.append(message)
                continue
            old = thread[index]
            thread[index] = dataclasses.replace(
                message,
                state=max(old.state, message.state, key=lambda s: s.rank),
                read=old.read or message.read,
            )
        return dataclasses.replace(
            self,
            messages={
                c: tuple(sorted(ms, key=lambda m: m.at)[-MAX_MESSAGES_PER_CONVERSATION:])
                for c, ms in by_conversation.items()
            },
        )

    def with_receipt(self, message_id: str, state: Delivery) -> AppState:
        for conversation, thread in self.messages.items():
            for index, message in enumerate(thread):
                if message.id != message_id or message.direction != "out":
                    continue  # (receipts are for messages we sent)
                if message.state.rank >= state.rank:
                    return self
                updated = dataclasses.replace(message, state=state)
                return dataclasses.replace(
                    self,
                    messages={
                        **self.messages,
                        conversation: (*thread[:index], updated, *thread[index + 1 :]),
                    },
                )
        return self

    def with_read(self, conversation: Conversation) -> AppState:
        """The local user has seen every message in ``conversation``."""
        thread = self.history(conversation)
        if not any(m.unread for m in thread):
            return self
        return dataclasses.replace(
            self,
            messages={
                **self.messages,
                conversation: tuple(
                    dataclasses.replace(m, read=True) if m.unread else m for m in thread
                ),
            },
        )

    def with_active(self, conversation: Conversation | None) -> AppState:
        state = dataclasses.replace(self, active=conversation)
        return state if conversation is None else state.with_read(conversation)

    def with_alert(self, alert: Alert) -> AppState:
        others = [a for a in self.alerts if a.alert_id != alert.alert_id]
        return dataclasses.replace(self, alerts=tuple(sorted([*others, alert], key=_alert_order)))

    def without_alert(self, alert_id: int) -> AppState:
        return dataclasses.replace(
            self, alerts=tuple(a for a in self.alerts if a.alert_id != alert_id)
        )


def _alert_order(alert: Alert) -> tuple[float, int]:
    """Oldest first, by latest time: an alert whose cause came again moves up to the top."""
    return (alert.at, alert.alert_id)
