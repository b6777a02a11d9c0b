"""The listener: bounded half-open handshakes, per-source ticket limits, pruning."""

from __future__ import annotations

import functools

from mesh.keyset.copies import open_copy
from mesh.protocol import (
    Connection,
    HandshakeRefused,
    Listener,
    MemoryKeyStore,
    RateLimiter,
    Reason,
    Role,
    State,
    Transport,
)
from mesh.protocol.frames import REFUSE_FRAME
from tests.protocol.harness import NOW, FakeToken, config, drain, make_ck, make_pair


def _init(store: MemoryKeyStore, ck_id: bytes, now: float, ticket: str | None = None) -> bytes:
    initiator = Connection(
        config=config("alpha", Transport.DATAGRAM), keys=store, role=Role.INITIATOR
    )
    initiator.connect(ck_id, now, ticket=ticket)
    return initiator.datagrams_to_send()[0]


def test_half_open_handshakes_are_capped() -> None:
    pair = make_pair(Transport.DATAGRAM)
    listener = Listener(
        config=config("bravo", Transport.DATAGRAM), keys=pair.responder_store, max_half_open=2
    )
    inits = [_init(pair.initiator_store, pair.ck.ck_id, NOW) for _ in range(3)]
    assert listener.datagram_received(inits[0], "s1", NOW) is not None
    assert listener.datagram_received(inits[1], "s2", NOW) is not None
    assert listener.half_open() == 2
    assert listener.datagram_received(inits[2], "s3", NOW) is None
    assert listener.next_event() == ("s3", HandshakeRefused(Reason.HALF_OPEN_LIMIT))
    assert listener.connection("s3") is None


def test_listener_routes_by_source_and_completes_sessions() -> None:
    pair = make_pair(Transport.DATAGRAM)
    listener = Listener(config=config("bravo", Transport.DATAGRAM), keys=pair.responder_store)
    initiator = Connection(
        config=config("alpha", Transport.DATAGRAM), keys=pair.initiator_store, role=Role.INITIATOR
    )
    initiator.connect(pair.ck.ck_id, NOW)
    [init] = initiator.datagrams_to_send()
    connection = listener.datagram_received(init, "alpha:1", NOW)
    assert connection is not None
    for frame in connection.datagrams_to_send():
        initiator.datagram_received(frame, NOW)
    for frame in initiator.datagrams_to_send():
        assert listener.datagram_received(frame, "alpha:1", NOW) is connection
    assert connection.state is State.ESTABLISHED and listener.half_open() == 0
    # a stranger's non-handshake datagram opens nothing
    assert listener.datagram_received(b"\x18\x00\x10" + bytes(21), "x", NOW) is None
    assert listener.next_event() == ("x", HandshakeRefused(Reason.UNEXPECTED_FRAME))


def test_a_refused_source_gets_one_refusal_then_may_try_again() -> None:
    pair = make_pair(Transport.DATAGRAM)
    listener = Listener(config=config("bravo", Transport.DATAGRAM), keys=pair.responder_store)
    init = _init(pair.initiator_store, pair.ck.ck_id, NOW)
    forged = init[:-1] + bytes([init[-1] ^ 1])
    connection = listener.datagram_received(forged, "s", NOW)  # never raises
    assert connection is not None and connection.state is State.ERROR
    assert connection.datagrams_to_send() == [REFUSE_FRAME]
    fresh = listener.datagram_received(init, "s", NOW)
    assert fresh is not None and fresh is not connection
    assert fresh.state is State.AWAIT_CONFIRM


def test_ticket_unwraps_are_rate_limited_per_source_and_in_all() -> None:
    ck = make_ck("alpha", "bravo")
    token = FakeToken("bravo")
    bravo = MemoryKeyStore(ticket_opener=functools.partial(open_copy, token))
    alpha = MemoryKeyStore([ck])
    listener = Listener(
        config=config("bravo", Transport.DATAGRAM),
        keys=bravo,
        ticket_limiter=RateLimiter(rate=1.0, burst=2, total_rate=3.0),
    )
    bogus = FakeToken("bravo").ticket_for(ck)  # wrapped for another token: fails to open

    def attempt(source: str, now: float) -> Reason:
        connection = listener.datagram_received(_init(alpha, ck.ck_id, now, bogus), source, now)
        assert connection is not None
        [event, _] = drain(connection)
        assert isinstance(event, HandshakeRefused)
        return event.reason

    assert [attempt("x", NOW) for _ in range(3)] == [
        Reason.TICKET_INVALID,
        Reason.TICKET_INVALID,
        Reason.TICKET_RATE_LIMITED,
    ]
    assert token.unwraps == 2
    assert attempt("y", NOW) is Reason.TICKET_INVALID  # another source has its own bucket
    assert attempt("z", NOW) is Reason.TICKET_RATE_LIMITED  # but the total is capped
    assert token.unwraps == 3
    assert attempt("x", NOW + 2.0) is Reason.TICKET_INVALID  # buckets refill with time


def test_stream_connections_that_never_speak_are_closed() -> None:
    pair = make_pair(Transport.STREAM)
    listener = Listener(
        config=config("bravo", Transport.STREAM, handshake_timeout=5.0),
        keys=pair.responder_store,
        max_half_open=1,
    )
    silent = listener.accept("slow", NOW)
    assert silent is not None
    assert listener.accept("other", NOW) is None  # the one half-open slot is taken
    assert listener.get_timer() == NOW + 5.0
    listener.handle_timer(NOW + 5.0)
    assert silent.state is State.CLOSED and listener.connection("slow") is None
    assert listener.accept("other", NOW + 5.0) is not None
