"""What a card keeps across power cycles: its life-cycle state and its token image.

A real card keeps this in EEPROM; the virtual card (``snrmesh card emulate``)
keeps it in one file, written atomically by the emulator whenever the applet
changes it. Layout: ``MAGIC || CBOR {"life": int, "image": bytes | null} ||
SHA-256(both)``, where ``image`` is a token image (:mod:`mesh.token.image`):
the slot keys are sealed under the card's PIN, so the file is useless without
it, and a wrong PIN is counted in the file before the card answers.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import cbor2

from mesh.crypto.primitives import sha256
from mesh.token.errors import TokenCorrupt
from mesh.token.image import TokenImage
from mesh.wire.plain import check_plain

__all__ = ["MAX_CARD_STATE_SIZE", "CardState", "LifeCycle"]

MAGIC = b"SNRCARD\x01"
DIGEST_SIZE = 32
MAX_CARD_STATE_SIZE = 16 * 1024


class LifeCycle(IntEnum):
    """The applet's life cycle (values as in GlobalPlatform's application states)."""

    BLANK = 0x01  # no identity, no keys: PERSONALISE only
    OPEN = 0x03  # personalised, not yet closed: PERSONALISE again (a retry) or CLOSE
    CLOSED = 0x07  # in service: PIN and key commands; never PERSONALISE again


@dataclass(frozen=True, slots=True)
class CardState:
    life: LifeCycle = LifeCycle.BLANK
    image: TokenImage | None = None

    def __post_init__(self) -> None:
        if (self.life is LifeCycle.BLANK) != (self.image is None):
            raise TokenCorrupt("card state is inconsistent (keys without identity or the reverse)")

    def encode(self) -> bytes:
        image = None if self.image is None else self.image.encode()
        body = MAGIC + cbor2.dumps({"life": int(self.life), "image": image})
        return body + sha256(body)

    @classmethod
    def decode(cls, raw: bytes) -> CardState:
        if len(raw) > MAX_CARD_STATE_SIZE:
            raise TokenCorrupt(f"card state over {MAX_CARD_STATE_SIZE} bytes")
        if len(raw) < len(MAGIC) + DIGEST_SIZE or not raw.startswith(MAGIC):
            raise TokenCorrupt("not a snrmesh card state (bad magic or truncated)")
        body, digest = raw[:-DIGEST_SIZE], raw[-DIGEST_SIZE:]
        if not hmac.compare_digest(sha256(body), digest):
            raise TokenCorrupt("card state is corrupt (checksum mismatch)")
        try:
            check_plain(body[len(MAGIC) :])
            fields: Any = cbor2.loads(body[len(MAGIC) :])
            life = LifeCycle(fields["life"])
            image = fields["image"]
        except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError):
            raise TokenCorrupt("card state is corrupt (bad structure)") from None
        if image is not None and not isinstance(image, bytes):
            raise TokenCorrupt("card state is corrupt (bad image)")
        return cls(life, None if image is None else TokenImage.decode(image))
