"""The Noise Protocol Framework (revision 34), on ``cryptography`` primitives.

Why our own and not the ``noiseprotocol`` package: the session layer needs a
small, typed, fast core whose every step a reviewer can match against the
spec, whose failures are :class:`mesh.errors.MeshError` subclasses, and whose
record layer can use explicit nonces (spec section 11.4, "out-of-order
transport messages"). The names are the spec's (``MixKey``, ``MixHash``,
``MixKeyAndHash``, ``Split``, ``EncryptAndHash``...), in snake case.

A handshake pattern is data (token tuples, section 7) and one loop walks it,
as in the spec's ``WriteMessage``/``ReadMessage``. Supported: the ``NN`` and
``KN`` patterns with ``pskN`` modifiers (section 9), DH ``25519``, ciphers
``ChaChaPoly`` and ``AESGCM``, hashes ``SHA256`` and ``BLAKE2s``: enough for
``Noise_NNpsk0_25519_ChaChaPoly_SHA256`` (the session protocol) and for every
vector in ``../shared/vectors/noise/``, which ``tests/crypto`` replays byte for
byte. Adding a pattern is adding a row to ``_PATTERNS``.

Failures: :class:`mesh.crypto.primitives.InvalidTag` when a ciphertext does not
authenticate, :class:`NoiseError` for everything else (bad lengths, misuse,
exhausted nonces, a low-order public key).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import dropwhile
from typing import Protocol

from cryptography.exceptions import InvalidTag as _CryptographyInvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from mesh.crypto.primitives import CryptoError, InvalidTag

__all__ = [
    "DHLEN",
    "HASHLEN",
    "KEY_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_NONCE",
    "PSK_SIZE",
    "TAG_SIZE",
    "CipherState",
    "HandshakeState",
    "KeyPair",
    "NoiseError",
    "NoiseProtocol",
    "SymmetricState",
]

DHLEN = 32
HASHLEN = 32
KEY_SIZE = 32
PSK_SIZE = 32
TAG_SIZE = 16
MAX_MESSAGE_SIZE = 65535
MAX_NONCE = 2**64 - 1  # reserved by the spec (section 5.1): never used to encrypt
_EMPTY = b""


class NoiseError(CryptoError):
    """A Noise operation was refused: bad length, misuse, exhausted nonce, bad public key."""


# -- DH functions (section 4.1): 25519 only ---------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32-byte encoding sent on the wire."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """``GENERATE_KEYPAIR()``: a fresh key from the OS CSPRNG (via OpenSSL)."""
        private = X25519PrivateKey.generate()
        return cls(private, private.public_key().public_bytes_raw())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """A fixed key pair: static keys and the test vectors' ephemerals."""
        if len(raw) != DHLEN:
            raise NoiseError(f"an X25519 private key is {DHLEN} bytes")
        private = X25519PrivateKey.from_private_bytes(raw)
        return cls(private, private.public_key().public_bytes_raw())


def _dh(key_pair: KeyPair, public_key: bytes) -> bytes:
    """``DH(key_pair, public_key)``; a low-order point (all-zero output) is refused."""
    try:
        return key_pair.private.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        raise NoiseError("X25519 refused the peer's public key (low order)") from None


# -- Cipher functions (section 4.2) -----------------------------------------------------


class _AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _CipherFunctions:
    """One AEAD: its constructor (keyed once per key) and its 96-bit nonce encoding of ``n``."""

    name: str
    new: Callable[[bytes], _AEAD]
    nonce: Callable[[int], bytes]


_CIPHERS = {
    # ChaChaPoly: 32 bits of zeros then little-endian n; AESGCM: zeros then big-endian n.
    "ChaChaPoly": _CipherFunctions("ChaChaPoly", ChaCha20Poly1305, struct.Struct("<4xQ").pack),
    "AESGCM": _CipherFunctions("AESGCM", AESGCM, struct.Struct(">4xQ").pack),
}


# -- Hash functions (section 4.3) -------------------------------------------------------


