"""The control API's operations, typed: what the app asks its agent, and what it gets back.

:class:`AgentLink` wraps one :class:`~tui.client.ControlClient` and turns each
op of docs/agent.md into a method that returns :mod:`tui.state` values.
:meth:`AgentLink.load` is what every (re)connection does: subscribe first,
then fetch, so no event between the fetch and the subscription is lost
(events that arrive meanwhile are replayed on top of the snapshot; applying
them twice is harmless, see :mod:`tui.model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tui.client import ControlClient
from tui.errors import AgentProtocolError, LocalRequestError
from tui.state import (
    MAX_TEXT_CHARS,
    AgentEvent,
    AgentInfo,
    Alert,
    Conversation,
    Delivery,
    Group,
    Message,
    Peer,
    parse_agent_info,
    parse_alert,
    parse_event,
    parse_groups,
    parse_list,
    parse_message,
    parse_peer,
)

__all__ = ["HISTORY_LIMIT", "AgentLink", "Snapshot"]

HISTORY_LIMIT = 200
"""Messages fetched per conversation (the API's own default)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the agent knows that the TUI shows, as fetched right after subscribing."""

    info: AgentInfo
    peers: tuple[Peer, ...]
    groups: tuple[Group, ...]
    messages: tuple[Message, ...]
    alerts: tuple[Alert, ...]
    problems: tuple[str, ...]
    """Objects the agent sent malformed and that were left out, one reason each."""


class AgentLink:
    """Typed control-API operations over one connection."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    async def hello(self) -> AgentInfo:
        return parse_agent_info(await self.client.request("hello"))

    async def peers(self) -> tuple[list[Peer], list[str]]:
        return parse_list(_field(await self.client.request("peers"), "peers"), parse_peer, "peers")

    async def groups(self) -> tuple[Group, ...]:
        return parse_groups(_field(await self.client.request("groups"), "groups"))

    async def alerts(self) -> tuple[list[Alert], list[str]]:
        result = await self.client.request("alerts")
        return parse_list(_field(result, "alerts"), parse_alert, "alerts")

    async def history(
        self, conversation: Conversation | None = None, *, limit: int = HISTORY_LIMIT
    ) -> tuple[list[Message], list[str]]:
        arguments: dict[str, Any] = {"limit": limit}
        if conversation is not None:
            arguments.update(conversation.request_arguments())
        result = await self.client.request("history", **arguments)
        return parse_list(_field(result, "messages"), parse_message, "messages")

    async def subscribe(self) -> None:
        await self.client.request("subscribe")

    async def send(self, conversation: Conversation, text: str) -> tuple[str, Delivery]:
        """Hand a message to the agent; it answers at once with the id and ``pending``."""
        if not text:
            raise LocalRequestError("nothing to send")
        if len(text) > MAX_TEXT_CHARS:
            raise LocalRequestError(
                f"message is {len(text)} characters; the limit is {MAX_TEXT_CHARS}"
            )
        target = (
            {"to": conversation.name}
            if conversation.kind == "peer"
            else {"group": conversation.name}
        )
        result = await self.client.request("send", text=text, **target)
        message_id = result.get("message_id")
        if not isinstance(message_id, str) or not message_id:
            raise AgentProtocolError("send: the agent returned no message_id")
        try:
            state = Delivery(result.get("state", "pending"))
        except ValueError:
            state = Delivery.PENDING
        return message_id, state

    async def mark_read(self, conversation: Conversation) -> int:
        result = await self.client.request("mark_read", **conversation.request_arguments())
        marked = result.get("marked")
        return marked if isinstance(marked, int) and not isinstance(marked, bool) else 0

    async def dismiss_alert(self, alert_id: int) -> None:
        await self.client.request("dismiss_alert", alert_id=alert_id)

    async def next_event(self) -> AgentEvent | None:
        """The next pushed event, typed; ``None`` for an event name this TUI does not know.

        A malformed event raises :class:`AgentProtocolError` but leaves the connection usable.
        """
        event = await self.client.next_event()
        return parse_event(event.name, event.fields)

    async def load(self) -> Snapshot:
        """Subscribe, then fetch everything the main screen shows."""
        await self.subscribe()
        return await self.fetch()

    async def fetch(self) -> Snapshot:
        """Fetch everything the main screen shows (again, after a ``lagged`` event)."""
        info = await self.hello()
        peers, peer_problems = await self.peers()
        groups = await self.groups()
        alerts, alert_problems = await self.alerts()
        messages, message_problems = await self.history()
        return Snapshot(
            info=info,
            peers=tuple(peers),
            groups=groups,
            messages=tuple(messages),
            alerts=tuple(alerts),
            problems=(*peer_problems, *alert_problems, *message_problems),
        )


def _field(result: Mapping[str, Any], name: str) -> Any:
    if name not in result:
        raise AgentProtocolError(f"the agent's answer has no {name!r}")
    return result[name]
