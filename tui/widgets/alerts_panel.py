"""The alerts panel: refused handshakes, expiring keysets, revoked nodes, token problems.

Each alert shows its time, kind (a word and a symbol), peer and the agent's
message; ``d`` or Delete dismisses the highlighted one (the agent forgets it
too). The panel hides itself when there is nothing to show, to leave the
rows to the chat on a 24-line terminal.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tui.format import ALERT_LABEL, clock_time
from tui.messages import DismissRequested
from tui.model import AppState
from tui.state import Alert, AlertKind
from tui.widgets.styling import component_style

__all__ = ["AlertsPanel"]


class AlertsPanel(OptionList):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "dismiss", "Dismiss alert"),
        Binding("delete", "dismiss", "Dismiss alert", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {"alerts--severe", "alerts--warn", "alerts--time"}

    state: reactive[AppState] = reactive(AppState)
    now: reactive[float] = reactive(0.0)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: tuple[tuple[Alert, ...], str] | None = None

    def notify_style_update(self) -> None:
        """What is shown carries its own styles: render it again when the CSS or theme changes."""
        super().notify_style_update()
        self._shown = None
        self.call_later(self._sync)

    def watch_state(self) -> None:
        self._sync()

    def watch_now(self) -> None:
        self._sync()

    def _sync(self) -> None:
        if not self.is_mounted:
            return
        alerts = self.state.alerts
        shown = (alerts, clock_time(self.now, self.now))
        if shown == self._shown:
            return
        self._shown = shown
        highlighted = self.highlighted
        self.set_options(Option(self._prompt(a), id=str(a.alert_id)) for a in reversed(alerts))
        if alerts:
            self.highlighted = min(highlighted or 0, len(alerts) - 1)
        self.border_title = f"Alerts ({len(alerts)}): d dismisses"
        self.display = bool(alerts)

    def _prompt(self, alert: Alert) -> Text:
        style = partial(component_style, self)
        severe = alert.kind in (AlertKind.REFUSED, AlertKind.REVOKED, AlertKind.TOKEN)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(clock_time(alert.at, self.now), style("alerts--time"))
        text.append(" ")
        text.append(ALERT_LABEL[alert.kind], style("alerts--severe" if severe else "alerts--warn"))
        if alert.peer:
            text.append(f" {alert.peer}")
        text.append(f"  {alert.message}")
        if alert.repeats:
            text.append(f"  ({alert.repeats + 1} times)", style("alerts--time"))
        return text

    def action_dismiss(self) -> None:
        option = self.highlighted_option
        if option is not None and option.id is not None:
            self.post_message(DismissRequested(int(option.id)))
