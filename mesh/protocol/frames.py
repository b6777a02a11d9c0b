"""Wire frames: pure ``pull_*``/``push_*`` functions, every size a named constant.

Every frame starts with one byte: the protocol version in the high nibble and
the frame type in the low nibble. Handshake frames have fixed sizes (a ticket
frame says its ticket's length), records say their own length, so a frame is
self-delimiting on a byte stream and must fill a datagram exactly.

======================  ==========================================================
frame                   layout (sizes in bytes, integers big-endian)
======================  ==========================================================
INIT (0x11)             type 1 | ck_id 16 | Noise msg 1: e 32, payload 10 + tag 16
TICKET_INIT (0x12)      type 1 | ck_id 16 | ticket length 2 | ticket | Noise msg 1
RESPONSE (0x13)         type 1 | Noise msg 2: e 32, payload 2 + tag 16
REFUSE (0x14)           type 1 (nothing else: the peer learns no reason)
REKEY_INIT (0x15)       as INIT: message 1 of a rekey on a live session
record (0x18-0x1F)      header 8: type 1 | ciphertext length 2 | counter 5
                        then ciphertext + tag 16
======================  ==========================================================

A record's type nibble is ``1 k k p``: ``kk`` the record kind, ``p`` the key
phase (the low bit of the key epoch). Its 8-byte header is the AEAD associated
data. The counter is the 64-bit Noise nonce ``n`` of the sending key; the wire
carries its low 40 bits and the high 24 are implicitly zero, because a sender
refuses to pass :data:`MAX_RECORDS_PER_KEY` (and rekeys long before). Per-record
overhead: 8 + 16 = 24 bytes. The full rationale is in ``docs/protocol.md``.

Parsing errors raise :class:`RemoteProtocolError` with a :class:`Reason`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from mesh.crypto.noise import DHLEN, TAG_SIZE
from mesh.keyset.copies import MAX_COPY_SIZE
from mesh.keyset.keyset import CK_ID_SIZE
from mesh.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

__all__ = [
    "CAPABILITIES_SIZE",
    "INIT_FRAME_SIZE",
    "MAX_CAPABILITIES",
    "MAX_FRAME_SIZE",
    "MAX_RECORDS_PER_KEY",
    "MAX_RECORD_PLAINTEXT",
    "MAX_TICKET_SIZE",
    "NOISE_INIT_SIZE",
    "NOISE_RESPONSE_SIZE",
    "RECORD_HEADER_SIZE",
    "RECORD_OVERHEAD",
    "REFUSE_FRAME",
    "RESPONSE_FRAME_SIZE",
    "TIMESTAMP_SIZE",
    "TYPE_SIZE",
    "VERSION",
    "FrameType",
    "Init",
    "RecordKind",
    "frame_size",
    "pack_init_payload",
    "pack_record_header",
    "pack_response_payload",
    "pull_init",
    "pull_response",
    "push_init",
    "push_response",
    "starts_session",
    "unpack_init_payload",
    "unpack_record_header",
    "unpack_response_payload",
]

VERSION = 1
TYPE_SIZE = 1
TIMESTAMP_SIZE = 8
CAPABILITIES_SIZE = 2
MAX_CAPABILITIES = 0xFFFF
TICKET_LENGTH_SIZE = 2
MAX_TICKET_SIZE = MAX_COPY_SIZE

_INIT_PAYLOAD = struct.Struct(">QH")  # timestamp (microseconds), capabilities
_RESPONSE_PAYLOAD = struct.Struct(">H")  # capabilities
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")

NOISE_INIT_SIZE = DHLEN + _INIT_PAYLOAD.size + TAG_SIZE
NOISE_RESPONSE_SIZE = DHLEN + _RESPONSE_PAYLOAD.size + TAG_SIZE
INIT_FRAME_SIZE = TYPE_SIZE + CK_ID_SIZE + NOISE_INIT_SIZE
TICKET_HEADER_SIZE = TYPE_SIZE + CK_ID_SIZE + TICKET_LENGTH_SIZE
RESPONSE_FRAME_SIZE = TYPE_SIZE + NOISE_RESPONSE_SIZE

RECORD_HEADER_SIZE = 8
RECORD_OVERHEAD = RECORD_HEADER_SIZE + TAG_SIZE
MAX_RECORD_PLAINTEXT = 16 * 1024
_COUNTER_BITS = 40
_LENGTH_SHIFT = _COUNTER_BITS
_TYPE_SHIFT = _COUNTER_BITS + 16
_COUNTER_MASK = (1 << _COUNTER_BITS) - 1
MAX_RECORDS_PER_KEY = 1 << _COUNTER_BITS

MAX_FRAME_SIZE = max(
    RECORD_HEADER_SIZE + MAX_RECORD_PLAINTEXT + TAG_SIZE,
    TICKET_HEADER_SIZE + MAX_TICKET_SIZE + NOISE_INIT_SIZE,
)


class FrameType(IntEnum):
    """The low nibble of a frame's first byte."""

    INIT = 0x1
    TICKET_INIT = 0x2
    RESPONSE = 0x3
    REFUSE = 0x4
    REKEY_INIT = 0x5  # message 1 of a rekey: a fresh INIT on a live session is a restart
    RECORD = 0x8  # a flag: 0x8-0xF are records


