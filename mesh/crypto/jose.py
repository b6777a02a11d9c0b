"""A minimal RFC 7516 compact-JWE *encoder*: ``alg`` A256KW, ``enc`` A256GCM, nothing else.

Why it exists: every CK copy the desk and the Authentication Server issue is
such a JWE, and jwcrypto -- still our decoder and the reference every test
checks this encoder against -- deep-copies its whole header registry in each
object it builds (``JWE()``, its recipients), which made that copying the
largest single cost of issuing a keyset. The format needs four primitives
(RFC 7516 §5.1), so this encoder builds exactly that and accepts nothing else:

    BASE64URL(protected) . BASE64URL(AES-KW(kek, cek)) . BASE64URL(iv)
        . BASE64URL(ciphertext) . BASE64URL(tag)

with a fresh 256-bit CEK and 96-bit IV per message and the ASCII of the first
part as the GCM associated data. The protected header is serialised with
compact JSON (``separators=(",", ":")``) in the caller's key order, the bytes
jwcrypto would emit for the same header string. There is deliberately no
decoder here: decryption (and its header and algorithm checks) stays with
jwcrypto and the tokens.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping

from mesh.crypto.primitives import (
    AEAD_KEY_SIZE,
    GCM_NONCE_SIZE,
    CryptoError,
    aes_key_wrap,
    aesgcm_encrypt,
    random_bytes,
)

__all__ = [
    "ALG",
    "ENC",
    "MAX_JWE_PLAINTEXT",
    "UNSUPPORTED_HEADERS",
    "b64url",
    "encrypt_compact_a256kw",
]

ALG = "A256KW"
ENC = "A256GCM"
GCM_TAG_SIZE = 16
MAX_JWE_PLAINTEXT = 4096  # what we wrap is a key or a small message, never bulk data
# header parameters that would promise processing this encoder does not do (RFC 7516 §4.1)
UNSUPPORTED_HEADERS = frozenset({"zip", "crit"})


_URLSAFE = bytes.maketrans(b"+/", b"-_")
# one encoder, made once: json.dumps with any option builds a new JSONEncoder per call
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def b64url(data: bytes) -> str:
    """BASE64URL of RFC 7515 §2: the URL-safe alphabet, no padding (what jwcrypto emits)."""
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_URLSAFE).decode()


def encrypt_compact_a256kw(kek: bytes, header: Mapping[str, object], plaintext: bytes) -> str:
    """Encrypt ``plaintext`` to the holder of ``kek`` as a compact JWE (A256KW + A256GCM).

    ``header`` is the whole protected header; it must name exactly this
    algorithm pair, and may not ask for compression or critical extensions,
    so that no JWE claims processing it was not made with. The plaintext is
    1 to :data:`MAX_JWE_PLAINTEXT` bytes (jwcrypto refuses an empty one).
    """
    if len(kek) != AEAD_KEY_SIZE:
        raise CryptoError(f"A256KW key must be {AEAD_KEY_SIZE} bytes")
    if header.get("alg") != ALG or header.get("enc") != ENC:
        raise CryptoError(f"header must say alg {ALG}, enc {ENC}")
    if not UNSUPPORTED_HEADERS.isdisjoint(header):
        raise CryptoError("header asks for compression or critical extensions")
    if not 0 < len(plaintext) <= MAX_JWE_PLAINTEXT:
        raise CryptoError(f"JWE plaintext must be 1 to {MAX_JWE_PLAINTEXT} bytes")
    protected = b64url(_COMPACT_JSON.encode(header).encode("utf-8"))
    cek = random_bytes(AEAD_KEY_SIZE)
    iv = random_bytes(GCM_NONCE_SIZE)
    sealed = aesgcm_encrypt(cek, iv, plaintext, protected.encode("ascii"))
    return ".".join(
        (
            protected,
            b64url(aes_key_wrap(kek, cek)),
            b64url(iv),
            b64url(sealed[:-GCM_TAG_SIZE]),
            b64url(sealed[-GCM_TAG_SIZE:]),
        )
    )
