"""Errors of the application wire format."""

from __future__ import annotations

from mesh.errors import MeshError

__all__ = ["WireError"]


class WireError(MeshError):
    """A message from a peer is malformed, oversized or of an unknown kind.

    The agent drops and logs such a message; it never closes a link for it.
    """