class RecordKind(IntEnum):
    """Bits 1-2 of a record's type nibble. Only DATA carries a payload."""

    DATA = 0
    CLOSE = 1  # orderly close, authenticated
    REKEY_REQUEST = 2  # responder -> initiator: "start a fresh handshake"
    KEY_CONFIRM = 3  # initiator -> responder: first record under new keys


_RECORD_KINDS = tuple(RecordKind)  # by value: a tuple index, not an Enum call per record
_VERSION_BITS = VERSION << 4
REFUSE_FRAME = bytes([_VERSION_BITS | FrameType.REFUSE])
_INIT_TYPE = bytes([_VERSION_BITS | FrameType.INIT])
_TICKET_INIT_TYPE = bytes([_VERSION_BITS | FrameType.TICKET_INIT])
_REKEY_INIT_TYPE = bytes([_VERSION_BITS | FrameType.REKEY_INIT])
_RESPONSE_TYPE = bytes([_VERSION_BITS | FrameType.RESPONSE])
_FIXED_SIZES: dict[int, int] = {
    FrameType.INIT: INIT_FRAME_SIZE,
    FrameType.REKEY_INIT: INIT_FRAME_SIZE,
    FrameType.RESPONSE: RESPONSE_FRAME_SIZE,
    FrameType.REFUSE: len(REFUSE_FRAME),
}


def starts_session(frame: bytes) -> bool:
    """Is this a new session's message 1 (INIT or TICKET_INIT; not a rekey's REKEY_INIT)?"""
    return bool(frame) and frame[0] & 0x0F in (FrameType.INIT, FrameType.TICKET_INIT)


def frame_size(buffer: bytes | bytearray, offset: int = 0) -> int | None:
    """Size of the frame starting at ``offset``, or ``None`` until enough bytes tell it.

    Refuses a bad version, an unknown type, or a length outside its bounds as
    soon as the header shows it, so a stream never buffers an oversize frame.
    """
    available = len(buffer) - offset
    if available < TYPE_SIZE:
        return None
    first = buffer[offset]
    if first >> 4 != VERSION:
        raise RemoteProtocolError(Reason.UNSUPPORTED_VERSION, f"version {first >> 4}")
    kind = first & 0x0F
    if kind & FrameType.RECORD:
        if available < TYPE_SIZE + 2:
            return None
        length = (buffer[offset + 1] << 8) | buffer[offset + 2]
        if length < TAG_SIZE:
            raise RemoteProtocolError(Reason.MALFORMED, "record shorter than its tag")
        if length > MAX_RECORD_PLAINTEXT + TAG_SIZE:
            raise RemoteProtocolError(Reason.OVERSIZE, f"record of {length} bytes")
        return RECORD_HEADER_SIZE + length
    if kind == FrameType.TICKET_INIT:
        if available < TICKET_HEADER_SIZE:
            return None
        length = int.from_bytes(
            buffer[offset + TYPE_SIZE + CK_ID_SIZE : offset + TICKET_HEADER_SIZE], "big"
        )
        if length == 0:
            raise RemoteProtocolError(Reason.MALFORMED, "empty ticket")
        if length > MAX_TICKET_SIZE:
            raise RemoteProtocolError(Reason.OVERSIZE, f"ticket of {length} bytes")
        return TICKET_HEADER_SIZE + length + NOISE_INIT_SIZE
    size = _FIXED_SIZES.get(kind)
    if size is None:
        raise RemoteProtocolError(Reason.MALFORMED, f"unknown frame type {kind:#x}")
    return size


