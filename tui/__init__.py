"""snrmesh's terminal UI (issue 5): a Textual app attached to the agent's control socket.

It never holds a key: everything it shows or does goes through the control
API of ``docs/agent.md``. See ``docs/tui.md``.

Names are imported on first use, so ``snrmesh`` sub-commands that never open
the TUI (the agent above all) do not pay for loading Textual.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AgentProtocolError",
    "AgentUnavailable",
    "ControlClient",
    "LocalRequestError",
    "RequestRefused",
    "RetryPolicy",
    "SnrmeshApp",
    "TuiError",
]

_HOMES = {
    "SnrmeshApp": "tui.app",
    "ControlClient": "tui.client",
    "RetryPolicy": "tui.client",
    "AgentProtocolError": "tui.errors",
    "AgentUnavailable": "tui.errors",
    "LocalRequestError": "tui.errors",
    "RequestRefused": "tui.errors",
    "TuiError": "tui.errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tui' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
