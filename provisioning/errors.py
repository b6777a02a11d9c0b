"""Errors of the provisioning desk. Each says what the operator must fix."""

from __future__ import annotations

from mesh.errors import MeshError

__all__ = [
    "DeskCorrupt",
    "DeskError",
    "DeskNotFound",
    "DuplicateNode",
    "MissionError",
    "PolicyError",
    "UnknownNode",
    "WrongPassphrase",
]


class DeskError(MeshError):
    """Root of every error the desk raises on purpose."""


class DeskNotFound(DeskError):
    """The desk directory holds no desk (run ``snrmesh desk init``)."""


class DeskCorrupt(DeskError):
    """The desk store is unreadable, truncated or inconsistent."""


class WrongPassphrase(DeskError):
    """The desk passphrase does not open the desk's secrets."""


class MissionError(DeskError):
    """A mission definition (window, epochs, mission file) is unusable."""


class UnknownNode(DeskError):
    """A command names a node the desk has not enrolled."""


class DuplicateNode(DeskError):
    """A node with this identity (or token) is already enrolled."""


class PolicyError(DeskError):
    """A dialogue-mate rule is impossible (empty group, self-pair, revoked node...)."""