@dataclass(frozen=True, slots=True)
class Init:
    """Message 1 with its clear header; ``ticket`` is the responder's wrapped CK copy, if sent.

    ``rekey`` marks message 1 of a rekey (REKEY_INIT), which never carries a
    ticket: a responder tells a rekey of the live session from a new session
    of a peer that restarted by it, and the prologue binds it (``prologue.py``).
    """

    ck_id: bytes
    noise_message: bytes
    ticket: str | None = None
    rekey: bool = False


def push_init(init: Init) -> bytes:
    """Serialise message 1; the ticket comes from the caller, so it is checked here."""
    if init.rekey:
        if init.ticket is not None:
            raise LocalProtocolError("a rekey carries no ticket")
        return b"".join((_REKEY_INIT_TYPE, init.ck_id, init.noise_message))
    if init.ticket is None:
        return b"".join((_INIT_TYPE, init.ck_id, init.noise_message))
    try:
        ticket = init.ticket.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError("a ticket is JWE compact text (ASCII)") from None
    if not 0 < len(ticket) <= MAX_TICKET_SIZE:
        raise LocalProtocolError(f"a ticket is 1-{MAX_TICKET_SIZE} bytes")
    return b"".join(
        (_TICKET_INIT_TYPE, init.ck_id, _U16.pack(len(ticket)), ticket, init.noise_message)
    )


def pull_init(frame: bytes) -> Init:
    """Parse a complete INIT, REKEY_INIT or TICKET_INIT frame (as sized by :func:`frame_size`)."""
    ck_id = frame[TYPE_SIZE : TYPE_SIZE + CK_ID_SIZE]
    kind = frame[0] & 0x0F
    if kind != FrameType.TICKET_INIT:
        return Init(ck_id, frame[TYPE_SIZE + CK_ID_SIZE :], rekey=kind == FrameType.REKEY_INIT)
    raw = frame[TICKET_HEADER_SIZE:-NOISE_INIT_SIZE]
    try:
        ticket = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError(Reason.MALFORMED, "ticket is not ASCII") from None
    return Init(ck_id, frame[-NOISE_INIT_SIZE:], ticket)


def push_response(noise_message: bytes) -> bytes:
    return _RESPONSE_TYPE + noise_message


def pull_response(frame: bytes) -> bytes:
    return frame[TYPE_SIZE:]


def pack_record_header(kind: RecordKind, phase: int, counter: int, length: int) -> bytes:
    """The 8-byte header: type, ciphertext length, low 40 bits of the counter."""
    first = _VERSION_BITS | FrameType.RECORD | kind << 1 | phase
    return _U64.pack(first << _TYPE_SHIFT | length << _LENGTH_SHIFT | counter)


def unpack_record_header(frame: bytes) -> tuple[RecordKind, int, int]:
    """(kind, phase, counter) of a record whose length :func:`frame_size` already checked."""
    (word,) = _U64.unpack_from(frame)
    first = word >> _TYPE_SHIFT
    return _RECORD_KINDS[(first >> 1) & 0x3], first & 0x1, word & _COUNTER_MASK


def pack_init_payload(timestamp: int, capabilities: int) -> bytes:
    return _INIT_PAYLOAD.pack(timestamp, capabilities)


def unpack_init_payload(payload: bytes) -> tuple[int, int]:
    """(timestamp in microseconds, capabilities); the size is fixed by the frame."""
    timestamp, capabilities = _INIT_PAYLOAD.unpack(payload)
    return timestamp, capabilities


def pack_response_payload(capabilities: int) -> bytes:
    return _RESPONSE_PAYLOAD.pack(capabilities)


def unpack_response_payload(payload: bytes) -> int:
    (capabilities,) = _RESPONSE_PAYLOAD.unpack(payload)
    return int(capabilities)
