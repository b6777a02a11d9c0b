"""The secure-element interface, shaped the way a smartcard applet works.

A node's identity and static keys live in a secure element. Each operation is
one small command with plain bytes in and out, so the same interface is served
by a software token (a PIN-sealed file) and by a PC/SC smartcard: nothing is
shared by reference and **no operation ever returns a static key**.

Slots (``Slot``) have fixed purposes, so a key is only ever used for one job
(key separation):

* ``WRAP``       -- key-encryption key of the CK copies (JWE ``A256KW``);
* ``MAC``        -- integrity of the node's bundle (JWS ``HS256``);
* ``KEY_CHANGE`` -- protects key-change messages from the desk or an AS;
* ``AUTH``       -- authenticates the node to an Authentication Server.

Every slot key has a generation number that only grows (key change).
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeGuard

__all__ = [
    "KEY_SIZE",
    "MAX_PIN_TRIES",
    "SLOT_COUNT",
    "TOKEN_ID_SIZE",
    "SecureElement",
    "Slot",
    "SlotInfo",
    "TokenInfo",
    "is_slot_kid",
    "slot_kid",
]

KEY_SIZE = 32
TOKEN_ID_SIZE = 16
MAX_PIN_TRIES = 5
SLOT_COUNT = 4
MIN_PIN_LENGTH = 4
MAX_PIN_LENGTH = 64
DERIVE_INFO = b"snrmesh token derive v1"
MAX_DERIVE_CONTEXT = 256


class Slot(IntEnum):
    WRAP = 0
    MAC = 1
    KEY_CHANGE = 2
    AUTH = 3


def slot_kid(token_id: bytes, slot: Slot, generation: int) -> str:
    """The JOSE ``kid`` naming one generation of one slot key of one token.

    Format ``<token id hex>.<slot>.<generation>``: a copy wrapped for an older
    generation or another token is refused by the ``kid`` before any crypto.
    """
    return f"{token_id.hex()}.{int(slot)}.{generation}"


_SLOT_KID = re.compile(rf"[0-9a-f]{{{2 * TOKEN_ID_SIZE}}}\.[0-9]\.[0-9]{{1,20}}", re.ASCII)


def is_slot_kid(kid: object) -> TypeGuard[str]:
    """Whether ``kid`` (read from a copy, a ticket or a key change: hostile) has
    :func:`slot_kid`'s form: bounded ASCII, so it compares and encodes like one."""
    return isinstance(kid, str) and _SLOT_KID.fullmatch(kid) is not None


@dataclass(frozen=True, slots=True)
class SlotInfo:
    index: Slot
    generation: int


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What a token tells without a PIN (like a card's GET IDENTITY / GET STATUS)."""

    token_id: bytes
    identity: str
    role: str
    slots: tuple[SlotInfo, ...]
    pin_tries_left: int

    @property
    def locked(self) -> bool:
        return self.pin_tries_left <= 0

    def generation(self, slot: Slot) -> int:
        return self.slots[int(slot)].generation

    def kid(self, slot: Slot) -> str:
        return slot_kid(self.token_id, slot, self.generation(slot))


class SecureElement(ABC):
    """A node's secure element. Operations other than :meth:`info` need a verified PIN."""

    @abstractmethod
    def info(self) -> TokenInfo:
        """Identity and status; no PIN needed."""

    def check_present(self) -> None:
        """Confirm the element is still there and unlocked; a software token always is.

        A card may be pulled out: this raises ``TokenAbsent`` while it is gone
        and, once it is back, unlocks it again. The agent calls it periodically
        (off its event loop) to refuse new handshakes while the card is away.
        """
        return None

    def exclusive(self, *, wait: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the token against other processes for a run of operations (an AS link).

        ``wait`` bounds how long to wait for another process's hold (seconds; None: the
        element's default); the agent, on its event loop, passes 0 and tries again later.

        A link may change the token's keys. A second process's link that ran on
        keys read before that change would prove a superseded generation -- what
        a clone does -- and have the AS suspend the node. A card is one object
        that every process asks; a software token file is read into each
        process, so :class:`~mesh.token.software.SoftwareToken` locks it.
        """
        return contextlib.nullcontext()

    @abstractmethod
    def verify_pin(self, pin: str) -> None:
        """Unlock the token for this session.

        Raises ``WrongPin`` (counter decremented and persisted), ``TokenLocked``
        after ``MAX_PIN_TRIES`` consecutive failures.
        """

    @abstractmethod
    def unwrap(self, copy: str) -> bytes:
        """Decrypt a key wrapped for our ``WRAP`` slot (a CK copy or a discovery key).

        ``copy`` is a JWE compact whose ``kid`` names this token's current
        ``WRAP`` key. Raises ``UnwrapFailed`` when it is for another token or
        key generation, or fails authentication.
        """

    @abstractmethod
    def mac(self, slot: Slot, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under a slot key (``MAC`` or ``AUTH``)."""

    @abstractmethod
    def verify_mac(self, slot: Slot, data: bytes, tag: bytes) -> bool:
        """Constant-time check of a tag made by :meth:`mac`."""

    @abstractmethod
    def derive(self, slot: Slot, context: bytes) -> bytes:
        """A 32-byte key derived inside the token from a slot key and a fresh ``context``.

        HKDF-SHA256 (RFC 5869): ``ikm`` = the slot key, no salt, ``info`` =
        ``"snrmesh token derive v1" || context``. Only the ``AUTH`` slot
        derives; the static key itself never leaves the token. Used for the
        PSK of a link to an Authentication Server (the seed's "randoms
        encrypted with one of the client's static keys").
        """

    @abstractmethod
    def key_change(self, message: str) -> None:
        """Replace the slot keys with the ones carried by ``message``.

        ``message`` is a JWE compact (``A256KW``/``A256GCM``) under the current
        ``KEY_CHANGE`` key; every new generation must be strictly greater than
        the one it replaces. Atomic: either every slot changes or none does.
        Raises ``KeyChangeRefused``.
        """
