"""The listener: bounded half-open handshakes, per-source ticket limits, pruning."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest

from mesh.keyset.copies import open_copy
from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol import (
    Connection,
    DataReceived,
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
from mesh.protocol.listener import SILENT_GRACE
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
    assert listener.get_timer() == NOW + 5.0
    listener.handle_timer(NOW + 5.0)
    assert silent.state is State.CLOSED and listener.connection("slow") is None
    assert listener.accept("other", NOW + 5.0) is not None


def test_at_the_bound_the_oldest_silent_connection_makes_room() -> None:
    """A flood of connections that never speak cannot keep a peer out: at the half-open
    bound the oldest one still in START goes once it sat silent for the grace (before, the
    newcomer is refused); one whose message 1 authenticated stays."""
    pair = make_pair(Transport.STREAM)
    listener = Listener(
        config=config("bravo", Transport.STREAM), keys=pair.responder_store, max_half_open=2
    )
    first, second = listener.accept("s1", NOW), listener.accept("s2", NOW)
    assert first is not None and second is not None
    assert listener.accept("s3", NOW + SILENT_GRACE / 2) is None  # theirs may be on its way
    assert listener.next_event() == ("s3", HandshakeRefused(Reason.HALF_OPEN_LIMIT))
    third = listener.accept("s3", NOW + 1)
    assert third is not None and first.state is State.CLOSED
    assert listener.connection("s1") is None and listener.half_open() == 2
    assert listener.next_event() == ("s1", HandshakeRefused(Reason.HALF_OPEN_LIMIT))
    alpha = Connection(
        config=config("alpha", Transport.STREAM), keys=pair.initiator_store, role=Role.INITIATOR
    )
    alpha.connect(pair.ck.ck_id, NOW + 1)
    third.receive_data(alpha.data_to_send(), NOW + 1)  # a peer's message 1: AWAIT_CONFIRM
    assert third.state is State.AWAIT_CONFIRM
    assert listener.accept("s4", NOW + 2) is not None and second.state is State.CLOSED
    fourth = listener.connection("s4")
    assert fourth is not None
    other = Connection(
        config=config("alpha", Transport.STREAM), keys=pair.initiator_store, role=Role.INITIATOR
    )
    other.connect(pair.ck.ck_id, NOW + 2)
    fourth.receive_data(other.data_to_send(), NOW + 2)
    assert fourth.state is State.AWAIT_CONFIRM  # both half-open slots hold peers now
    assert listener.accept("s5", NOW + 3) is None  # nothing silent to drop: refused
    assert third.state is State.AWAIT_CONFIRM and fourth.state is State.AWAIT_CONFIRM


class _Via:
    """An initiator talking to a datagram listener as ``source``, the test carrying frames."""

    def __init__(self, listener: Listener, store: MemoryKeyStore, source: str, **overrides: float):
        self.listener, self.source = listener, source
        self.initiator = Connection(
            config=config("alpha", Transport.DATAGRAM, **overrides),
            keys=store,
            role=Role.INITIATOR,
        )

    def to_listener(self, frame: bytes, now: float = NOW) -> Connection | None:
        return self.listener.datagram_received(frame, self.source, now)

    def pump(self, now: float = NOW) -> None:
        for _ in range(8):
            frames = self.initiator.datagrams_to_send()
            connection = self.listener.connection(self.source)
            back = connection.datagrams_to_send() if connection is not None else []
            for frame in frames:
                self.to_listener(frame, now)
            for frame in back:
                self.initiator.datagram_received(frame, now)
            if not frames and not back:
                return

    def chat(self, now: float = NOW) -> None:
        """Both ways, on the listener's connection for this source."""
        responder = self.listener.connection(self.source)
        assert responder is not None
        drain(self.initiator), drain(responder)
        self.initiator.send_data(b"ping", now)
        responder.send_data(b"pong", now)
        self.pump(now)
        assert [e.data for e in drain(responder) if isinstance(e, DataReceived)] == [b"ping"]
        assert [e.data for e in drain(self.initiator) if isinstance(e, DataReceived)] == [b"pong"]


@dataclass
class _Live:
    """A datagram session from alpha through bravo's listener (source "alpha")."""

    listener: Listener
    via: _Via
    ck: CommunicationKeyset
    alpha_store: MemoryKeyStore
    bravo_store: MemoryKeyStore
    first_init: bytes

    @property
    def connection(self) -> Connection:
        connection = self.listener.connection("alpha")
        assert connection is not None
        return connection


