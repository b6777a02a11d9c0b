"""The app's screens: the main screen and the help screen."""

from __future__ import annotations

from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen

__all__ = ["HelpScreen", "MainScreen"]