class _Digest(Protocol):
    def digest(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _HashFunctions:
    """A 32-byte hash (BLOCKLEN 64): its ``hashlib`` constructor and its ``hmac`` name."""

    name: str
    new: Callable[[bytes], _Digest]
    algorithm: str

    def hash(self, data: bytes) -> bytes:
        return self.new(data).digest()

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
        """``HKDF(chaining_key, input_key_material, num_outputs)`` of section 4.3.

        HASHLEN is 32 for both hashes, so no output needs truncating.
        """
        algorithm = self.algorithm
        temp_key = hmac.digest(chaining_key, ikm, algorithm)
        output1 = hmac.digest(temp_key, b"\x01", algorithm)
        output2 = hmac.digest(temp_key, output1 + b"\x02", algorithm)
        if outputs == 2:
            return output1, output2
        return output1, output2, hmac.digest(temp_key, output2 + b"\x03", algorithm)


_HASHES = {
    "SHA256": _HashFunctions("SHA256", hashlib.sha256, "sha256"),
    "BLAKE2s": _HashFunctions("BLAKE2s", hashlib.blake2s, "blake2s"),
}


# -- Handshake patterns (sections 7 and 9) ----------------------------------------------

# name -> (initiator pre-message, responder pre-message, message patterns).
_PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "NN": ((), (), (("e",), ("e", "ee"))),
    "KN": (("s",), (), (("e",), ("e", "ee", "se"))),
}

# DH tokens: (initiator's key, responder's key) -- "se" is the initiator's s with the responder's e.
_DH_TOKENS = {"ee": ("e", "e"), "es": ("e", "s"), "se": ("s", "e"), "ss": ("s", "s")}


@dataclass(frozen=True, slots=True)
class NoiseProtocol:
    """A parsed protocol name such as ``Noise_NNpsk0_25519_ChaChaPoly_SHA256``."""

    name: bytes
    pattern: str
    initiator_premessage: tuple[str, ...]
    responder_premessage: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]
    psk_count: int
    leading_psks: int  # psk tokens that open message 1 (psk0): mixed at Initialize()
    cipher: _CipherFunctions
    hash: _HashFunctions
    initial_h: bytes  # InitializeSymmetric's h, computed once per protocol

    @classmethod
    def from_name(cls, name: str) -> NoiseProtocol:
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise NoiseError(f"not a Noise protocol name: {name!r}")
        _, pattern, dh, cipher, hash_name = parts
        if dh != "25519" or cipher not in _CIPHERS or hash_name not in _HASHES:
            raise NoiseError(f"unsupported Noise functions in {name!r}")
        base, modifiers = pattern[:2], pattern[2:]
        if base not in _PATTERNS:
            raise NoiseError(f"unsupported Noise pattern in {name!r}")
        pre_i, pre_r, base_messages = _PATTERNS[base]
        messages = [list(tokens) for tokens in base_messages]
        psk_count = 0
        for modifier in modifiers.split("+") if modifiers else ():
            index = modifier.removeprefix("psk")
            if modifier == index or not index.isdigit() or int(index) > len(messages):
                raise NoiseError(f"unsupported modifier {modifier!r} in {name!r}")
            # psk0 goes first in the first message; pskN (N >= 1) last in message N.
            if int(index) == 0:
                messages[0].insert(0, "psk")
            else:
                messages[int(index) - 1].append("psk")
            psk_count += 1
        encoded = name.encode("ascii")
        hash_functions = _HASHES[hash_name]
        return cls(
            name=encoded,
            pattern=pattern,
            initiator_premessage=pre_i,
            responder_premessage=pre_r,
            messages=tuple(tuple(tokens) for tokens in messages),
            psk_count=psk_count,
            leading_psks=len(messages[0]) - len(tuple(dropwhile("psk".__eq__, messages[0]))),
            cipher=_CIPHERS[cipher],
            hash=hash_functions,
            initial_h=(
                encoded.ljust(HASHLEN, b"\x00")
                if len(encoded) <= HASHLEN
                else hash_functions.hash(encoded)
            ),
        )


# -- Processing rules (section 5) -------------------------------------------------------