def _live(rekeys: int = 0) -> _Live:
    """A live session through a listener, after ``rekeys`` rekeys."""
    pair = make_pair(Transport.DATAGRAM)
    listener = Listener(config=config("bravo", Transport.DATAGRAM), keys=pair.responder_store)
    via = _Via(listener, pair.initiator_store, "alpha", rekey_after_records=2)
    via.initiator.connect(pair.ck.ck_id, NOW)
    [first] = via.initiator.datagrams_to_send()
    via.to_listener(first)
    via.pump()
    for _ in range(rekeys):
        via.chat()  # two records each way: the initiator rekeys
        via.pump()
    live = _Live(listener, via, pair.ck, pair.initiator_store, pair.responder_store, first)
    assert live.connection.state is State.ESTABLISHED and live.connection.epoch == rekeys
    return live


def _rekey_init(via: _Via) -> tuple[bytes, list[bytes]]:
    """Wear the initiator's keys out: its REKEY_INIT, and the records sent with it."""
    for _ in range(2):
        via.initiator.send_data(b"wear", NOW)
    frames = via.initiator.datagrams_to_send()
    [rekey] = [f for f in frames if f[0] == 0x15]
    assert via.initiator.state is State.REKEYING
    return rekey, [f for f in frames if f is not rekey]


@pytest.mark.parametrize("rekeys", [0, 1])
def test_a_restarted_peers_new_session_replaces_its_live_one(rekeys: int) -> None:
    """A relayed mate (or a fixed UDP port) restarts: same source, a new session's message 1.

    Before, that message 1 reached the live session as a rekey, and the two sides then
    disagreed on the key epoch: nothing the restarted peer sent was read again.
    """
    live = _live(rekeys)
    old = live.connection
    restarted = _Via(live.listener, live.alpha_store, "alpha")  # its marks were on disk
    restarted.initiator.connect(live.ck.ck_id, NOW + 1)
    [init] = restarted.initiator.datagrams_to_send()
    candidate = restarted.to_listener(init, NOW + 1)
    assert candidate is not None and candidate is not old
    assert live.connection is old and live.listener.half_open() == 1  # until it confirms
    [response] = candidate.datagrams_to_send()
    restarted.initiator.datagram_received(response, NOW + 1)
    [confirmation] = restarted.initiator.datagrams_to_send()
    assert restarted.to_listener(confirmation, NOW + 1) is candidate
    assert live.connection is candidate and live.listener.half_open() == 0
    assert candidate.state is State.ESTABLISHED and candidate.epoch == 0
    restarted.chat(NOW + 1)
    assert live.listener.next_event() is None


def test_a_new_session_never_confirmed_leaves_the_live_one() -> None:
    """A message 1 alone does not authenticate a peer (key confirmation does): an unconfirmed
    candidate is answered, never replaces the live session, and times out."""
    live = _live()
    old = live.connection
    other = _Via(live.listener, live.alpha_store, "alpha")  # a second instance of alpha
    other.initiator.connect(live.ck.ck_id, NOW + 1)
    [init] = other.initiator.datagrams_to_send()
    candidate = other.to_listener(init, NOW + 1)
    assert candidate is not None and candidate.datagrams_to_send()  # its message 2, dropped
    live.via.chat(NOW + 2)  # on the live session, each record tried on the candidate first
    assert live.connection is old
    timer = live.listener.get_timer()
    assert timer == NOW + 1 + config("bravo", Transport.DATAGRAM).handshake_timeout
    live.listener.handle_timer(timer)
    assert candidate.state is State.CLOSED and live.listener.half_open() == 0
    live.via.chat(timer)
    assert live.connection is old and old.state is State.ESTABLISHED


def test_a_candidate_takes_the_place_of_a_live_session_that_ends() -> None:
    live = _live()
    old = live.connection
    restarted = _Via(live.listener, live.alpha_store, "alpha")
    restarted.initiator.connect(live.ck.ck_id, NOW + 1)
    [init] = restarted.initiator.datagrams_to_send()
    candidate = restarted.to_listener(init, NOW + 1)
    assert candidate is not None
    old.close(NOW + 1)  # e.g. the old peer's CLOSE, or our own
    [response] = candidate.datagrams_to_send()
    restarted.initiator.datagram_received(response, NOW + 1)
    for frame in restarted.initiator.datagrams_to_send():
        assert restarted.to_listener(frame, NOW + 1) is candidate
    assert live.connection is candidate and candidate.state is State.ESTABLISHED
    restarted.chat(NOW + 1)


