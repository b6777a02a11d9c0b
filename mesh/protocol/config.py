"""What a node configures once for all its sessions, and the two roles.

Keyword-only and validated on construction, so a bad value fails where it is
written, not in the middle of a handshake.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import MISSION_ID_SIZE, check_identity
from mesh.protocol.errors import LocalProtocolError
from mesh.protocol.frames import MAX_CAPABILITIES, MAX_RECORDS_PER_KEY

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_REKEY_AFTER_RECORDS",
    "DEFAULT_REKEY_AFTER_SECONDS",
    "Role",
    "SessionConfig",
    "Transport",
]

DEFAULT_CLOCK_SKEW = 300.0
DEFAULT_REKEY_AFTER_RECORDS = 2**16
DEFAULT_REKEY_AFTER_SECONDS = 600.0
MAX_PENDING_RECORDS = 1024


class Role(Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class Transport(Enum):
    """STREAM: reliable and ordered (TCP, a pipe); DATAGRAM: may lose, duplicate, reorder."""

    STREAM = "stream"
    DATAGRAM = "datagram"


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """One node's session settings (times in seconds, counts in records).

    ``record_limit`` is the hard cap of records sent under one key: sending
    past it raises :class:`LocalProtocolError`. Rekeying starts far earlier
    (``rekey_after_records`` or ``rekey_after_seconds``), so the cap is only
    reached when a rekey cannot complete. ``previous_key_lifetime`` bounds how
    long the receive key of the previous epoch survives a rekey on datagrams,
    for records still in flight.

    ``early_data`` lets a responder on a stream send records right after
    message 2 of the first handshake, before the initiator's key confirmation
    (Noise lets a responder send transport messages once it has written its
    last handshake message; TLS 1.3 calls this 0.5-RTT data). It saves the
    round trip a request-answer protocol would wait for the confirmation. What
    the responder then sends can only be read by whoever completes the
    handshake, but it may answer a *replayed* message 1 (to nobody who can read
    it), so it suits protocols whose message 1 cannot be replayed into a new
    session -- the Authentication Server's link, whose PSK is fresh per
    connection -- and stays off by default. On datagrams message 2 may be lost
    or overtaken, so it is refused there.

    ``single_handshake`` is for links that live seconds (the Authentication
    Server's): the session runs exactly one handshake. Neither side rekeys, and
    a responder refuses any further message 1 -- a rekey or a repeat -- that
    would otherwise cost it a key generation and a Diffie-Hellman each time.
    """

    identity: str
    mission_id: bytes
    transport: Transport = Transport.STREAM
    capabilities: int = 0
    clock_skew: float = DEFAULT_CLOCK_SKEW
    rekey_after_records: int = DEFAULT_REKEY_AFTER_RECORDS
    rekey_after_seconds: float = DEFAULT_REKEY_AFTER_SECONDS
    record_limit: int = MAX_RECORDS_PER_KEY
    handshake_timeout: float = 10.0
    retransmit_interval: float = 1.0
    previous_key_lifetime: float = 30.0
    max_pending_records: int = 64
    early_data: bool = False
    single_handshake: bool = False

    def __post_init__(self) -> None:
        try:
            check_identity(self.identity)
        except KeysetError as exc:
            raise LocalProtocolError(str(exc)) from None
        if len(self.mission_id) != MISSION_ID_SIZE:
            raise LocalProtocolError(f"mission id must be {MISSION_ID_SIZE} bytes")
        if self.early_data and self.transport is not Transport.STREAM:
            raise LocalProtocolError("early_data needs a stream transport")
        if not 0 <= self.capabilities <= MAX_CAPABILITIES:
            raise LocalProtocolError("capabilities must fit 16 bits")
        if not 0 < self.record_limit <= MAX_RECORDS_PER_KEY:
            raise LocalProtocolError(f"record_limit must be in 1..{MAX_RECORDS_PER_KEY}")
        if not 0 < self.rekey_after_records <= self.record_limit:
            raise LocalProtocolError("rekey_after_records must be in 1..record_limit")
        if not 0 < self.max_pending_records <= MAX_PENDING_RECORDS:
            raise LocalProtocolError(f"max_pending_records must be in 1..{MAX_PENDING_RECORDS}")
        for name in (
            "clock_skew",
            "rekey_after_seconds",
            "handshake_timeout",
            "retransmit_interval",
            "previous_key_lifetime",
        ):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"{name} must be positive")
