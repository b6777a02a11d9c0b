"""From a ``--token`` argument to a secure element: a file path, or ``pcsc:READER``.

Every command that takes ``--token`` goes through here, so each of them works
with a software token file and with a card alike. ``pcsc:`` alone means the
only reader present; ``pcsc:NAME`` a reader whose name is or contains NAME. A
token *file* whose name starts with ``pcsc:`` is written ``./pcsc:...``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.token.interface import SecureElement
from mesh.token.software import SoftwareToken

__all__ = ["PCSC_PREFIX", "is_card", "open_token", "personalise_token"]

PCSC_PREFIX = "pcsc:"


def is_card(spec: str) -> bool:
    return spec.startswith(PCSC_PREFIX)


def _reader(spec: str) -> str | None:
    return spec[len(PCSC_PREFIX) :] or None


def open_token(spec: str) -> SecureElement:
    """Open the token ``spec`` names (PIN not yet verified)."""
    if is_card(spec):
        from mesh.token.pcsc import PcscToken

        return PcscToken(_reader(spec))
    return SoftwareToken(spec)


def personalise_token(
    spec: str,
    *,
    pin: str,
    token_id: bytes,
    identity: str,
    role: str,
    keys: Sequence[bytes],
    generations: Sequence[int],
) -> None:
    """Write a new token: a new file, or a blank card personalised then closed.

    Refuses an existing file and a closed card alike. A file that cannot be
    written raises ``OSError`` (the desk reports it).
    """
    if not is_card(spec):
        SoftwareToken.personalise(
            spec,
            pin=pin,
            token_id=token_id,
            identity=identity,
            role=role,
            keys=keys,
            generations=generations,
        )
        return
    from mesh.token.pcsc import PcscToken

    card = PcscToken(_reader(spec))
    try:
        card.personalise(
            pin=pin,
            token_id=token_id,
            identity=identity,
            role=role,
            keys=keys,
            generations=generations,
        )
    finally:
        card.close()
