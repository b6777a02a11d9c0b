"""The software token: a secure element emulated by one PIN-sealed file.

For laptops without a smartcard. The file holds the identity in the clear
(like a card answers GET IDENTITY without a PIN) and the slot keys sealed
under a key derived from the PIN (scrypt, N >= 2^15, then ChaCha20-Poly1305).

Layout (``docs/keysets.md``): ``MAGIC || CBOR(header) || SHA-256(both)``. The
trailing digest detects accidental corruption (a flipped byte reports
"corrupt", not "wrong PIN"); the AEAD's associated data is the header minus
the PIN counter, so editing the identity or generations breaks the seal.

The retry counter lives in the file and is decremented *before* a wrong PIN
is reported. Honest limit: someone who copies the file can restore the counter
and guess offline; scrypt makes each guess cost ~0.1 s and a card (PC/SC
backend) removes that limit. Writes are atomic (:func:`mesh.files.write_atomic`).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import cbor2
from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import InvalidTag, Sealer, SealingParams, hkdf_sha256, hmac_sha256
from mesh.crypto.primitives import CryptoError, sha256
from mesh.files import FileTooLarge, read_bounded, write_atomic
from mesh.keyset.copies import decrypt_copy, read_wrapped_kid
from mesh.keyset.errors import KeysetError
from mesh.token.errors import (
    KeyChangeRefused,
    TokenCorrupt,
    TokenError,
    TokenLocked,
    TokenNotReady,
    UnwrapFailed,
    WrongPin,
)
from mesh.token.interface import (
    DERIVE_INFO,
    KEY_SIZE,
    MAX_DERIVE_CONTEXT,
    MAX_PIN_LENGTH,
    MAX_PIN_TRIES,
    MIN_PIN_LENGTH,
    SLOT_COUNT,
    TOKEN_ID_SIZE,
    SecureElement,
    Slot,
    SlotInfo,
    TokenInfo,
    slot_kid,
)
from mesh.token.keychange import check_newer, key_change_kid, open_key_change

__all__ = ["MAX_TOKEN_FILE_SIZE", "SoftwareToken", "check_pin"]

MAGIC = b"SNRTOKEN\x01"
DIGEST_SIZE = 32
MAX_TOKEN_FILE_SIZE = 16 * 1024
MAX_ROLE_LENGTH = 32
MAC_SLOTS = frozenset({Slot.MAC, Slot.AUTH})


def check_pin(pin: str) -> str:
    if not MIN_PIN_LENGTH <= len(pin) <= MAX_PIN_LENGTH:
        raise TokenError(f"a PIN must be {MIN_PIN_LENGTH}-{MAX_PIN_LENGTH} characters")
    return pin


@dataclass(frozen=True, slots=True)
class _Header:
    token_id: bytes
    identity: str
    role: str
    generations: tuple[int, ...]
    params: SealingParams
    tries_left: int
    sealed: bytes

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
    def decode(cls, raw: bytes) -> _Header:
        if len(raw) < len(MAGIC) + DIGEST_SIZE or not raw.startswith(MAGIC):
            raise TokenCorrupt("not a snrmesh token file (bad magic or truncated)")
        body, digest = raw[:-DIGEST_SIZE], raw[-DIGEST_SIZE:]
        if not hmac.compare_digest(sha256(body), digest):
            raise TokenCorrupt("token file is corrupt (checksum mismatch)")
        try:
            fields: Any = cbor2.loads(body[len(MAGIC) :])
            kdf = fields["kdf"]
            header = cls(
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
            not isinstance(header.token_id, bytes)
            or len(header.token_id) != TOKEN_ID_SIZE
            or not isinstance(header.identity, str)
            or not isinstance(header.role, str)
            or len(header.role) > MAX_ROLE_LENGTH
            or len(header.generations) != SLOT_COUNT
            or not all(type(g) is int and g >= 1 for g in header.generations)
            or type(header.tries_left) is not int
            or not 0 <= header.tries_left <= MAX_PIN_TRIES
            or not isinstance(header.sealed, bytes)
        ):
            raise TokenCorrupt("token file is corrupt (bad field)")
        return header


def _seal_keys(sealer: Sealer, header: _Header, keys: Sequence[bytes]) -> bytes:
    return sealer.seal(cbor2.dumps(list(keys)), header.aad())


class SoftwareToken(SecureElement):
    """A :class:`SecureElement` backed by one file. Not safe for two processes at once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._header = self._load()
        self._sealer: Sealer | None = None
        self._keys: tuple[bytes, ...] | None = None

    # -- personalisation (desk only) ---------------------------------------------------------

    @classmethod
    def personalise(
        cls,
        path: str | os.PathLike[str],
        *,
        pin: str,
        token_id: bytes,
        identity: str,
        role: str,
        keys: Sequence[bytes],
        generations: Sequence[int],
    ) -> SoftwareToken:
        """Create a new token file. Refuses to overwrite an existing file."""
        check_pin(pin)
        if os.path.exists(path):
            raise TokenError(f"token file {os.fspath(path)} already exists; refusing to overwrite")
        if len(keys) != SLOT_COUNT or any(len(k) != KEY_SIZE for k in keys):
            raise TokenError(f"a token needs {SLOT_COUNT} keys of {KEY_SIZE} bytes")
        params = SealingParams.generate()
        header = _Header(token_id, identity, role, tuple(generations), params, MAX_PIN_TRIES, b"")
        sealer = Sealer(pin, params)
        header = replace(header, sealed=_seal_keys(sealer, header, keys))
        write_atomic(path, header.encode())
        return cls(path)

    # -- SecureElement ----------------------------------------------------------------------------

    def _load(self) -> _Header:
        try:
            raw = read_bounded(self.path, MAX_TOKEN_FILE_SIZE, what="token file")
        except FileNotFoundError:
            raise TokenError(f"token file {self.path} does not exist") from None
        except OSError as exc:
            raise TokenError(f"cannot read token file {self.path}: {exc.strerror}") from None
        except FileTooLarge as exc:
            raise TokenCorrupt(str(exc)) from None
        return _Header.decode(raw)

    def info(self) -> TokenInfo:
        h = self._header
        return TokenInfo(
            token_id=h.token_id,
            identity=h.identity,
            role=h.role,
            slots=tuple(SlotInfo(Slot(i), g) for i, g in enumerate(h.generations)),
            pin_tries_left=h.tries_left,
        )

    def _store(self, header: _Header) -> None:
        write_atomic(self.path, header.encode())
        self._header = header

    def verify_pin(self, pin: str) -> None:
        self._header = self._load()  # another process may have counted tries
        if self._header.tries_left <= 0:
            raise TokenLocked("token is locked after too many wrong PINs")
        sealer = Sealer(pin, self._header.params)
        try:
            keys = cbor2.loads(sealer.open(self._header.sealed, self._header.aad()))
        except InvalidTag:
            left = self._header.tries_left - 1
            self._store(replace(self._header, tries_left=left))
            if left == 0:
                raise TokenLocked("wrong PIN; the token is now locked") from None
            raise WrongPin(left) from None
        if (
            not isinstance(keys, list)
            or len(keys) != SLOT_COUNT
            or not all(isinstance(k, bytes) and len(k) == KEY_SIZE for k in keys)
        ):
            raise TokenCorrupt("token keys are malformed")
        if self._header.tries_left != MAX_PIN_TRIES:
            self._store(replace(self._header, tries_left=MAX_PIN_TRIES))
        self._sealer, self._keys = sealer, tuple(keys)

    def _key(self, slot: Slot) -> bytes:
        if self._keys is None:
            raise TokenNotReady("verify the PIN first")
        return self._keys[int(slot)]

    def _kid(self, slot: Slot) -> str:
        return slot_kid(self._header.token_id, slot, self._header.generations[int(slot)])

    def unwrap(self, copy: str) -> bytes:
        key = self._key(Slot.WRAP)
        try:
            kid = read_wrapped_kid(copy)
        except KeysetError as exc:
            raise UnwrapFailed(f"not a wrapped key: {exc}") from None
        if not hmac.compare_digest(kid.encode(), self._kid(Slot.WRAP).encode()):
            raise UnwrapFailed("wrapped for another token or key generation")
        try:
            pair_key = decrypt_copy(copy, jwk.JWK(kty="oct", k=base64url_encode(key)))
        except KeysetError:
            raise UnwrapFailed("wrapped key failed authentication") from None
        if len(pair_key) != KEY_SIZE:
            raise UnwrapFailed("wrapped key is malformed")
        return pair_key

    def mac(self, slot: Slot, data: bytes) -> bytes:
        if slot not in MAC_SLOTS:
            raise TokenError(f"slot {slot.name} is not a MAC slot")
        return hmac_sha256(self._key(slot), data)

    def derive(self, slot: Slot, context: bytes) -> bytes:
        if slot is not Slot.AUTH:
            raise TokenError(f"slot {slot.name} does not derive keys (only AUTH)")
        if len(context) > MAX_DERIVE_CONTEXT:
            raise TokenError(f"derive context over {MAX_DERIVE_CONTEXT} bytes")
        return hkdf_sha256(self._key(slot), salt=None, info=DERIVE_INFO + context)

    def verify_mac(self, slot: Slot, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(slot, data), tag)

    def key_change(self, message: str) -> None:
        current = self._key(Slot.KEY_CHANGE)
        sealer = self._sealer
        if sealer is None:  # pragma: no cover - set together with the keys
            raise TokenNotReady("verify the PIN first")
        if key_change_kid(message) != self._kid(Slot.KEY_CHANGE):
            raise KeyChangeRefused("key change is for another token or key generation")
        change = open_key_change(message, current_key=current)
        if not hmac.compare_digest(change.token_id, self._header.token_id):
            raise KeyChangeRefused("key change is for another token")
        check_newer(self._header.generations, change.generations)
        header = replace(self._header, generations=change.generations)
        header = replace(header, sealed=_seal_keys(sealer, header, change.keys))
        self._store(header)
        self._keys = change.keys
