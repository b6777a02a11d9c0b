"""Tickets: a peer lacking the CK is handed its own wrapped copy (a real JWE) with message 1."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from mesh.keyset.copies import open_copy
from mesh.protocol import (
    Connection,
    HandshakeCompleted,
    MemoryKeyStore,
    Reason,
    Role,
    SessionConfig,
    State,
    Transport,
)
from mesh.protocol.frames import MAX_TICKET_SIZE
from tests.protocol.harness import (
    NOW,
    OTHER_MISSION,
    FakeToken,
    Pair,
    chat,
    config,
    deliver,
    drain,
    make_ck,
)
from tests.protocol.test_attacks import assert_refused

BOTH = pytest.mark.parametrize("transport", list(Transport))


def ticket_world(transport: Transport) -> tuple[Pair, FakeToken, str]:
    """alpha holds the CK and bravo's ticket; bravo holds only its token."""
    ck = make_ck("alpha", "bravo")
    token = FakeToken("bravo")
    bravo = MemoryKeyStore(ticket_opener=functools.partial(open_copy, token))
    return Pair(ck, MemoryKeyStore([ck]), bravo, transport), token, token.ticket_for(ck)


def connect_with(pair: Pair, ticket: str, now: float = NOW) -> Connection:
    initiator = Connection(
        config=config("alpha", pair.transport), keys=pair.initiator_store, role=Role.INITIATOR
    )
    initiator.connect(pair.ck.ck_id, now, ticket=ticket)
    return initiator


def first_frame(initiator: Connection) -> bytes:
    if initiator.transport is Transport.DATAGRAM:
        return initiator.datagrams_to_send()[0]
    return initiator.data_to_send()


@BOTH
def test_honest_ticket_flow_then_cached(transport: Transport) -> None:
    pair, token, ticket = ticket_world(transport)
    wire = pair.wire(connect=False)
    wire.initiator.connect(pair.ck.ck_id, NOW, ticket=ticket)
    wire.pump()
    assert isinstance(drain(wire.responder)[0], HandshakeCompleted)
    assert wire.log["i"][0][0] == 0x12  # TICKET_INIT
    assert len(wire.log["i"][0]) <= 75 + 2 + MAX_TICKET_SIZE
    assert token.unwraps == 1
    assert pair.responder_store.lookup(pair.ck.ck_id) == pair.ck
    chat(wire)
    again = pair.established(NOW + 1)  # no ticket needed any more
    assert again.log["i"][0][0] == 0x11 and token.unwraps == 1
    chat(again, now=NOW + 1)


@BOTH
def test_a_ticket_seen_on_the_wire_is_useless_without_the_pair_key(transport: Transport) -> None:
    pair, token, ticket = ticket_world(transport)
    frame = bytearray(first_frame(connect_with(pair, ticket)))
    frame[-1] ^= 1  # a non-holder cannot make message 1 authenticate
    victim = pair.responder()
    assert deliver(victim, bytes(frame)) is not None
    assert_refused(victim, Reason.AUTH_FAILED)
    assert token.unwraps == 1
    assert pair.responder_store.lookup(pair.ck.ck_id) is None  # not cached


@BOTH
def test_ticket_for_someone_else_or_garbage(transport: Transport) -> None:
    pair, _, _ = ticket_world(transport)
    charlie_copy = FakeToken("charlie").ticket_for(make_ck("bravo", "charlie"))
    alpha_copy = FakeToken("alpha").ticket_for(pair.ck)  # alpha's own copy, not bravo's
    for ticket in (charlie_copy, alpha_copy, "not.a.jwe.at.all", "x"):
        victim = pair.responder()
        assert deliver(victim, first_frame(connect_with(pair, ticket))) is not None
        assert_refused(victim, Reason.TICKET_INVALID)


@BOTH
def test_ticket_for_another_ck_id_than_the_frame_names(transport: Transport) -> None:
    pair, token, _ = ticket_world(transport)
    other_ticket = token.ticket_for(make_ck("alpha", "bravo"))  # genuine, another CK
    victim = pair.responder()
    assert deliver(victim, first_frame(connect_with(pair, other_ticket))) is not None
    assert_refused(victim, Reason.TICKET_INVALID)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mission_id": OTHER_MISSION}, Reason.WRONG_MISSION),
        ({"not_before": int(NOW - 7200), "not_after": int(NOW - 600)}, Reason.CK_EXPIRED),
    ],
)
def test_ticket_checks_mission_and_window(change: dict[str, object], reason: Reason) -> None:
    pair, token, _ = ticket_world(Transport.STREAM)
    bad = dataclasses.replace(pair.ck, **change)  # type: ignore[arg-type]
    initiator_store = MemoryKeyStore([bad])
    victim = pair.responder()
    initiator = Connection(
        config=SessionConfig(identity="alpha", mission_id=bad.mission_id),
        keys=initiator_store,
        role=Role.INITIATOR,
    )
    initiator.connect(bad.ck_id, bad.not_before + 1.0, ticket=token.ticket_for(bad))
    assert deliver(victim, initiator.data_to_send()) is not None
    assert_refused(victim, reason)


def test_no_ticket_opener_means_no_tickets() -> None:
    pair, _, ticket = ticket_world(Transport.STREAM)
    pair = Pair(pair.ck, pair.initiator_store, MemoryKeyStore(), Transport.STREAM)
    victim = pair.responder()
    assert deliver(victim, first_frame(connect_with(pair, ticket))) is not None
    assert_refused(victim, Reason.TICKET_INVALID)
    assert victim.state is State.ERROR
