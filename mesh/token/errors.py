"""Errors raised by secure elements (software token, smartcard).

The type says whose fault it is: the caller's PIN (``WrongPin``), the object
handed to the token (``UnwrapFailed``, ``KeyChangeRefused``), the token's own
storage (``TokenCorrupt``), or the hardware path to a card (``TokenAbsent``,
``ReaderUnavailable``, ``WrongApplet``, ``CardError``). A refused wrapped key
or key change also carries a :class:`Refusal`, so a card can report the same
reason in a status word as the software token does in a message.
"""

from __future__ import annotations

from enum import Enum

from mesh.errors import MeshError

__all__ = [
    "CardError",
    "KeyChangeRefused",
    "ReaderUnavailable",
    "Refusal",
    "TokenAbsent",
    "TokenCorrupt",
    "TokenError",
    "TokenLocked",
    "TokenNotReady",
    "UnwrapFailed",
    "WrongApplet",
    "WrongPin",
]


class Refusal(Enum):
    """Why a wrapped key or a key-change message was refused."""

    MALFORMED = "malformed"  # not parseable, wrong shape or size
    WRONG_KEY = "wrong-key"  # for another token or another key generation (by kid or id)
    FAILED_AUTH = "failed-auth"  # the AES-GCM tag did not verify: forged or modified
    NOT_NEWER = "not-newer"  # a key change whose generations do not all increase (replay)


class TokenError(MeshError):
    """The secure element refused an operation or could not be read."""


class TokenCorrupt(TokenError):
    """The token's storage is unreadable, truncated or fails its integrity check."""


class TokenNotReady(TokenError):
    """The operation needs a verified PIN (or a personalised token) first."""


class WrongPin(TokenError):
    """The PIN was wrong; ``tries_left`` more attempts before the token locks."""

    def __init__(self, tries_left: int) -> None:
        tries = "try" if tries_left == 1 else "tries"
        super().__init__(f"wrong PIN ({tries_left} {tries} left before the token locks)")
        self.tries_left = tries_left


class TokenLocked(TokenError):
    """Too many wrong PINs: the token refuses every PIN from now on."""


class UnwrapFailed(TokenError):
    """A wrapped CK copy is not for this token's current keys, or was modified."""

    def __init__(self, message: str, *, refusal: Refusal = Refusal.MALFORMED) -> None:
        super().__init__(message)
        self.refusal = refusal


class KeyChangeRefused(TokenError):
    """A key-change message was forged, for another token, or not newer than the keys held."""

    def __init__(self, message: str, *, refusal: Refusal = Refusal.MALFORMED) -> None:
        super().__init__(message)
        self.refusal = refusal


class TokenAbsent(TokenError):
    """No card in the reader (never inserted, or pulled out); it may come back."""


class ReaderUnavailable(TokenError):
    """The PC/SC path is missing: no pcscd, no pyscard, no such reader, or the card is held."""


class WrongApplet(TokenError):
    """The card in the reader has no snrmesh applet, or another snrmesh card than expected."""


class CardError(TokenError):
    """The card or the reader misbehaved: an undefined status word or a transport failure."""
