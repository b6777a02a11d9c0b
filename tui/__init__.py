"""snrmesh's terminal UI (issue 5): a Textual app attached to the agent's control socket.

It never holds a key: everything it shows or does goes through the control
API of ``docs/agent.md``. See ``docs/tui.md``.
"""

from __future__ import annotations

from tui.app import SnrmeshApp
from tui.client import ControlClient, RetryPolicy
from tui.errors import (
    AgentProtocolError,
    AgentUnavailable,
    LocalRequestError,
    RequestRefused,
    TuiError,
)

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
