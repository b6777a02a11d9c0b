"""A token image: identity, slot generations, PIN counter and PIN-sealed slot keys, as bytes.

The software token stores one image per file; the virtual card stores one
inside its state file. Both therefore seal keys, count PIN tries and check
integrity the same way, and neither reads a file here: this module is pure.

Layout (``docs/keysets.md``): ``MAGIC || CBOR(fields) || SHA-256(both)``. The
trailing digest detects accidental corruption (a flipped byte reports
"corrupt", not "wrong PIN"); the AEAD's associated data is every field but the
PIN counter, so editing the identity or a generation breaks the seal.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import cbor2

from mesh.crypto import InvalidTag, Sealer, SealingParams
from mesh.crypto.primitives import CryptoError, sha256
from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import check_identity
from mesh.token.errors import TokenCorrupt, TokenError, TokenLocked, WrongPin
from mesh.token.interface import (
    KEY_SIZE,
    MAX_PIN_LENGTH,
    MAX_PIN_TRIES,
    MIN_PIN_LENGTH,
    SLOT_COUNT,
    TOKEN_ID_SIZE,
    Slot,
    SlotInfo,
    TokenInfo,
    slot_kid,
)
from mesh.wire.plain import check_plain

__all__ = ["MAX_ROLE_LENGTH", "PinCheck", "TokenImage", "check_pin", "is_identity"]

MAGIC = b"SNRTOKEN\x01"
DIGEST_SIZE = 32
MAX_ROLE_LENGTH = 32


def check_pin(pin: str) -> str:
    if not MIN_PIN_LENGTH <= len(pin) <= MAX_PIN_LENGTH:
        raise TokenError(f"a PIN must be {MIN_PIN_LENGTH}-{MAX_PIN_LENGTH} characters")
    return check_pin_text(pin)


def check_pin_text(pin: str) -> str:
    """A PIN is sealed and sent as UTF-8: one with lone surrogates (what ``os.environ`` makes
    of bytes not in the locale's encoding) is refused, as a card refuses one (``6A80``)."""
    try:
        pin.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenError(
            "a PIN must be UTF-8 text (not bytes outside the locale's encoding)"
        ) from None
    return pin


@dataclass(frozen=True, slots=True, repr=False)
class PinCheck:
    """The outcome of a PIN try: the image to store (counter updated) and the keys if right.

    The caller stores ``image`` when ``changed`` *before* reporting anything,
    then calls :meth:`raise_if_wrong`; so a wrong PIN is always counted, even
    if the process dies right after.
    """

    image: TokenImage
    changed: bool
    keys: tuple[bytes, ...] | None
    sealer: Sealer | None

    def raise_if_wrong(self) -> None:
        if self.keys is not None:
            return
        if self.image.tries_left == 0:
            raise TokenLocked("wrong PIN; the token is now locked")
        raise WrongPin(self.image.tries_left)


@dataclass(frozen=True, slots=True)
class TokenImage:
    token_id: bytes
    identity: str
    role: str
    generations: tuple[int, ...]
    params: SealingParams
    tries_left: int
    sealed: bytes

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        pin: str,
        token_id: bytes,
        identity: str,
        role: str,
        keys: Sequence[bytes],
        generations: Sequence[int],
    ) -> TokenImage:
        """A new image with ``keys`` sealed under ``pin`` (one scrypt) and a full PIN counter."""
        check_pin(pin)
        if len(keys) != SLOT_COUNT or any(len(k) != KEY_SIZE for k in keys):
            raise TokenError(f"a token needs {SLOT_COUNT} keys of {KEY_SIZE} bytes")
        params = SealingParams.generate()
        image = cls(token_id, identity, role, tuple(generations), params, MAX_PIN_TRIES, b"")
        return image.resealed(Sealer(pin, params), image.generations, keys)

    def resealed(
        self, sealer: Sealer, generations: Sequence[int], keys: Sequence[bytes]
    ) -> TokenImage:
        """This image with new keys and generations, sealed under the same PIN."""
        image = replace(self, generations=tuple(generations))
        return replace(image, sealed=sealer.seal(cbor2.dumps(list(keys)), image.aad()))

    # -- PIN ----------------------------------------------------------------------------------

    def try_pin(self, pin: str) -> PinCheck:
        """Open the seal with ``pin``. Raises ``TokenLocked`` when no try is left."""
        if self.tries_left <= 0:
            raise TokenLocked("token is locked after too many wrong PINs")
        check_pin_text(pin)  # not counted: no scrypt ran, nothing was learnt
        sealer = Sealer(pin, self.params)
        keys = self.open_keys(sealer)
        if keys is None:
            return PinCheck(replace(self, tries_left=self.tries_left - 1), True, None, None)
        full = replace(self, tries_left=MAX_PIN_TRIES)
        return PinCheck(full, self.tries_left != MAX_PIN_TRIES, keys, sealer)

    def open_keys(self, sealer: Sealer) -> tuple[bytes, ...] | None:
        """The slot keys under ``sealer`` (a PIN already checked), or None if it does not open.

        Another process's key change reseals the file under the same PIN: a
        process that holds the sealer opens the new keys without asking for the
        PIN again (``SoftwareToken.exclusive``).
        """
        try:
            keys = cbor2.loads(sealer.open(self.sealed, self.aad()))
        except InvalidTag:
            return None
        if (
            not isinstance(keys, list)
            or len(keys) != SLOT_COUNT
            or not all(isinstance(k, bytes) and len(k) == KEY_SIZE for k in keys)
        ):
            raise TokenCorrupt("token keys are malformed")
        return tuple(keys)

    # -- views --------------------------------------------------------------------------------

    def kid(self, slot: Slot) -> str:
        return slot_kid(self.token_id, slot, self.generations[int(slot)])

    def info(self) -> TokenInfo:
        return TokenInfo(
            token_id=self.token_id,
            identity=self.identity,
            role=self.role,
            slots=tuple(SlotInfo(Slot(i), g) for i, g in enumerate(self.generations)),
            pin_tries_left=self.tries_left,
        )

    # -- bytes --------------------------------------------------------------------------------

    def aad(self) -> bytes:
        """What the seal authenticates: everything but the PIN counter and the seal itself."""
        return MAGIC + cbor2.dumps(
            [
                self.token_id,
                self.identity,
                self.role,
                list(self.generations),
                [self.params.salt, self.params.n, self.params.r, self.params.p],
            ]
        )

    def encode(self) -> bytes:
        body = MAGIC + cbor2.dumps(
            {
                "id": self.token_id,
                "identity": self.identity,
                "role": self.role,
                "gens": list(self.generations),
                "kdf": [self.params.salt, self.params.n, self.params.r, self.params.p],
                "tries": self.tries_left,
                "sealed": self.sealed,
            }
        )
        return body + sha256(body)

    @classmethod
    def decode(cls, raw: bytes) -> TokenImage:
        if (
            len(raw) >= len(MAGIC)
            and raw.startswith(MAGIC[:-1])
            and raw[len(MAGIC) - 1] != MAGIC[-1]
        ):
            version = raw[len(MAGIC) - 1]
            raise TokenCorrupt(
                f"token file of format version {version}, this snrmesh reads {MAGIC[-1]}"
            )
        if len(raw) < len(MAGIC) + DIGEST_SIZE or not raw.startswith(MAGIC):
            raise TokenCorrupt("not a snrmesh token file (bad magic or truncated)")
        body, digest = raw[:-DIGEST_SIZE], raw[-DIGEST_SIZE:]
        if not hmac.compare_digest(sha256(body), digest):
            raise TokenCorrupt("token file is corrupt (checksum mismatch)")
        try:
            check_plain(body[len(MAGIC) :])  # an unkeyed checksum: anyone can write this file
            fields: Any = cbor2.loads(body[len(MAGIC) :])
            kdf = fields["kdf"]
            image = cls(
                token_id=fields["id"],
                identity=fields["identity"],
                role=fields["role"],
                generations=tuple(fields["gens"]),
                params=SealingParams(salt=kdf[0], n=kdf[1], r=kdf[2], p=kdf[3]),
                tries_left=fields["tries"],
                sealed=fields["sealed"],
            )
        except (cbor2.CBORDecodeError, KeyError, IndexError, TypeError, ValueError, CryptoError):
            raise TokenCorrupt("token file is corrupt (bad structure)") from None
        if (
            not isinstance(image.token_id, bytes)
            or len(image.token_id) != TOKEN_ID_SIZE
            or not is_identity(image.identity)
            or not isinstance(image.role, str)
            or len(image.role) > MAX_ROLE_LENGTH
            or not image.role.isprintable()
            or len(image.generations) != SLOT_COUNT
            or not all(type(g) is int and 1 <= g < 2**63 for g in image.generations)
            or type(image.tries_left) is not int
            or not 0 <= image.tries_left <= MAX_PIN_TRIES
            or not isinstance(image.sealed, bytes)
        ):
            raise TokenCorrupt("token file is corrupt (bad field)")
        return image


def is_identity(value: object) -> bool:
    """A node identity as the desk checks it (the file's checksum is no key: anyone can edit it,
    and a card's answer is no more trusted)."""
    if not isinstance(value, str):
        return False
    try:
        check_identity(value)
    except KeysetError:
        return False
    return True
