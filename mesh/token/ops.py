"""The operations every secure element performs on its plain slot keys.

The software token and the card applet both call these functions, so a card
accepts and refuses exactly what a software token does, and for the same
:class:`~mesh.token.errors.Refusal`. Only the place the keys live differs: a
PIN-sealed file opened in the host process, or a card that never lets them out.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import hkdf_sha256, hmac_sha256
from mesh.keyset.copies import decrypt_copy, read_wrapped_kid
from mesh.keyset.errors import KeysetError
from mesh.token.errors import KeyChangeRefused, Refusal, TokenError, UnwrapFailed
from mesh.token.interface import DERIVE_INFO, KEY_SIZE, MAX_DERIVE_CONTEXT, Slot
from mesh.token.keychange import KeyChange, check_newer, key_change_kid, open_key_change

__all__ = [
    "MAC_SLOTS",
    "accept_key_change",
    "check_derive",
    "check_mac_slot",
    "derive_key",
    "mac",
    "unwrap",
]

MAC_SLOTS = frozenset({Slot.MAC, Slot.AUTH})


def _same(a: str, b: str) -> bool:
    # (kids are checked ASCII where they are read; "surrogatepass" keeps any str comparable)
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def unwrap(copy: str, *, key: bytes, kid: str) -> bytes:
    """Open a key wrapped (JWE ``A256KW``) for the ``WRAP`` key named ``kid``.

    The ``kid`` is compared before any cryptography, so a copy for another
    token or generation costs nothing and is told apart from a forged one.
    """
    try:
        wrapped_kid = read_wrapped_kid(copy)
    except KeysetError as exc:
        raise UnwrapFailed(f"not a wrapped key: {exc}") from None
    if not _same(wrapped_kid, kid):
        raise UnwrapFailed("wrapped for another token or key generation", refusal=Refusal.WRONG_KEY)
    try:
        pair_key = decrypt_copy(copy, jwk.JWK(kty="oct", k=base64url_encode(key)))
    except KeysetError:
        raise UnwrapFailed(
            "wrapped key failed authentication", refusal=Refusal.FAILED_AUTH
        ) from None
    if len(pair_key) != KEY_SIZE:
        raise UnwrapFailed("wrapped key is malformed")
    return pair_key


def check_mac_slot(slot: Slot) -> None:
    if slot not in MAC_SLOTS:
        raise TokenError(f"slot {slot.name} is not a MAC slot")


def mac(slot: Slot, data: bytes, *, key: bytes) -> bytes:
    """HMAC-SHA256 under a ``MAC`` or ``AUTH`` slot key (never ``WRAP``: no MAC oracle)."""
    check_mac_slot(slot)
    return hmac_sha256(key, data)


def check_derive(slot: Slot, context: bytes) -> None:
    if slot is not Slot.AUTH:
        raise TokenError(f"slot {slot.name} does not derive keys (only AUTH)")
    if len(context) > MAX_DERIVE_CONTEXT:
        raise TokenError(f"derive context over {MAX_DERIVE_CONTEXT} bytes")


def derive_key(slot: Slot, context: bytes, *, key: bytes) -> bytes:
    """HKDF-SHA256 of the ``AUTH`` slot key with ``"snrmesh token derive v1" || context``."""
    check_derive(slot, context)
    return hkdf_sha256(key, salt=None, info=DERIVE_INFO + context)


def accept_key_change(
    message: str,
    *,
    current_key: bytes,
    kid: str,
    token_id: bytes,
    generations: Sequence[int],
) -> KeyChange:
    """Check a key change against the token's current state; return the keys to install.

    Refuses (``KeyChangeRefused``) a message for another key (by ``kid`` then by
    token id), a forged one, and one not strictly newer in every slot. The
    caller installs the result in one atomic write.
    """
    if not _same(key_change_kid(message), kid):
        raise KeyChangeRefused(
            "key change is for another token or key generation", refusal=Refusal.WRONG_KEY
        )
    change = open_key_change(message, current_key=current_key)
    if not hmac.compare_digest(change.token_id, token_id):
        raise KeyChangeRefused("key change is for another token", refusal=Refusal.WRONG_KEY)
    check_newer(generations, change.generations)
    return change
