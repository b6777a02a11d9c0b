"""Errors of the keyset layer (CKs, their JWE copies, bundles)."""

from __future__ import annotations

from mesh.errors import MeshError

__all__ = ["BundleError", "BundleStale", "KeysetError"]


class KeysetError(MeshError):
    """A keyset, CK copy or bundle is malformed, forged or not for us."""


class BundleError(KeysetError):
    """A node bundle file is unreadable, corrupt, forged or for another token."""


class BundleStale(BundleError):
    """A bundle of this very token, sealed for an older generation of its keys (rekeyed since)."""
