"""Rich styles from the stylesheet's component classes, for text a widget renders itself."""

from __future__ import annotations

from rich.style import Style
from textual.widget import Widget

__all__ = ["component_style"]


def component_style(widget: Widget, name: str) -> Style:
    """The colour and emphasis ``snrmesh.tcss`` gives ``name``, without its background.

    The foreground comes out already blended (``$text-muted`` is a translucent colour), and
    the background is left to the row or option under it, so a cursor or a highlight shows
    through a styled cell instead of stopping at it.
    """
    full = widget.get_component_rich_style(name)
    return Style(
        color=full.color,
        bold=full.bold,
        italic=full.italic,
        underline=full.underline,
        reverse=full.reverse,
        strike=full.strike,
    )
