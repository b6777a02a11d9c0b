"""Errors of the keyset layer (CKs, their JWE copies, bundles)."""

from __future__ import annotations

from mesh.errors import MeshError

__all__ = ["BundleError", "KeysetError"]


class KeysetError(MeshError):
    """A keyset, CK copy or bundle is malformed, forged or not for us."""


class BundleError(KeysetError):
    """A node bundle file is unreadable, corrupt, forged or for another token."""
