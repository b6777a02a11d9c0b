"""The status bar: who this node is, mission and epoch, token, links, and the agent connection.

One line while the agent is reachable; a second line saying why not (and
that the TUI keeps retrying) while it is not.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui.format import countdown
from tui.model import AppState, Connection
from tui.widgets.styling import component_style

__all__ = ["StatusBar"]

SEPARATOR = " │ "
WIDE = 100
"""From this many columns on, the status bar has room for the role and a worded epoch."""


class StatusBar(Widget):
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "status--ok",
        "status--warn",
        "status--bad",
        "status--dim",
        "status--me",
    }

    state: reactive[AppState] = reactive(AppState, layout=True)  # one or two lines
    now: reactive[float] = reactive(0.0)

    def render(self) -> Text:
        state, now = self.state, self.now
        style = partial(component_style, self)
        compact = self.size.width < WIDE  # 80 columns: drop the role, shorten the epoch
        line = Text(no_wrap=True, overflow="ellipsis")
        connection = state.connection
        if connection is Connection.CONNECTED:
            line.append("● connected", style("status--ok"))
        elif connection is Connection.RECONNECTED:
            line.append("● reconnected", style("status--ok"))
        elif connection is Connection.CONNECTING:
            line.append("◌ connecting…", style("status--warn"))
        else:
            line.append("✖ disconnected, reconnecting…", style("status--bad"))
        info = state.info
        if info is not None:
            line.append(SEPARATOR)
            line.append(info.identity, style("status--me"))
            if not compact:
                line.append(f" ({info.role})")
            line.append(SEPARATOR)
            line.append(info.mission.name)
            line.append(SEPARATOR)
            over = info.mission.end is not None and now >= info.mission.end
            if over:  # (the agent sends no epoch event when there is none: it said the last)
                line.append("mission over", style("status--warn"))
            elif info.epoch is None:
                line.append("no epoch", style("status--warn"))
            else:
                left = countdown(now, info.epoch.end)
                line.append(
                    f"epoch {info.epoch.index} → {left}"
                    if compact
                    else f"epoch {info.epoch.index}, next in {left}"
                )
            line.append(SEPARATOR)
            token_style = "status--ok" if info.token.state == "ok" else "status--bad"
            mark = "✓" if info.token.state == "ok" else "✖"
            line.append(f"token {mark} {info.token.state}", style(token_style))
            if info.links is not None:
                line.append(SEPARATOR)
                line.append(f"links {info.links}")
        if state.connection_detail and not state.online:
            line.append("\n")
            line.append(state.connection_detail, style("status--dim"))
        return line
