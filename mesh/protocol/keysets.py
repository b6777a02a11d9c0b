"""A node's view of its Communication Keysets, as the session protocol needs it.

The protocol core never reads files or talks to a token: it asks a
:class:`KeysetLookup` (a structural protocol) to find a CK by ``ck_id``, tell
whether it is revoked, read and advance the timestamp high-water marks, and
open a ticket. The caller owns persistence: a high-water mark that goes back
(lost state) re-opens the window for replaying an old message 1 until the
next handshake, so the agent stores :meth:`MemoryKeyStore.marks` across runs.

:class:`MemoryKeyStore` is the in-memory implementation used by tests, the
benchmark and (wrapped with persistence) the agent. Ticket opening is a
callback, typically ``functools.partial(mesh.keyset.open_copy, token)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from mesh.errors import MeshError
from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol.config import Role

__all__ = [
    "MAX_CACHED_KEYSETS",
    "KeysetLookup",
    "MemoryKeyStore",
    "TicketOpener",
    "TicketsDisabled",
]

MAX_CACHED_KEYSETS = 1024

TicketOpener = Callable[[str], CommunicationKeyset]


class TicketsDisabled(MeshError):
    """The store was built without a ticket opener."""


class KeysetLookup(Protocol):
    """What a connection asks about keysets (all calls are quick and local)."""

    def lookup(self, ck_id: bytes) -> CommunicationKeyset | None:
        """The CK with this id, or None."""

    def is_revoked(self, ck_id: bytes) -> bool: ...

    def high_water(self, ck_id: bytes, role: Role) -> int:
        """Highest message-1 timestamp (microseconds) accepted as responder, or sent as
        initiator, under ``ck_id``; 0 if none."""

    def set_high_water(self, ck_id: bytes, role: Role, timestamp: int) -> None:
        """Advance a mark; the caller persists it."""

    def open_ticket(self, ticket: str) -> CommunicationKeyset:
        """Unwrap a ticket (our own wrapped copy of a CK) through the token.

        Raises a :class:`mesh.errors.MeshError` when it is not ours, forged or unreadable.
        """

    def cache(self, ck: CommunicationKeyset) -> None:
        """Keep a CK learnt from a ticket whose handshake authenticated."""


class MemoryKeyStore:
    """Keysets, revocations and high-water marks held in memory.

    CKs learnt from tickets live apart from the configured ones, at most
    :data:`MAX_CACHED_KEYSETS` of them (the least recently cached go first).
    """

    __slots__ = ("_accepted", "_keysets", "_learnt", "_marks", "_opener", "_revoked", "_sent")

    def __init__(
        self,
        keysets: Iterable[CommunicationKeyset] = (),
        *,
        revoked: Iterable[bytes] = (),
        ticket_opener: TicketOpener | None = None,
        marks: Iterable[tuple[bytes, Role, int]] = (),
    ) -> None:
        self._keysets = {ck.ck_id: ck for ck in keysets}
        self._learnt: OrderedDict[bytes, CommunicationKeyset] = OrderedDict()
        self._revoked = set(revoked)
        self._opener = ticket_opener
        # one table per role, so that no Enum is hashed on the handshake path
        self._marks: dict[Role, dict[bytes, int]] = {role: {} for role in Role}
        self._sent = self._marks[Role.INITIATOR]
        self._accepted = self._marks[Role.RESPONDER]
        for ck_id, role, mark in marks:
            self._marks[role][ck_id] = mark

    def add(self, ck: CommunicationKeyset) -> None:
        self._keysets[ck.ck_id] = ck

    def revoke(self, ck_id: bytes) -> None:
        self._revoked.add(ck_id)

    def marks(self) -> list[tuple[bytes, Role, int]]:
        """Every high-water mark, to persist and pass back as ``marks=`` next run."""
        return [(ck_id, role, mark) for role in Role for ck_id, mark in self._marks[role].items()]

    def lookup(self, ck_id: bytes) -> CommunicationKeyset | None:
        return self._keysets.get(ck_id) or self._learnt.get(ck_id)

    def is_revoked(self, ck_id: bytes) -> bool:
        return ck_id in self._revoked

    def high_water(self, ck_id: bytes, role: Role) -> int:
        return (self._accepted if role is Role.RESPONDER else self._sent).get(ck_id, 0)

    def set_high_water(self, ck_id: bytes, role: Role, timestamp: int) -> None:
        marks = self._accepted if role is Role.RESPONDER else self._sent
        if timestamp > marks.get(ck_id, 0):
            marks[ck_id] = timestamp

    def open_ticket(self, ticket: str) -> CommunicationKeyset:
        if self._opener is None:
            raise TicketsDisabled("this node opens no tickets")
        return self._opener(ticket)

    def cache(self, ck: CommunicationKeyset) -> None:
        self._learnt[ck.ck_id] = ck
        self._learnt.move_to_end(ck.ck_id)
        if len(self._learnt) > MAX_CACHED_KEYSETS:
            self._learnt.popitem(last=False)