def test_a_replayed_or_forged_new_session_leaves_the_live_one() -> None:
    live = _live()
    old, first = live.connection, live.first_init
    forged = first[:-1] + bytes([first[-1] ^ 1])
    for frame, reason in ((first, Reason.REPLAYED_INIT), (forged, Reason.AUTH_FAILED)):
        assert live.via.to_listener(frame) is None
        assert live.listener.next_event() == ("alpha", HandshakeRefused(reason, live.ck.ck_id))
        assert live.connection is old and old.datagrams_to_send() == []  # no REFUSE
    live.via.chat()


def test_the_kind_of_message_1_is_bound_so_a_relay_cannot_turn_a_rekey_into_a_restart() -> None:
    """REKEY_INIT and INIT differ in their frame type, which the prologue binds."""
    live = _live()
    old = live.connection
    rekey, records = _rekey_init(live.via)
    for frame in records:
        live.via.to_listener(frame)
    assert live.via.to_listener(bytes([0x11]) + rekey[1:]) is None  # as a new session's
    assert live.listener.next_event() == (
        "alpha",
        HandshakeRefused(Reason.AUTH_FAILED, live.ck.ck_id),
    )
    assert live.connection is old and old.state is State.ESTABLISHED
    # ... and a new session's message 1 presented as a rekey fails the same way
    stranger = Connection(
        config=config("alpha", Transport.DATAGRAM),
        keys=MemoryKeyStore([live.ck]),
        role=Role.INITIATOR,
    )
    stranger.connect(live.ck.ck_id, NOW + 1)
    [init] = stranger.datagrams_to_send()
    assert live.via.to_listener(bytes([0x15]) + init[1:], NOW + 1) is old
    assert [e.reason for e in drain(old) if isinstance(e, HandshakeRefused)] == [Reason.AUTH_FAILED]
    # the genuine rekey still goes through
    live.via.to_listener(rekey)
    live.via.pump()
    assert old.state is State.ESTABLISHED and old.epoch == 1
    live.via.chat()


def test_a_rekey_from_a_stranger_opens_nothing() -> None:
    live = _live()
    rekey, _ = _rekey_init(live.via)
    assert live.listener.datagram_received(rekey, "elsewhere", NOW) is None
    assert live.listener.next_event() == ("elsewhere", HandshakeRefused(Reason.UNEXPECTED_FRAME))


def test_a_source_that_names_its_peer_takes_that_peers_ck_only() -> None:
    """A relayed mate's frames come as ``Relay.src``: a relay holding its own CK with us
    cannot open a session under another mate's name, nor make us REFUSE that mate."""
    ab, cb = make_ck("alpha", "bravo"), make_ck("charlie", "bravo")
    bravo = MemoryKeyStore([ab, cb])
    listener = Listener(config=config("bravo", Transport.DATAGRAM), keys=bravo, source_is_peer=True)
    charlie = Connection(
        config=config("charlie", Transport.DATAGRAM),
        keys=MemoryKeyStore([cb]),
        role=Role.INITIATOR,
    )
    charlie.connect(cb.ck_id, NOW)
    [init] = charlie.datagrams_to_send()
    claimed = listener.datagram_received(init, "alpha", NOW)
    assert claimed is not None and claimed.state is State.ERROR and claimed.peer is None
    assert [e.reason for e in drain(claimed) if isinstance(e, HandshakeRefused)] == [
        Reason.IDENTITY_MISMATCH
    ]
    assert claimed.datagrams_to_send() == []  # a REFUSE would go to alpha, who sent nothing
    honest = listener.datagram_received(init, "charlie", NOW)
    assert honest is not None and honest.state is State.AWAIT_CONFIRM
    assert honest.peer == "charlie"


def test_a_restart_candidate_must_be_the_live_sessions_peer() -> None:
    """Sources that are addresses: another mate of ours on a live peer's address gets nothing."""
    live = _live()
    old = live.connection
    cb = make_ck("charlie", "bravo")
    live.bravo_store.cache(cb)  # bravo holds a CK with charlie too
    charlie = Connection(
        config=config("charlie", Transport.DATAGRAM),
        keys=MemoryKeyStore([cb]),
        role=Role.INITIATOR,
    )
    charlie.connect(cb.ck_id, NOW + 1)
    [init] = charlie.datagrams_to_send()
    assert live.via.to_listener(init, NOW + 1) is None
    assert live.listener.next_event() == (
        "alpha",
        HandshakeRefused(Reason.IDENTITY_MISMATCH, cb.ck_id),
    )
    assert live.connection is old and live.listener.half_open() == 0
    live.via.chat(NOW + 1)