class CipherState:
    """Section 5.1: a key (or none) and a 64-bit nonce.

    The AEAD object is built on the first use of a key, then reused for every
    message: keying costs as much as sealing a small record, and a handshake
    replaces most of its keys before using them.
    """

    __slots__ = ("_aead", "_cipher", "_key", "n")

    def __init__(self, cipher: _CipherFunctions, key: bytes | None = None) -> None:
        self._cipher = cipher
        self._key: bytes | None = None
        self._aead: _AEAD | None = None
        self.n = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise NoiseError(f"a cipher key is {KEY_SIZE} bytes")
        self._key = key
        self._aead = None
        self.n = 0

    def has_key(self) -> bool:
        return self._key is not None

    def copy(self) -> CipherState:
        """Same key and nonce, independent from now on (AEAD objects are stateless: shared)."""
        clone = CipherState.__new__(CipherState)
        clone._cipher, clone._key, clone._aead, clone.n = (
            self._cipher,
            self._key,
            self._aead,
            self.n,
        )
        return clone

    def _keyed(self) -> _AEAD | None:
        aead = self._aead
        if aead is None and self._key is not None:
            aead = self._aead = self._cipher.new(self._key)
        return aead

    def set_nonce(self, nonce: int) -> None:
        """``SetNonce``: how records with explicit counters choose their nonce."""
        if not 0 <= nonce < MAX_NONCE:
            raise NoiseError("nonce out of range")
        self.n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        aead = self._aead or self._keyed()
        if aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce space exhausted")
        ciphertext = aead.encrypt(self._cipher.nonce(self.n), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt, or raise :class:`InvalidTag` and leave ``n`` unchanged (as the spec says)."""
        aead = self._aead or self._keyed()
        if aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce space exhausted")
        try:
            plaintext = aead.decrypt(self._cipher.nonce(self.n), ciphertext, ad)
        except _CryptographyInvalidTag:
            raise InvalidTag("Noise ciphertext did not authenticate") from None
        self.n += 1
        return plaintext


class SymmetricState:
    """Section 5.2: the chaining key ``ck``, the handshake hash ``h`` and a CipherState."""

    __slots__ = ("_cipher", "_hash", "cipher_state", "ck", "h")

    def __init__(self, protocol: NoiseProtocol) -> None:
        """``InitializeSymmetric(protocol_name)``."""
        self._hash = protocol.hash
        self._cipher = protocol.cipher
        self.h = self.ck = protocol.initial_h
        self.cipher_state = CipherState(self._cipher)

    def copy(self) -> SymmetricState:
        clone = SymmetricState.__new__(SymmetricState)
        clone._hash, clone._cipher, clone.ck, clone.h = self._hash, self._cipher, self.ck, self.h
        clone.cipher_state = self.cipher_state.copy()
        return clone

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = self._hash.hkdf(self.ck, input_key_material, 2)
        self.cipher_state.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = self._hash.new(self.h + data).digest()

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.ck, temp_h, temp_k = self._hash.hkdf(self.ck, input_key_material, 3)
        self.h = self._hash.new(self.h + temp_h).digest()  # MixHash(temp_h)
        self.cipher_state.initialize_key(temp_k)

    def get_handshake_hash(self) -> bytes:
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Two CipherStates: initiator-to-responder first, responder-to-initiator second."""
        temp_k1, temp_k2 = self._hash.hkdf(self.ck, _EMPTY, 2)
        return CipherState(self._cipher, temp_k1), CipherState(self._cipher, temp_k2)


class HandshakeState:
    """Section 5.3: one side of a handshake, driven by ``write_message``/``read_message``.

    After the last message, :attr:`cipher_states` holds the ``Split()`` pair
    (initiator-to-responder, responder-to-initiator) and :attr:`handshake_hash`
    the final ``h``. A failed :meth:`read_message` or :meth:`write_message`
    leaves the state unusable; a caller that must survive a forged message (a
    datagram endpoint waiting for the genuine one) reads from a :meth:`copy`.
    """

    __slots__ = (
        "_e",
        "_initiator",
        "_message_index",
        "_protocol",
        "_psk_index",
        "_psks",
        "_s",
        "_symmetric",
        "cipher_states",
        "handshake_hash",
        "re",
        "rs",
    )

    def __init__(
        self,
        protocol: NoiseProtocol,
        *,
        initiator: bool,
        prologue: bytes,
        psks: Sequence[bytes] = (),
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
    ) -> None:
        """``Initialize()``; ``e`` is only passed by known-answer tests (else it is generated)."""
        if len(psks) != protocol.psk_count or any(len(psk) != PSK_SIZE for psk in psks):
            raise NoiseError(f"{protocol.pattern} needs {protocol.psk_count} PSKs of {PSK_SIZE} B")
        self._protocol = protocol
        self._initiator = initiator
        self._psks = tuple(psks)
        self._psk_index = 0
        self._s = s
        self._e = e
        self.rs = rs
        self.re: bytes | None = None
        self._message_index = 0
        self.cipher_states: tuple[CipherState, CipherState] | None = None
        self.handshake_hash: bytes | None = None
        symmetric = self._symmetric = SymmetricState(protocol)
        symmetric.mix_hash(prologue)
        for premessage, ours in (
            (protocol.initiator_premessage, initiator),
            (protocol.responder_premessage, not initiator),
        ):
            for token in premessage:  # only "s" pre-messages exist in the supported patterns
                key = (s.public if s is not None else None) if ours else rs
                if token != "s" or key is None:
                    raise NoiseError(f"{protocol.pattern} needs the pre-message static key")
                symmetric.mix_hash(key)
        # psk tokens that open message 1 depend on nothing in it: mixing them now is
        # the same computation, and lets copy() start handshakes from this point.
        for _ in range(protocol.leading_psks):
            self._mix_psk()

    def copy(self) -> HandshakeState:
        """An independent copy, to try a message on without risking this state.

        Also how handshakes start cheaply: ``Initialize()`` (prologue,
        pre-messages, leading psk) depends only on the peers and their keys, so
        a caller may run it once per peer and start each handshake from a copy
        (the ephemeral key pair, once generated, is shared with copies).
        """
        clone = HandshakeState.__new__(HandshakeState)
        clone._protocol, clone._initiator = self._protocol, self._initiator
        clone._psks, clone._psk_index = self._psks, self._psk_index
        clone._s, clone._e, clone.rs, clone.re = self._s, self._e, self.rs, self.re
        clone._message_index = self._message_index
        clone.cipher_states, clone.handshake_hash = self.cipher_states, self.handshake_hash
        clone._symmetric = self._symmetric.copy()
        return clone

    def _next_tokens(self, writing: bool) -> tuple[str, ...]:
        messages = self._protocol.messages
        index = self._message_index
        if index >= len(messages):
            raise NoiseError("the handshake is already finished")
        if (index % 2 == 0) != (self._initiator == writing):
            raise NoiseError("not our turn to " + ("write" if writing else "read"))
        self._message_index = index + 1
        return messages[index][self._protocol.leading_psks :] if index == 0 else messages[index]

    def _mix_dh(self, token: str) -> None:
        initiator_key, responder_key = _DH_TOKENS[token]
        local, remote = (
            (initiator_key, responder_key) if self._initiator else (responder_key, initiator_key)
        )
        key_pair = self._e if local == "e" else self._s
        public = self.re if remote == "e" else self.rs
        if key_pair is None or public is None:
            raise NoiseError(f"token {token!r} needs a key this side does not have")
        self._symmetric.mix_key(_dh(key_pair, public))

    def _mix_psk(self) -> None:
        self._symmetric.mix_key_and_hash(self._psks[self._psk_index])
        self._psk_index += 1

    def _finish_if_last(self) -> None:
        if self._message_index == len(self._protocol.messages):
            self.cipher_states = self._symmetric.split()
            self.handshake_hash = self._symmetric.get_handshake_hash()

    def write_message(self, payload: bytes) -> bytes:
        symmetric = self._symmetric
        psk_mode = self._protocol.psk_count > 0
        out: list[bytes] = []
        for token in self._next_tokens(writing=True):
            if token == "e":
                if self._e is None:
                    self._e = KeyPair.generate()
                public = self._e.public
                out.append(public)
                symmetric.mix_hash(public)
                if psk_mode:
                    symmetric.mix_key(public)
            elif token == "psk":
                self._mix_psk()
            else:
                self._mix_dh(token)
        out.append(symmetric.encrypt_and_hash(payload))
        message = b"".join(out)
        if len(message) > MAX_MESSAGE_SIZE:
            raise NoiseError("Noise message too large")
        self._finish_if_last()
        return message

    def read_message(self, message: bytes) -> bytes:
        """Process one message; :class:`InvalidTag` means it was not made with our keys."""
        if len(message) > MAX_MESSAGE_SIZE:
            raise NoiseError("Noise message too large")
        message = bytes(message)  # other implementations hand us bytearrays
        symmetric = self._symmetric
        psk_mode = self._protocol.psk_count > 0
        offset = 0
        for token in self._next_tokens(writing=False):
            if token == "e":
                if len(message) - offset < DHLEN:
                    raise NoiseError("Noise message too short for an ephemeral key")
                self.re = message[offset : offset + DHLEN]
                offset += DHLEN
                symmetric.mix_hash(self.re)
                if psk_mode:
                    symmetric.mix_key(self.re)
            elif token == "psk":
                self._mix_psk()
            else:
                self._mix_dh(token)
        rest = message[offset:]
        if symmetric.cipher_state.has_key() and len(rest) < TAG_SIZE:
            raise NoiseError("Noise message too short for its tag")
        payload = symmetric.decrypt_and_hash(rest)
        self._finish_if_last()
        return payload
