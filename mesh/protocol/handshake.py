"""The two halves of the session handshake: Noise_NNpsk0_25519_ChaChaPoly_SHA256.

::

    -> psk, e      message 1: INIT   = ck_id + e + AEAD_psk(timestamp, capabilities)
    <- e, ee       message 2: RESPONSE = e + AEAD(capabilities)

The PSK is the CK's pair key and the prologue binds the CK's context
(``prologue.py``), so only the two holders of that CK, in those roles, can
produce a message that authenticates. The ephemeral keys are the seed's
"randoms" (CASQUE SNR section 2.3); because they are X25519 keys and ``ee``
is mixed in, a CK stolen later does not decrypt recorded sessions.

The responder authenticates message 1 (its AEAD tag, keyed from the PSK)
before any DH: a sender without the CK costs it hashes and one AEAD, never an
X25519 operation. Message 1's payload has no forward secrecy (it is only
under the PSK), so it carries nothing secret.

This module does the cryptography of each step and knows nothing of
connections, timers or high-water marks: ``connection.py`` sequences it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from mesh.crypto.noise import CipherState, HandshakeState, NoiseError, NoiseProtocol
from mesh.crypto.primitives import InvalidTag
from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol.errors import Reason, RemoteProtocolError
from mesh.protocol.frames import (
    Init,
    pack_init_payload,
    pack_response_payload,
    pull_response,
    push_init,
    push_response,
    unpack_init_payload,
    unpack_response_payload,
)
from mesh.protocol.keysets import KeysetLookup
from mesh.protocol.prologue import build_prologue

__all__ = [
    "NOISE_PROTOCOL",
    "PROTOCOL_NAME",
    "InitiatorHandshake",
    "ResponderHandshake",
    "SessionKeys",
    "check_keyset",
]

PROTOCOL_NAME = "Noise_NNpsk0_25519_ChaChaPoly_SHA256"
NOISE_PROTOCOL = NoiseProtocol.from_name(PROTOCOL_NAME)
TEMPLATE_CACHE_SIZE = 256  # initialized handshakes kept, one per (CK, roles) in use


class SessionKeys(NamedTuple):
    """The ``Split()`` of one handshake, oriented for this side.

    A named tuple rather than a dataclass: it is built twice per handshake and
    consumed at once, and a tuple is the cheapest immutable value to build.
    """

    send: CipherState
    receive: CipherState
    peer_capabilities: int
    handshake_hash: bytes  # Noise's final h: names this handshake on both sides


def check_keyset(
    ck: CommunicationKeyset,
    *,
    identity: str,
    mission_id: bytes,
    keys: KeysetLookup,
    now: float,
    skew: float,
) -> None:
    """Refuse a CK that is revoked, of another mission, not ours, or outside its window."""
    if keys.is_revoked(ck.ck_id):
        raise RemoteProtocolError(Reason.REVOKED_CK, ck.ck_id.hex())
    if ck.mission_id != mission_id:
        raise RemoteProtocolError(Reason.WRONG_MISSION, ck.ck_id.hex())
    if not ck.involves(identity):
        raise RemoteProtocolError(Reason.IDENTITY_MISMATCH, f"{identity} is not in {ck!r}")
    if now < ck.not_before - skew:
        raise RemoteProtocolError(Reason.CK_NOT_YET_VALID, ck.ck_id.hex())
    if not ck.is_valid_at(now, skew=skew):
        raise RemoteProtocolError(Reason.CK_EXPIRED, ck.ck_id.hex())


@lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def _initialized(
    ck: CommunicationKeyset, initiator: bool, me: str, peer: str, rekey: bool
) -> HandshakeState:
    """``Initialize()`` for one CK, pair of roles and kind: prologue and PSK mixed, once.

    It depends on nothing else, so each handshake starts from a copy; the
    benchmark's raw bound leaves these calls out of the per-handshake cost too.
    """
    prologue = build_prologue(
        ck, initiator=me if initiator else peer, responder=peer if initiator else me, rekey=rekey
    )
    return HandshakeState(
        NOISE_PROTOCOL, initiator=initiator, prologue=prologue, psks=(ck.pair_key,)
    )


def _new_state(
    ck: CommunicationKeyset, *, initiator: bool, me: str, peer: str, rekey: bool
) -> HandshakeState:
    return _initialized(ck, initiator, me, peer, rekey).copy()  # positional: a cheaper key


class InitiatorHandshake:
    """Writes message 1 on creation (:attr:`frame`), then reads message 2.

    ``rekey``: message 1 of a rekey (REKEY_INIT, bound by the prologue).
    """

    __slots__ = ("_state", "frame")

    def __init__(
        self,
        ck: CommunicationKeyset,
        *,
        me: str,
        peer: str,
        timestamp: int,
        capabilities: int,
        ticket: str | None = None,
        rekey: bool = False,
    ) -> None:
        self._state = _new_state(ck, initiator=True, me=me, peer=peer, rekey=rekey)
        noise_message = self._state.write_message(pack_init_payload(timestamp, capabilities))
        self.frame = push_init(Init(ck.ck_id, noise_message, ticket, rekey))

    def read_response(self, frame: bytes, *, retry: bool) -> SessionKeys:
        """Authenticate message 2.

        With ``retry`` (datagrams) it reads from a copy, so that a refused
        message leaves this handshake able to read the genuine one; a stream
        never gets a second message 2, so it reads in place.
        """
        state = self._state.copy() if retry else self._state
        try:
            payload = state.read_message(pull_response(frame))
        except InvalidTag:
            raise RemoteProtocolError(Reason.AUTH_FAILED, "message 2") from None
        except NoiseError as exc:
            raise RemoteProtocolError(Reason.BAD_PUBLIC_KEY, str(exc)) from None
        assert state.cipher_states is not None and state.handshake_hash is not None
        send, receive = state.cipher_states
        return SessionKeys(send, receive, unpack_response_payload(payload), state.handshake_hash)


class ResponderHandshake:
    """Reads message 1 (no DH yet), then writes message 2.

    ``rekey`` is what the frame claims (REKEY_INIT); the prologue holds the
    message to it, so a frame whose type was changed on the way fails its tag.
    """

    __slots__ = ("_state",)

    def __init__(self, ck: CommunicationKeyset, *, me: str, peer: str, rekey: bool = False) -> None:
        self._state = _new_state(ck, initiator=False, me=me, peer=peer, rekey=rekey)

    def read_init(self, noise_message: bytes) -> tuple[int, int]:
        """(timestamp in microseconds, capabilities) of an authentic message 1."""
        try:
            payload = self._state.read_message(noise_message)
        except InvalidTag:
            raise RemoteProtocolError(Reason.AUTH_FAILED, "message 1") from None
        return unpack_init_payload(payload)

    def write_response(
        self, capabilities: int, peer_capabilities: int
    ) -> tuple[bytes, SessionKeys]:
        """Message 2 (the responder's ephemeral and ``ee``) and this side's session keys."""
        state = self._state
        try:
            frame = push_response(state.write_message(pack_response_payload(capabilities)))
        except NoiseError as exc:  # the initiator's ephemeral is a low-order point
            raise RemoteProtocolError(Reason.BAD_PUBLIC_KEY, str(exc)) from None
        assert state.cipher_states is not None and state.handshake_hash is not None
        receive, send = state.cipher_states
        return frame, SessionKeys(send, receive, peer_capabilities, state.handshake_hash)
