"""Per-token key state on the Authentication Server, and the two-phase key change.

Rules (the state of one token, as the store holds it)::

    generation g, keys K[g]            always
    pending K[g+1]                     between "key change sent" and "token proved K[g+1]"
    previous K[g-1]                    after a commit: kept only to recognise a clone
    suspended                          set when a clone is seen (or the node is revoked)

* The AS never drops K[g] before the token proved it holds K[g+1] (an answer
  MAC'd with K[g+1], or a link whose PSK came from K[g+1]): a lost reply can
  only leave the token at g (the AS sends the *same* pending keys again) or at
  g+1 (the AS finds them pending and commits), never at a generation the AS
  has forgotten.
* A token presenting g-1 after a commit is a copy that missed the key change:
  once it *proves* K[g-1] (an unauthenticated claim proves nothing, and must
  not let a stranger suspend a meter) the identity is suspended.

This module is pure: which key a HELLO selects (:func:`choose_link_key`), what
the link PSK and the challenge MAC cover, and which outcome an answer has.
The store applies the outcome under a row lock (``store.py``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum

from mesh.crypto import hkdf_sha256, hmac_sha256
from mesh.crypto.primitives import sha256
from mesh.keyset.keyset import CommunicationKeyset
from mesh.token import Slot
from mesh.token.interface import DERIVE_INFO, slot_kid
from mesh.token.keychange import KeyChange, build_key_change
from provisioning.authserver.errors import Refusal
from provisioning.authserver.messages import NONCE_SIZE

__all__ = [
    "AS_IDENTITY",
    "KeyChoice",
    "KeyPolicy",
    "LinkKey",
    "Outcome",
    "TokenKeys",
    "answer_transcript",
    "choose_link_key",
    "judge_answer",
    "link_context",
    "link_keyset",
    "link_psk",
    "make_key_change",
]

AS_IDENTITY = "authentication-server"
LINK_LABEL = b"snrmesh as link v1"
ANSWER_LABEL = b"snrmesh as answer v1"
LINK_NOT_AFTER = 2**40  # the link CK lives as long as its one connection: no clock involved


@dataclass(frozen=True, slots=True, repr=False)
class TokenKeys:
    """One token's keys as the store holds them (opened), and its status."""

    identity: str
    token_id: bytes
    generation: int
    keys: tuple[bytes, ...]
    pending: tuple[bytes, ...] | None
    previous: tuple[bytes, ...] | None
    keys_since: int
    suspended: bool  # not let in: suspended by a clone alert, or revoked
    revoked: bool  # ... by the desk (final), which is what a refusal then says

    @property
    def barred(self) -> Refusal:
        """The refusal a node not let in gets: ``revoked`` or ``suspended``."""
        return Refusal.REVOKED if self.revoked else Refusal.SUSPENDED

    def __repr__(self) -> str:  # never print a key
        return (
            f"TokenKeys({self.identity}, generation={self.generation}, "
            f"pending={self.pending is not None}, suspended={self.suspended})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPolicy:
    """When the AS changes a token's keys: once they are ``key_lifetime`` seconds old.

    ``key_lifetime = 0`` changes them at every authentication (the strongest
    clone detection: a copy is caught at its first authentication after the
    original's next one).
    """

    key_lifetime: float = 30 * 86400.0

    def due(self, keys: TokenKeys, now: float) -> bool:
        return now - keys.keys_since >= self.key_lifetime


class KeyChoice(Enum):
    CURRENT = "current"  # the token holds K[g]
    PENDING = "pending"  # the token applied a key change whose reply was lost
    SUPERSEDED = "superseded"  # a copy that missed a committed key change (if it proves it)
    UNKNOWN = "unknown"  # no such identity or generation: the link fails, saying nothing


@dataclass(frozen=True, slots=True, repr=False)
class LinkKey:
    """The AUTH key (and its generation) a HELLO selected; ``key`` is random when UNKNOWN."""

    choice: KeyChoice
    generation: int
    keys: tuple[bytes, ...]

    @property
    def auth(self) -> bytes:
        return self.keys[Slot.AUTH]


class Outcome(Enum):
    AUTHENTICATED = "authenticated"  # answer verified under K[g]; nothing changes
    COMMIT = "commit"  # answer verified under K[g+1]: switch to it
    CLONE = "clone"  # answer verified under a superseded key: suspend
    FAILED = "failed"  # the answer did not verify


def choose_link_key(record: TokenKeys | None, generation: int, dummy: bytes) -> LinkKey:
    """The key of the generation a HELLO names, or ``dummy`` (random) keys if there is none.

    With dummy keys the link's handshake fails like a wrong key would, so a
    HELLO learns nothing about which identities or generations exist.
    """
    unknown = LinkKey(KeyChoice.UNKNOWN, generation, (dummy,) * 4)
    if record is None:
        return unknown
    if generation == record.generation:
        return LinkKey(KeyChoice.CURRENT, generation, record.keys)
    if generation == record.generation + 1 and record.pending is not None:
        return LinkKey(KeyChoice.PENDING, generation, record.pending)
    if generation == record.generation - 1 and record.previous is not None:
        return LinkKey(KeyChoice.SUPERSEDED, generation, record.previous)
    return unknown


def link_context(identity: str, generation: int, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The DERIVE context of one link: fresh nonces from both sides, who, which generation."""
    if len(client_nonce) != NONCE_SIZE or len(server_nonce) != NONCE_SIZE:
        raise ValueError("link nonces must be 16 bytes")
    name = identity.encode("ascii")
    return b"".join(
        (
            LINK_LABEL,
            bytes((len(name),)),
            name,
            generation.to_bytes(4, "big"),
            client_nonce,
            server_nonce,
        )
    )


def link_psk(auth_key: bytes, context: bytes) -> bytes:
    """The AS's side of ``SecureElement.derive(Slot.AUTH, context)``: the same HKDF."""
    return hkdf_sha256(auth_key, salt=None, info=DERIVE_INFO + context)


def link_keyset(identity: str, context: bytes, psk: bytes) -> CommunicationKeyset:
    """The one-connection CK of a link: ids from the context, pair key = the derived PSK.

    It lets the link reuse the session handshake (``mesh.protocol``) unchanged;
    its window is not tied to a clock because the nonces already make it fresh.
    """
    digest = sha256(context)
    a, b = sorted((identity, AS_IDENTITY))
    return CommunicationKeyset(
        ck_id=digest[:16],
        pair_key=psk,
        mission_id=digest[16:32],
        party_a=a,
        party_b=b,
        not_before=0,
        not_after=LINK_NOT_AFTER,
    )


def answer_transcript(context: bytes, challenge: bytes, generation: int) -> bytes:
    """What the token's AUTH MAC covers: this link's context, the challenge, the generation."""
    return b"".join((ANSWER_LABEL, context, challenge, generation.to_bytes(4, "big")))


def judge_answer(
    choice: KeyChoice, changing: bool, expected_key: bytes, transcript: bytes, mac: bytes
) -> Outcome:
    """The outcome of an answer checked under the key the challenge asked for."""
    if choice is KeyChoice.UNKNOWN or not hmac.compare_digest(
        hmac_sha256(expected_key, transcript), mac
    ):
        return Outcome.FAILED
    if choice is KeyChoice.SUPERSEDED:
        return Outcome.CLONE
    if changing or choice is KeyChoice.PENDING:
        return Outcome.COMMIT
    return Outcome.AUTHENTICATED


def make_key_change(record: TokenKeys) -> str:
    """The key-change message moving ``record``'s token to its pending keys."""
    if record.pending is None:
        raise ValueError("no pending keys")
    new_generation = record.generation + 1
    return build_key_change(
        KeyChange(record.token_id, (new_generation,) * 4, record.pending),
        kid=slot_kid(record.token_id, Slot.KEY_CHANGE, record.generation),
        current_key=record.keys[Slot.KEY_CHANGE],
    )
