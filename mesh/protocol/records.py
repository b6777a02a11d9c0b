"""Session records: one sealer per sending key, one opener per receiving key.

A record is ``header (8) || AEAD(ciphertext || tag 16)`` with the header as
associated data and the 64-bit counter as the Noise nonce (``SetNonce``), so
type, length, key phase and counter are all authenticated (layout in
``frames.py``). Noise transport messages use an empty associated data; this
explicit-nonce variant is the one section 11.4 of the spec allows for
transports that lose or reorder messages.

Ordering rules, checked only after the tag verified (a forger must not be
able to move our state):

* stream: the counter must be exactly the next one (strict order);
* datagram: the counter must be new to an RFC 6479 window (``replay.py``).
"""

from __future__ import annotations

from mesh.crypto.noise import TAG_SIZE, CipherState
from mesh.crypto.primitives import InvalidTag
from mesh.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from mesh.protocol.frames import RECORD_HEADER_SIZE, RecordKind, pack_record_header
from mesh.protocol.replay import ReplayWindow

__all__ = ["RecordOpener", "RecordSealer"]


class RecordSealer:
    """Seals the records of one direction under one key; never reuses a counter."""

    __slots__ = ("_cipher", "limit", "phase")

    def __init__(self, cipher: CipherState, *, phase: int, limit: int) -> None:
        self._cipher = cipher
        self.phase = phase
        self.limit = limit

    @property
    def sent(self) -> int:
        """Records sealed so far: also the next counter (the CipherState's ``n``)."""
        return self._cipher.n

    def seal(self, kind: RecordKind, plaintext: bytes) -> bytes:
        cipher = self._cipher
        if cipher.n >= self.limit:
            raise LocalProtocolError("record limit of this key reached: rekey first")
        header = pack_record_header(kind, self.phase, cipher.n, len(plaintext) + TAG_SIZE)
        return header + cipher.encrypt_with_ad(header, plaintext)


class RecordOpener:
    """Opens the records of one direction under one key, refusing forgeries and replays."""

    __slots__ = ("_cipher", "_next", "_window", "phase", "received")

    def __init__(self, cipher: CipherState, *, phase: int, datagram: bool) -> None:
        self._cipher = cipher
        self._window = ReplayWindow() if datagram else None
        self._next = 0
        self.phase = phase
        self.received = 0

    def open(self, frame: bytes, counter: int) -> bytes:
        """The plaintext of a complete record frame whose header gave ``counter``."""
        cipher = self._cipher
        cipher.set_nonce(counter)
        try:
            plaintext = cipher.decrypt_with_ad(
                frame[:RECORD_HEADER_SIZE], frame[RECORD_HEADER_SIZE:]
            )
        except InvalidTag:
            raise RemoteProtocolError(Reason.AUTH_FAILED, "record did not authenticate") from None
        window = self._window
        if window is not None:
            if not window.check_and_update(counter):
                raise RemoteProtocolError(Reason.REPLAYED_RECORD, f"counter {counter}")
        elif counter != self._next:
            reason = Reason.REPLAYED_RECORD if counter < self._next else Reason.OUT_OF_ORDER
            raise RemoteProtocolError(reason, f"counter {counter}, expected {self._next}")
        else:
            self._next = counter + 1
        self.received += 1
        return plaintext
