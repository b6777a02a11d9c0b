"""Secure elements: where a node's identity and static keys live."""

from __future__ import annotations

from mesh.token.errors import (
    KeyChangeRefused,
    TokenCorrupt,
    TokenError,
    TokenLocked,
    TokenNotReady,
    UnwrapFailed,
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
    "KeyChangeRefused",
    "SecureElement",
    "Slot",
    "SlotInfo",
    "TokenCorrupt",
    "TokenError",
    "TokenInfo",
    "TokenLocked",
    "TokenNotReady",
    "UnwrapFailed",
    "WrongPin",
    "slot_kid",
]
