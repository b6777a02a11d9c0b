"""The sans-IO session protocol: a CK-authenticated Noise handshake, then records.

Start at :class:`Connection` (one session) or :class:`Listener` (the
responder side of many). ``docs/protocol.md`` describes the wire format and
the state machine; ``docs/threat-model.md`` what it defends against.
"""

from __future__ import annotations

from mesh.protocol.config import Role, SessionConfig, Transport
from mesh.protocol.connection import Connection
from mesh.protocol.errors import LocalProtocolError, ProtocolError, Reason, RemoteProtocolError
from mesh.protocol.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    FrameRejected,
    HandshakeCompleted,
    HandshakeRefused,
    Termination,
)
from mesh.protocol.handshake import PROTOCOL_NAME
from mesh.protocol.keysets import KeysetLookup, MemoryKeyStore
from mesh.protocol.listener import Listener
from mesh.protocol.ratelimit import RateLimiter
from mesh.protocol.state import State

__all__ = [
    "PROTOCOL_NAME",
    "Connection",
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "FrameRejected",
    "HandshakeCompleted",
    "HandshakeRefused",
    "KeysetLookup",
    "Listener",
    "LocalProtocolError",
    "MemoryKeyStore",
    "ProtocolError",
    "RateLimiter",
    "Reason",
    "RemoteProtocolError",
    "Role",
    "SessionConfig",
    "State",
    "Termination",
    "Transport",
]
