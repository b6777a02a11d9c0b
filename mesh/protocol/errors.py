"""Errors of the session protocol, typed by whose fault they are (h11's split).

* :class:`LocalProtocolError` -- the caller misused the API (sent before
  connecting, a record too large, a CK it does not hold). Fix the caller.
* :class:`RemoteProtocolError` -- the peer (or someone on the path) sent
  something we refuse. It carries a :class:`Reason` for the local log; the peer
  itself only ever sees one generic refusal (``docs/protocol.md``).

Both derive from :class:`ProtocolError`, itself a :class:`mesh.errors.MeshError`,
so an agent loop can catch "anything the protocol refused" in one place.
"""

from __future__ import annotations

from enum import Enum

from mesh.errors import MeshError

__all__ = ["LocalProtocolError", "ProtocolError", "Reason", "RemoteProtocolError"]


class Reason(Enum):
    """Why a frame or a handshake was refused: logged locally, never sent to the peer."""

    # framing
    MALFORMED = "malformed"  # wrong size or layout: truncated, extended, zero-length
    UNSUPPORTED_VERSION = "unsupported-version"
    OVERSIZE = "oversize"
    UNEXPECTED_FRAME = "unexpected-frame"  # valid frame, wrong role or state (e.g. reflected)
    # keysets and tickets
    UNKNOWN_CK = "unknown-ck"
    REVOKED_CK = "revoked-ck"
    CK_NOT_YET_VALID = "ck-not-yet-valid"
    CK_EXPIRED = "ck-expired"
    WRONG_MISSION = "wrong-mission"
    IDENTITY_MISMATCH = "identity-mismatch"
    CK_CHANGED = "ck-changed"  # a rekey under another ck_id than the session's
    TICKET_INVALID = "ticket-invalid"
    TICKET_RATE_LIMITED = "ticket-rate-limited"
    HALF_OPEN_LIMIT = "half-open-limit"
    # handshake messages
    AUTH_FAILED = "auth-failed"  # AEAD tag: wrong PSK, wrong prologue, or forged
    BAD_PUBLIC_KEY = "bad-public-key"
    REPLAYED_INIT = "replayed-init"  # timestamp not above the high-water mark
    CLOCK_SKEW = "clock-skew"
    # records
    REPLAYED_RECORD = "replayed-record"
    OUT_OF_ORDER = "out-of-order"
    UNKNOWN_KEY_PHASE = "unknown-key-phase"


class ProtocolError(MeshError):
    """Root of the session protocol's errors."""


class LocalProtocolError(ProtocolError):
    """The caller used the API wrongly; the connection state is unchanged."""


class RemoteProtocolError(ProtocolError):
    """The peer, or someone between us, sent something this connection refuses."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:  # formatted when shown, not on the refusal path
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value
