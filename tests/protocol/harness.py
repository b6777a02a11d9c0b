"""In-memory endpoints and a man-in-the-middle for the protocol tests.

Nothing here touches a socket or a clock: every call takes ``now``. A
:class:`Wire` sits between an initiator and a responder and hands every frame
to the test before (or instead of) delivering it, so a test can drop, replay,
reorder, corrupt or reflect any of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.keyset.copies import decrypt_copy, read_copy_header, wrap_copy
from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol import (
    Connection,
    DataReceived,
    Event,
    MemoryKeyStore,
    RemoteProtocolError,
    Role,
    SessionConfig,
    Transport,
)
from mesh.protocol.frames import frame_size
from mesh.token.errors import UnwrapFailed
from mesh.token.interface import SecureElement, Slot, SlotInfo, TokenInfo, slot_kid

NOW = 1_750_000_000.0
MISSION = bytes(range(16))
OTHER_MISSION = bytes(range(1, 17))


def make_ck(
    a: str,
    b: str,
    *,
    not_before: float = NOW - 3600,
    not_after: float = NOW + 86400,
    mission: bytes = MISSION,
) -> CommunicationKeyset:
    first, second = sorted((a, b))
    return CommunicationKeyset(
        ck_id=os.urandom(16),
        pair_key=os.urandom(32),
        mission_id=mission,
        party_a=first,
        party_b=second,
        not_before=int(not_before),
        not_after=int(not_after),
    )


def config(identity: str, transport: Transport, **overrides: Any) -> SessionConfig:
    return SessionConfig(
        identity=identity,
        mission_id=MISSION,
        transport=transport,
        **overrides,
    )


def split_frames(data: bytes) -> list[bytes]:
    """Cut a stream's bytes into frames (the way a receiver does)."""
    frames, offset = [], 0
    while offset < len(data):
        size = frame_size(data, offset)
        assert size is not None
        frames.append(data[offset : offset + size])
        offset += size
    return frames


def outgoing(connection: Connection) -> list[bytes]:
    """The frames a connection wants to send, whatever its transport."""
    if connection.transport is Transport.DATAGRAM:
        return connection.datagrams_to_send()
    return split_frames(connection.data_to_send())


def deliver(connection: Connection, frame: bytes, now: float = NOW) -> RemoteProtocolError | None:
    """Hand one frame over; returns the refusal the connection raised, if it did."""
    try:
        if connection.transport is Transport.DATAGRAM:
            connection.datagram_received(frame, now)
        else:
            connection.receive_data(frame, now)
    except RemoteProtocolError as exc:
        return exc
    return None


def drain(connection: Connection) -> list[Event]:
    events = []
    while (event := connection.next_event()) is not None:
        events.append(event)
    return events


def received_data(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, DataReceived)]


@dataclass
class Wire:
    """An initiator and a responder with the test in the middle.

    ``log`` keeps every frame each side sent, in order, for replays.
    """

    initiator: Connection
    responder: Connection
    log: dict[str, list[bytes]] = field(default_factory=lambda: {"i": [], "r": []})

    def take(self, side: str) -> list[bytes]:
        """Frames ``side`` ("i" or "r") sent since the last take, not delivered."""
        frames = outgoing(self.initiator if side == "i" else self.responder)
        self.log[side].extend(frames)
        return frames

    def to(self, side: str, frame: bytes, now: float = NOW) -> RemoteProtocolError | None:
        return deliver(self.initiator if side == "i" else self.responder, frame, now)

    def pump(self, now: float = NOW, rounds: int = 8) -> None:
        """Deliver everything both ways until quiet; refusals raised here fail the test."""
        for _ in range(rounds):
            moved = False
            for side, other in (("i", "r"), ("r", "i")):
                for frame in self.take(side):
                    moved = True
                    error = self.to(other, frame, now)
                    assert error is None, error
            if not moved:
                return


@dataclass
class Pair:
    """Two nodes sharing one CK, each with its own store."""

    ck: CommunicationKeyset
    initiator_store: MemoryKeyStore
    responder_store: MemoryKeyStore
    transport: Transport
    initiator_identity: str = ""  # default: the CK's first party

    @property
    def identities(self) -> tuple[str, str]:
        initiator = self.initiator_identity or self.ck.party_a
        return initiator, self.ck.peer_of(initiator)

    def responder(self, **overrides: Any) -> Connection:
        """A fresh responder connection over the responder's store (a new stream, or source)."""
        return Connection(
            config=config(self.identities[1], self.transport, **overrides),
            keys=self.responder_store,
            role=Role.RESPONDER,
        )

    def wire(self, now: float = NOW, *, connect: bool = True, **overrides: Any) -> Wire:
        initiator = Connection(
            config=config(self.identities[0], self.transport, **overrides),
            keys=self.initiator_store,
            role=Role.INITIATOR,
        )
        responder = self.responder(**overrides)
        if connect:
            initiator.connect(self.ck.ck_id, now)
        return Wire(initiator, responder)

    def established(self, now: float = NOW, **overrides: Any) -> Wire:
        wire = self.wire(now, **overrides)
        wire.pump(now)
        drain(wire.initiator)
        drain(wire.responder)
        return wire


def make_pair(transport: Transport, a: str = "alpha", b: str = "bravo", **ck_args: float) -> Pair:
    ck = make_ck(a, b, **ck_args)
    return Pair(ck, MemoryKeyStore([ck]), MemoryKeyStore([ck]), transport)


def chat(wire: Wire, messages: int = 3, now: float = NOW) -> None:
    """Both directions still carry data (the 'honest session keeps working' check)."""
    for n in range(messages):
        wire.initiator.send_data(b"ping %d" % n, now)
        wire.responder.send_data(b"pong %d" % n, now)
    wire.pump(now)
    pings = [b"ping %d" % n for n in range(messages)]
    pongs = [b"pong %d" % n for n in range(messages)]
    assert received_data(drain(wire.responder))[-messages:] == pings
    assert received_data(drain(wire.initiator))[-messages:] == pongs


class FakeToken(SecureElement):
    """A secure element reduced to what tickets need: one WRAP key, no PIN."""

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.token_id = os.urandom(16)
        self.wrap_key = jwk.JWK(kty="oct", k=base64url_encode(os.urandom(32)))
        self.unwraps = 0

    @property
    def kid(self) -> str:
        return slot_kid(self.token_id, Slot.WRAP, 1)

    def info(self) -> TokenInfo:
        slots = tuple(SlotInfo(slot, 1) for slot in Slot)
        return TokenInfo(self.token_id, self.identity, "node", slots, 5)

    def verify_pin(self, pin: str) -> None:
        raise NotImplementedError

    def unwrap(self, copy: str) -> bytes:
        self.unwraps += 1
        try:
            if read_copy_header(copy).kid != self.kid:
                raise UnwrapFailed("another token's copy")
            return decrypt_copy(copy, self.wrap_key)
        except KeysetError as exc:
            raise UnwrapFailed(str(exc)) from None

    def mac(self, slot: Slot, data: bytes) -> bytes:
        raise NotImplementedError

    def verify_mac(self, slot: Slot, data: bytes, tag: bytes) -> bool:
        raise NotImplementedError

    def derive(self, slot: Slot, context: bytes) -> bytes:
        raise NotImplementedError("the protocol tests never derive")

    def key_change(self, message: str) -> None:
        raise NotImplementedError

    def ticket_for(self, ck: CommunicationKeyset) -> str:
        """What the desk issues: this token's own wrapped copy of ``ck``."""
        return wrap_copy(ck, holder=self.identity, kid=self.kid, wrap_key=self.wrap_key)
