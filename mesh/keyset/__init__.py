"""Communication Keysets, their wrapped JWE copies, and node bundles."""

from __future__ import annotations

from mesh.keyset.copies import CopyHeader, decrypt_copy, open_copy, read_copy_header, wrap_copy
from mesh.keyset.errors import BundleError, KeysetError
from mesh.keyset.keyset import (
    CK_ID_SIZE,
    MISSION_ID_SIZE,
    PAIR_KEY_SIZE,
    CommunicationKeyset,
    check_identity,
)

__all__ = [
    "CK_ID_SIZE",
    "MISSION_ID_SIZE",
    "PAIR_KEY_SIZE",
    "BundleError",
    "CommunicationKeyset",
    "CopyHeader",
    "KeysetError",
    "check_identity",
    "decrypt_copy",
    "open_copy",
    "read_copy_header",
    "wrap_copy",
]
