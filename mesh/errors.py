"""The root of every exception raised by the ``mesh`` package.

One root lets the command line and the agent catch "anything snrmesh
refused" in one place and turn it into a one-line message, while anything
else (a bug) still surfaces as a traceback in tests.
"""

from __future__ import annotations

__all__ = ["MeshError"]


class MeshError(Exception):
    """Base class of all errors raised on purpose by the ``mesh`` package."""
