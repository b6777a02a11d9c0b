"""Command palette entries (Ctrl+P): open any conversation, dismiss any alert, show help."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tui.messages import ConversationSelected, DismissRequested
from tui.model import AppState

__all__ = ["MeshCommands"]


class MeshCommands(Provider):
    """Commands built from the app state at the moment the palette opens."""

    def _commands(self) -> list[tuple[str, Callable[[], object], str]]:
        state: AppState = getattr(self.app, "state", AppState())
        commands: list[tuple[str, Callable[[], object], str]] = []
        for conversation in state.conversations():
            what = "group" if conversation.kind == "group" else "chat with"
            commands.append(
                (
                    f"Open {what} {conversation.name}",
                    partial(self._post, ConversationSelected(conversation)),
                    f"unread: {state.unread(conversation)}",
                )
            )
        for alert in state.alerts:
            about = f"{alert.kind.value} {alert.peer or ''}".rstrip()
            commands.append(
                (
                    f"Dismiss alert {alert.alert_id}: {about}",
                    partial(self._post, DismissRequested(alert.alert_id)),
                    alert.message,
                )
            )
        commands.append(("Show help", partial(self.app.run_action, "help"), "keys and symbols"))
        return commands

    def _post(self, message: ConversationSelected | DismissRequested) -> None:
        self.app.post_message(message)

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
