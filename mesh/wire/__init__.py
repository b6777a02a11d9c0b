"""The application wire format (CBOR messages inside session records)."""

from __future__ import annotations

from mesh.wire.errors import WireError
from mesh.wire.messages import (
    MAX_HOPS,
    MAX_RECEIPT_IDS,
    MAX_TEXT,
    MAX_TEXT_BYTES,
    MESSAGE_ID_SIZE,
    Chat,
    Message,
    Ping,
    Receipt,
    Relay,
    Routes,
    SessionGone,
    Status,
    check_position,
    decode,
    encode,
)

__all__ = [
    "MAX_HOPS",
    "MAX_RECEIPT_IDS",
    "MAX_TEXT",
    "MAX_TEXT_BYTES",
    "MESSAGE_ID_SIZE",
    "Chat",
    "Message",
    "Ping",
    "Receipt",
    "Relay",
    "Routes",
    "SessionGone",
    "Status",
    "WireError",
    "check_position",
    "decode",
    "encode",
]
