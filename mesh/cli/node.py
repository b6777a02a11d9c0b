"""What a node's own commands share: unlocking its token and opening its bundle with it."""

from __future__ import annotations

from mesh.cli.secrets import PIN_ENV, read_secret
from mesh.files import FileTooLarge, read_bounded
from mesh.keyset.bundle import MAX_BUNDLE_SIZE, Bundle, open_bundle
from mesh.keyset.errors import BundleError
from mesh.token.interface import SecureElement
from mesh.token.open import open_token

__all__ = ["read_bundle", "unlock_node"]


def unlock_node(token_spec: str, bundle_path: str) -> tuple[SecureElement, Bundle]:
    """Open the token, read the bundle (bounded), ask for the PIN, check the bundle with the token.

    The bundle is read before the PIN is asked for, so a missing or oversized
    file is reported without spending a PIN try. ``token_spec`` is a token
    file or ``pcsc:READER`` (:func:`mesh.token.open.open_token`).
    """
    token = open_token(token_spec)
    raw = read_bundle(bundle_path)
    if raw is None:
        raise BundleError(f"bundle {bundle_path} does not exist")
    token.verify_pin(read_secret(PIN_ENV, f"PIN for {token.info().identity}'s token: "))
    return token, open_bundle(raw, token)


def read_bundle(bundle_path: str) -> bytes | None:
    """The bundle file's bytes (bounded), None if there is no such file."""
    try:
        return read_bounded(bundle_path, MAX_BUNDLE_SIZE, what="bundle")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"cannot read bundle {bundle_path}: {exc.strerror}") from None
    except FileTooLarge as exc:
        raise BundleError(f"cannot read bundle {bundle_path}: {exc}") from None
