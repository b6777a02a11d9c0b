"""Events a connection reports to its caller (pulled with ``next_event()``).

Values, not callbacks: the caller decides when to look (aioquic's model).
``HandshakeRefused`` and ``FrameRejected`` are the local log of what we refused
and why; the peer is told nothing beyond one generic ``REFUSE`` frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mesh.protocol.errors import Reason

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "FrameRejected",
    "HandshakeCompleted",
    "HandshakeRefused",
    "Termination",
]


class Termination(Enum):
    LOCAL_CLOSE = "local-close"
    PEER_CLOSE = "peer-close"
    PEER_REFUSED = "peer-refused"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    PROTOCOL_ERROR = "protocol-error"


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """Keys of ``epoch`` are confirmed (0: the first handshake, then one per rekey).

    The initiator reports it when message 2 authenticates; the responder only
    when the initiator's first record under the new keys decrypts (key
    confirmation): until then message 1 alone does not prove a live peer.
    """

    peer: str
    ck_id: bytes
    epoch: int
    peer_capabilities: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    """We refused a handshake message (message 1 or 2): the local log of why."""

    reason: Reason
    ck_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """We refused a record or a frame that made no sense here: the local log of why."""

    reason: Reason


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection reached CLOSED or ERROR; ``reason`` says why on a protocol error."""

    termination: Termination
    reason: Reason | None = None


Event = HandshakeCompleted | DataReceived | HandshakeRefused | FrameRejected | ConnectionTerminated
