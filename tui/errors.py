"""Errors of the terminal UI, named for whose fault they are.

The TUI only ever talks to its agent, so there are three parties to blame:
the agent is not there (:class:`AgentUnavailable`), the agent broke the
control protocol (:class:`AgentProtocolError`), or the agent understood the
request and said no (:class:`RequestRefused`, carrying the API's error code).
A request the TUI itself could never send is :class:`LocalRequestError`.
All of them are :class:`mesh.errors.MeshError`, so ``snrmesh`` reports them as
one line; inside the app they become a status line or a notification, never
a traceback.
"""

from __future__ import annotations

from mesh.errors import MeshError

__all__ = [
    "AgentProtocolError",
    "AgentUnavailable",
    "LocalRequestError",
    "RequestRefused",
    "TuiError",
]


class TuiError(MeshError):
    """Root of every error the ``tui`` package raises on purpose."""


class AgentUnavailable(TuiError):
    """The control socket cannot be reached, or the connection to it was lost."""


class AgentProtocolError(TuiError):
    """The agent sent something the control API does not allow (its fault, not ours)."""


class LocalRequestError(TuiError):
    """The TUI was asked to send a request the control API would refuse (our fault)."""


class RequestRefused(TuiError):
    """The agent answered a request with ``"ok": false``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
