"""Errors raised by secure elements (software token, smartcard)."""

from __future__ import annotations

from mesh.errors import MeshError

__all__ = [
    "KeyChangeRefused",
    "TokenCorrupt",
    "TokenError",
    "TokenLocked",
    "TokenNotReady",
    "UnwrapFailed",
    "WrongPin",
]


class TokenError(MeshError):
    """The secure element refused an operation or could not be read."""


class TokenCorrupt(TokenError):
    """The token's storage is unreadable, truncated or fails its integrity check."""


class TokenNotReady(TokenError):
    """The operation needs a verified PIN (or a personalised token) first."""


class WrongPin(TokenError):
    """The PIN was wrong; ``tries_left`` more attempts before the token locks."""

    def __init__(self, tries_left: int) -> None:
        super().__init__(f"wrong PIN ({tries_left} tries left before the token locks)")
        self.tries_left = tries_left


class TokenLocked(TokenError):
    """Too many wrong PINs: the token refuses every PIN from now on."""


class UnwrapFailed(TokenError):
    """A wrapped CK copy is not for this token's current keys, or was modified."""


class KeyChangeRefused(TokenError):
    """A key-change message was forged, for another token, or not newer than the keys held."""
