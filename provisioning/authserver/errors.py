"""Errors of the Authentication Server, typed by whose fault they are.

* :class:`AuthServerError` -- the root (a :class:`provisioning.errors.DeskError`,
  so the command line catches it with every desk error).
* :class:`LocalAuthError` -- this side misused the API (fix the caller).
* :class:`RemoteAuthError` -- the peer sent something we refuse; it carries a
  :class:`Refusal` code that is also what the peer is told.
* :class:`AuthRefused` -- the server refused us (client side), with its
  ``retry_after`` when the refusal is temporary.
* :class:`StoreUnavailable` -- the key-state store failed (database down).
"""

from __future__ import annotations

from enum import Enum

from provisioning.errors import DeskError

__all__ = [
    "REFUSAL_HINTS",
    "AttemptsExhausted",
    "AuthRefused",
    "AuthServerError",
    "BundleRefused",
    "LocalAuthError",
    "MessageError",
    "Refusal",
    "RemoteAuthError",
    "StoreUnavailable",
    "explain",
]


class Refusal(Enum):
    """Why the server refuses; sent to the client as this value."""

    MALFORMED = "malformed"  # a message that does not parse or comes at the wrong time
    UNKNOWN = "unknown"  # no such identity, or its key generation is unknown
    AUTH_FAILED = "auth-failed"  # the link's handshake or the challenge answer did not verify
    SUSPENDED = "suspended"  # the identity is suspended: a cloned token was seen
    REVOKED = "revoked"  # the desk revoked the identity: final
    POLICY = "policy"  # the target is not a dialogue mate, revoked, or outside the mission
    RATE_LIMITED = "rate-limited"  # too many requests from this source or identity
    BUSY = "busy"  # too many challenges pending: come back after retry-after
    UNAVAILABLE = "unavailable"  # the key-state store failed


class AuthServerError(DeskError):
    """Root of every error the Authentication Server (and its client) raises on purpose."""


class LocalAuthError(AuthServerError):
    """This side used the API wrongly (a request before authentication, a bad argument)."""


class MessageError(AuthServerError):
    """Bytes that are not a well-formed message of this protocol."""


class RemoteAuthError(AuthServerError):
    """The peer sent something this side refuses."""

    def __init__(self, refusal: Refusal, detail: str = "") -> None:
        super().__init__(f"{refusal.value}: {detail}" if detail else refusal.value)
        self.refusal = refusal
        self.detail = detail


# what an operator reads for each refusal (the AS says only the code: why exactly is in its
# audit log and counters, not for whoever asks)
REFUSAL_HINTS = {
    Refusal.MALFORMED: "a message the AS could not read (versions differ?)",
    Refusal.UNKNOWN: "this token or its key generation is unknown to the AS",
    Refusal.AUTH_FAILED: "the AS does not know this token at its key generation, or the "
    "token's keys differ: a copy left behind by a key change?",
    Refusal.SUSPENDED: "this node is suspended: a copy of its token was seen ('snrmesh as "
    "reinstate' once the trusted token's keys are changed)",
    Refusal.REVOKED: "the desk revoked this node",
    Refusal.POLICY: "not a dialogue mate, a mate revoked or suspended, an epoch past the next "
    "4 or outside the mission, or too much for one bundle",
    Refusal.RATE_LIMITED: "too many requests from this node or address",
    Refusal.BUSY: "the AS is busy",
    Refusal.UNAVAILABLE: "the AS's store failed",
}


def explain(refusal: Refusal, retry_after: float | None = None) -> str:
    """``policy (not a dialogue mate, ...)``, with when to retry if the AS said."""
    suffix = f"; retry after {retry_after:g} s" if retry_after is not None else ""
    return f"{refusal.value} ({REFUSAL_HINTS[refusal]}{suffix})"


class AuthRefused(AuthServerError):
    """The server refused this client; temporary when ``retry_after`` is set."""

    def __init__(self, refusal: Refusal, retry_after: float | None = None) -> None:
        super().__init__(f"the Authentication Server refused: {explain(refusal, retry_after)}")
        self.refusal = refusal
        self.retry_after = retry_after


class AttemptsExhausted(AuthServerError):
    """No answer after the client's attempts; ``retry_after`` if the AS last said when to return."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BundleRefused(AuthRefused):
    """The AS authenticated this node but refused it its bundle (``REFUSE`` for the request)."""

    def __init__(self, identity: str, refusal: Refusal, retry_after: float | None = None) -> None:
        super().__init__(refusal, retry_after)
        self.args = (f"bundle for {identity} refused: {explain(refusal, retry_after)}",)


class StoreUnavailable(AuthServerError):
    """The key-state store failed; the request can be retried later."""
