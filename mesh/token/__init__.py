"""Secure elements: where a node's identity and static keys live."""

from __future__ import annotations

from mesh.token.errors import (
    CardError,
    KeyChangeRefused,
    ReaderUnavailable,
    Refusal,
    TokenAbsent,
    TokenCorrupt,
    TokenError,
    TokenLocked,
    TokenNotReady,
    UnwrapFailed,
    WrongApplet,
    WrongPin,
)
from mesh.token.interface import (
    KEY_SIZE,
    MAX_PIN_TRIES,
    SLOT_COUNT,
    TOKEN_ID_SIZE,
    SecureElement,
    Slot,
    SlotInfo,
    TokenInfo,
    slot_kid,
)

__all__ = [
    "KEY_SIZE",
    "MAX_PIN_TRIES",
    "SLOT_COUNT",
    "TOKEN_ID_SIZE",
    "CardError",
    "KeyChangeRefused",
    "ReaderUnavailable",
    "Refusal",
    "SecureElement",
    "Slot",
    "SlotInfo",
    "TokenAbsent",
    "TokenCorrupt",
    "TokenError",
    "TokenInfo",
    "TokenLocked",
    "TokenNotReady",
    "UnwrapFailed",
    "WrongApplet",
    "WrongPin",
    "slot_kid",
]
