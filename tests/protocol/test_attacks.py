"""Issue #3, section 3: every attack is refused, logged, and leaves honest sessions working.

A :class:`Wire` (``harness.py``) sits between the endpoints and does what an
attacker on the path can do. Each test checks three things: the forged input
is refused with the expected :class:`Reason` in the local log, no plaintext
comes out of it, and honest sessions -- the attacked one on datagrams, a
bystander sharing the responder's keys on streams -- keep working.

On a stream, any refused input ends that stream (it cannot be resynchronised);
on datagrams it is dropped and the session goes on (``connection.py``).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from mesh.protocol import (
    Connection,
    DataReceived,
    Event,
    FrameRejected,
    HandshakeCompleted,
    HandshakeRefused,
    MemoryKeyStore,
    Reason,
    Role,
    SessionConfig,
    State,
    Transport,
)
from mesh.protocol.frames import (
    MAX_FRAME_SIZE,
    REFUSE_FRAME,
    FrameType,
    RecordKind,
    pack_record_header,
)
from tests.protocol.harness import (
    NOW,
    OTHER_MISSION,
    Pair,
    Wire,
    chat,
    config,
    deliver,
    drain,
    make_ck,
    outgoing,
    received_data,
)

BOTH = pytest.mark.parametrize("transport", list(Transport))


@dataclasses.dataclass
class World:
    """alpha and charlie each share a CK with bravo; bravo's store holds both."""

    victim: Pair  # alpha -> bravo
    bystander: Pair  # charlie -> bravo
    bravo: MemoryKeyStore

    def bystander_session(self) -> Wire:
        return self.bystander.established()


def make_world(transport: Transport) -> World:
    ab, bc = make_ck("alpha", "bravo"), make_ck("bravo", "charlie")
    bravo = MemoryKeyStore([ab, bc])
    return World(
        Pair(ab, MemoryKeyStore([ab]), bravo, transport, "alpha"),
        Pair(bc, MemoryKeyStore([bc]), bravo, transport, "charlie"),
        bravo,
    )


def refusals(events: list[Event]) -> list[Reason]:
    return [e.reason for e in events if isinstance(e, HandshakeRefused | FrameRejected)]


def assert_refused(connection: Connection, *reasons: Reason) -> list[Event]:
    """The connection logged exactly these refusals and delivered no plaintext."""
    events = drain(connection)
    assert refusals(events) == list(reasons)
    assert not [e for e in events if isinstance(e, DataReceived)]
    return events


def assert_fatal_or_dropped(wire: Wire, side: str, error: object, transport: Transport) -> None:
    """Streams die on a refusal; datagram sessions drop the frame and carry on."""
    connection = wire.initiator if side == "i" else wire.responder
    if transport is Transport.STREAM:
        assert error is not None and connection.state is State.ERROR
    else:
        assert error is None and connection.state is not State.ERROR
        chat(wire)


def one_refusal(connection: Connection) -> Reason:
    """Exactly one refusal was logged, and nothing else happened (no data, no handshake)."""
    events = drain(connection)
    assert len(events) == 1 and isinstance(events[0], HandshakeRefused | FrameRejected), events
    return events[0].reason


def flipped(frame: bytes, index: int, bit: int = 0x01) -> bytes:
    mutated = bytearray(frame)
    mutated[index] ^= bit
    return bytes(mutated)


# -- replays --------------------------------------------------------------------------


@BOTH
def test_message_1_replayed_immediately(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.established()
    init = wire.log["i"][0]
    # into a new connection (a new stream, or a new source address)
    fresh = world.victim.responder()
    error = deliver(fresh, init)
    assert error is not None and error.reason is Reason.REPLAYED_INIT
    assert fresh.state is State.ERROR
    assert b"".join(outgoing(fresh)) == REFUSE_FRAME
    assert_refused(fresh, Reason.REPLAYED_INIT)
    # into the live session itself: a new session's message 1 has no place there (a Listener
    # hands it a connection of its own, test_listener.py)
    error = wire.to("r", init)
    assert_refused(wire.responder, Reason.UNEXPECTED_FRAME)
    assert_fatal_or_dropped(wire, "r", error, transport)
    chat(world.bystander_session())


@BOTH
def test_message_1_replayed_later(transport: Transport) -> None:
    world = make_world(transport)
    old_init = world.victim.established().log["i"][0]
    world.victim.established(NOW + 30)  # a newer handshake moved the high-water mark
    fresh = world.victim.responder()
    assert deliver(fresh, old_init, NOW + 60) is not None
    assert_refused(fresh, Reason.REPLAYED_INIT)
    # a responder that lost its marks still refuses it once outside the clock skew
    amnesiac = Pair(
        world.victim.ck, MemoryKeyStore(), MemoryKeyStore([world.victim.ck]), transport
    ).responder()
    assert deliver(amnesiac, old_init, NOW + 301) is not None
    assert_refused(amnesiac, Reason.CLOCK_SKEW)
    chat(world.bystander_session(), now=NOW + 60)


@BOTH
def test_replayed_message_1_never_authenticates_a_peer(transport: Transport) -> None:
    """Residual risk, bounded: with its marks lost and within the skew, a responder
    answers a replayed message 1 -- but without the ephemeral key nobody can
    confirm the keys, so no session is established and the attempt times out."""
    ck = make_ck("alpha", "bravo")
    init = Pair(ck, MemoryKeyStore([ck]), MemoryKeyStore([ck]), transport).established().log["i"][0]
    victim = Pair(ck, MemoryKeyStore([ck]), MemoryKeyStore([ck]), transport).responder()
    assert deliver(victim, init, NOW + 1) is None
    assert victim.state is State.AWAIT_CONFIRM and drain(victim) == []
    victim.handle_timer(NOW + 11)
    assert victim.state is State.CLOSED
    assert not [e for e in drain(victim) if isinstance(e, HandshakeCompleted | DataReceived)]


@BOTH
def test_message_2_replayed(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.established()
    response = wire.log["r"][0]
    error = wire.to("i", response)
    assert_refused(wire.initiator, Reason.UNEXPECTED_FRAME)
    assert_fatal_or_dropped(wire, "i", error, transport)
    # into a later handshake of the same pair: other ephemeral keys, tag fails
    later = world.victim.wire(NOW + 1)
    later.take("i")
    error = later.to("i", response, NOW + 1)
    assert_refused(later.initiator, Reason.AUTH_FAILED)
    assert (error is not None) == (transport is Transport.STREAM)
    chat(world.bystander_session())


@BOTH
def test_any_record_replayed(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.established()
    wire.initiator.send_data(b"pay 10", NOW)
    [record] = wire.take("i")
    wire.to("r", record)
    assert received_data(drain(wire.responder)) == [b"pay 10"]
    for replayed in (record, wire.log["i"][1]):  # the data record, the key confirmation
        error = wire.to("r", replayed)
        assert_refused(wire.responder, Reason.REPLAYED_RECORD)
        if transport is Transport.STREAM:
            assert error is not None
            break
        assert error is None
    assert_fatal_or_dropped(wire, "r", error, transport)
    chat(world.bystander_session())


# -- corruption -----------------------------------------------------------------------


def _init_reason(index: int) -> set[Reason]:
    if index == 0:
        return {Reason.UNSUPPORTED_VERSION, Reason.MALFORMED}
    if index <= 16:
        return {Reason.UNKNOWN_CK}
    return {Reason.AUTH_FAILED}


@pytest.mark.parametrize("bit", [0x01, 0x80])
def test_bit_flips_in_every_byte_datagram(bit: int) -> None:
    world = make_world(Transport.DATAGRAM)
    wire = world.victim.wire()
    [init] = wire.take("i")
    for index in range(len(init)):  # each flip hits a fresh responder (a new source)
        fresh = world.victim.responder()
        assert deliver(fresh, flipped(init, index, bit)) is not None
        [reason] = refusals(drain(fresh))
        assert reason in _init_reason(index), (index, reason)
    assert wire.to("r", init) is None
    [response] = wire.take("r")
    for index in range(len(response)):
        assert wire.to("i", flipped(response, index, bit)) is None
        one_refusal(wire.initiator)
        assert wire.initiator.state is State.AWAIT_RESPONSE
    assert wire.to("i", response) is None
    [confirm] = wire.take("i")
    for index in range(len(confirm)):
        assert wire.to("r", flipped(confirm, index, bit)) is None
        one_refusal(wire.responder)
        assert wire.responder.state is State.AWAIT_CONFIRM
    assert wire.to("r", confirm) is None
    assert wire.responder.state is State.ESTABLISHED
    drain(wire.initiator), drain(wire.responder)
    wire.initiator.send_data(b"attack at dawn", NOW)
    [record] = wire.take("i")
    for index in range(len(record)):
        assert wire.to("r", flipped(record, index, bit)) is None
        assert one_refusal(wire.responder) is not Reason.REPLAYED_RECORD  # window untouched
    assert wire.to("r", record) is None
    assert received_data(drain(wire.responder)) == [b"attack at dawn"]
    chat(wire)


@pytest.mark.parametrize("target", ["init", "response", "confirm", "record"])
def test_bit_flips_in_every_byte_stream(target: str) -> None:
    world = make_world(Transport.STREAM)
    length = {"init": 75, "response": 51, "confirm": 24, "record": 24 + 14}[target]
    for index in range(length):
        wire = world.victim.wire(NOW)
        frames = {"init": wire.take("i")[0]}
        if target != "init":
            wire.to("r", frames["init"])
            frames["response"] = wire.take("r")[0]
        if target in ("confirm", "record"):
            wire.to("i", frames["response"])
            wire.initiator.send_data(b"attack at dawn", NOW)
            frames["confirm"], frames["record"] = wire.take("i")
            if target == "record":
                wire.to("r", frames["confirm"])
                drain(wire.responder)
        side = "i" if target == "response" else "r"
        error = wire.to(side, flipped(frames[target], index))
        connection = wire.initiator if side == "i" else wire.responder
        if error is None:  # a flipped length: the receiver waits for the rest...
            assert drain(connection) == []
            error = wire.to(side, bytes(MAX_FRAME_SIZE))  # ...and what fills it fails
        assert error is not None and connection.state is State.ERROR, (target, index)
        assert_refused(connection, error.reason)
    chat(world.bystander_session())


@BOTH
def test_truncation_and_extension(transport: Transport) -> None:
    world = make_world(transport)
    if transport is Transport.DATAGRAM:
        wire = world.victim.wire()
        [init] = wire.take("i")
        for cut in range(len(init)):
            fresh = world.victim.responder()
            assert deliver(fresh, init[:cut]) is not None
            assert_refused(fresh, Reason.MALFORMED)
        fresh = world.victim.responder()
        assert deliver(fresh, init + b"\x00") is not None
        assert_refused(fresh, Reason.MALFORMED)
        wire.to("r", init)
        wire.pump()
        drain(wire.initiator), drain(wire.responder)
        wire.initiator.send_data(b"complete message", NOW)
        [record] = wire.take("i")
        for mutated in [record[:cut] for cut in range(len(record))] + [record + b"!"]:
            assert wire.to("r", mutated) is None
            assert_refused(wire.responder, Reason.MALFORMED)
        wire.to("r", record)
        assert received_data(drain(wire.responder)) == [b"complete message"]
        chat(wire)
    else:
        wire = world.victim.established()
        wire.initiator.send_data(b"one", NOW)
        wire.initiator.send_data(b"two", NOW)
        first, second = wire.take("i")
        error = wire.to("r", first[:-3] + second)  # truncated: the next frame's bytes fill it
        assert error is not None and error.reason is Reason.AUTH_FAILED
        assert_refused(wire.responder, Reason.AUTH_FAILED)
        wire = world.victim.established(NOW + 1)
        wire.initiator.send_data(b"one", NOW + 1)
        [record] = wire.take("i")
        error = wire.to("r", record + b"\x00\x00", NOW + 1)  # extended: junk after a frame
        assert error is not None and error.reason is Reason.UNSUPPORTED_VERSION
        events = drain(wire.responder)  # the intact record went through, the junk did not
        assert refusals(events) == [Reason.UNSUPPORTED_VERSION]
        assert received_data(events) == [b"one"]
    chat(world.bystander_session(), now=NOW + 1)


def test_a_frame_split_on_a_stream_waits_for_its_rest() -> None:
    world = make_world(Transport.STREAM)
    wire = world.victim.wire()
    [init] = wire.take("i")
    assert wire.to("r", init[:40]) is None  # the rest may still come
    assert wire.responder.state is State.START
    assert wire.to("r", init[40:]) is None
    assert wire.responder.state is State.AWAIT_CONFIRM


@BOTH
def test_reordering(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.established()
    for n in range(6):
        wire.initiator.send_data(b"%d" % n, NOW)
    records = wire.take("i")
    order = [2, 0, 5, 1, 4, 3]
    errors = [wire.to("r", records[k]) for k in order]
    if transport is Transport.STREAM:
        assert errors[0] is not None and errors[0].reason is Reason.OUT_OF_ORDER
        assert_refused(wire.responder, Reason.OUT_OF_ORDER)
    else:  # datagrams may be reordered: each delivered once, in arrival order
        assert errors == [None] * 6
        assert received_data(drain(wire.responder)) == [b"%d" % k for k in order]
        chat(wire)
    chat(world.bystander_session())


def test_data_before_confirmation_confirms_on_datagrams() -> None:
    wire = make_world(Transport.DATAGRAM).victim.wire()
    wire.to("r", wire.take("i")[0])
    wire.to("i", wire.take("r")[0])
    wire.initiator.send_data(b"hello", NOW)
    confirm, data = wire.take("i")
    wire.to("r", data)  # overtakes the key confirmation
    wire.to("r", confirm)
    events = drain(wire.responder)
    assert [type(e) for e in events] == [HandshakeCompleted, DataReceived]
    assert refusals(events) == []


@BOTH
def test_dropping(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.established()
    for n in range(4):
        wire.initiator.send_data(b"%d" % n, NOW)
    records = wire.take("i")
    errors = [wire.to("r", records[k]) for k in (0, 2, 3)]  # record 1 dropped
    if transport is Transport.STREAM:
        assert errors[1] is not None and errors[1].reason is Reason.OUT_OF_ORDER
        events = drain(wire.responder)
        assert refusals(events) == [Reason.OUT_OF_ORDER]
        assert received_data(events) == [b"0"]  # nothing after the gap
    else:
        assert received_data(drain(wire.responder)) == [b"0", b"2", b"3"]
        chat(wire)
    chat(world.bystander_session())


@BOTH
def test_reflection(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.wire()
    [init] = wire.take("i")
    error = wire.to("i", init)  # message 1 back to its sender
    assert_refused(wire.initiator, Reason.UNEXPECTED_FRAME)
    assert (error is not None) == (transport is Transport.STREAM)
    # message 1 into the *responder* side of its own sender: the prologue binds the roles
    alpha_listening = Connection(
        config=config("alpha", transport), keys=world.victim.initiator_store, role=Role.RESPONDER
    )
    assert deliver(alpha_listening, init) is not None
    assert_refused(alpha_listening, Reason.AUTH_FAILED)

    wire = world.victim.wire(NOW + 1)
    wire.to("r", wire.take("i")[0], NOW + 1)
    [response] = wire.take("r")
    error = wire.to("r", response, NOW + 1)
    assert_refused(wire.responder, Reason.UNEXPECTED_FRAME)
    assert (error is not None) == (transport is Transport.STREAM)

    wire = world.victim.established(NOW + 2)
    wire.initiator.send_data(b"to bravo", NOW + 2)
    wire.responder.send_data(b"to alpha", NOW + 2)
    for side, record in (("i", wire.take("i")[0]), ("r", wire.take("r")[0])):
        error = wire.to(side, record, NOW + 2)  # each direction has its own key
        connection = wire.initiator if side == "i" else wire.responder
        assert_refused(connection, Reason.AUTH_FAILED)
        if transport is Transport.STREAM:
            assert error is not None
            break
    if transport is Transport.DATAGRAM:
        chat(wire, now=NOW + 2)
    chat(world.bystander_session())


# -- keysets ----------------------------------------------------------------------------


@BOTH
def test_ck_id_swapped_for_another_pairs(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.wire()
    [init] = wire.take("i")
    swapped = init[:1] + world.bystander.ck.ck_id + init[17:]  # bravo holds that CK too
    fresh = world.victim.responder()
    assert deliver(fresh, swapped) is not None
    assert_refused(fresh, Reason.AUTH_FAILED)  # another PSK and prologue
    fresh = world.victim.responder()
    assert deliver(fresh, init[:1] + os.urandom(16) + init[17:]) is not None
    assert_refused(fresh, Reason.UNKNOWN_CK)
    assert wire.to("r", init) is None
    wire.pump()
    chat(wire)
    chat(world.bystander_session())


@pytest.mark.parametrize("field", ["ck_id", "mission_id", "not_after", "identities"])
@BOTH
def test_the_prologue_binds_the_ck_so_its_pair_key_alone_does_not_open_message_1(
    transport: Transport, field: str
) -> None:
    """A responder holding a CK with the same pair key but another ``ck_id``, mission, end
    of window or pair (each passing every check made before the crypto) refuses message 1
    on its tag: the prologue it builds differs (``docs/protocol.md``, Prologue)."""
    world = make_world(transport)
    ck = world.victim.ck
    [init] = world.victim.wire().take("i")
    mission = ck.mission_id
    if field == "ck_id":
        other = dataclasses.replace(ck, ck_id=os.urandom(16))
        init = init[:1] + other.ck_id + init[17:]
    elif field == "mission_id":
        other = dataclasses.replace(ck, mission_id=OTHER_MISSION)
        mission = OTHER_MISSION
    elif field == "not_after":
        other = dataclasses.replace(ck, not_after=ck.not_after + 1)
    else:  # alpha sent it; this bravo's CK pairs it with alice, under the same key
        other = dataclasses.replace(ck, party_a="alice")
    bravo = Connection(
        config=SessionConfig(identity="bravo", mission_id=mission, transport=transport),
        keys=MemoryKeyStore([other]),
        role=Role.RESPONDER,
    )
    assert deliver(bravo, init) is not None
    assert_refused(bravo, Reason.AUTH_FAILED)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"not_after": int(NOW - 600)}, Reason.CK_EXPIRED),
        ({"not_before": int(NOW + 3600), "not_after": int(NOW + 7200)}, Reason.CK_NOT_YET_VALID),
        ({"mission_id": OTHER_MISSION}, Reason.WRONG_MISSION),
    ],
)
@BOTH
def test_ck_outside_its_window_or_mission(
    transport: Transport, change: dict[str, object], reason: Reason
) -> None:
    world = make_world(transport)
    ck = world.victim.ck
    bravo = MemoryKeyStore([dataclasses.replace(ck, **change)])  # type: ignore[arg-type]
    wire = Pair(ck, world.victim.initiator_store, bravo, transport).wire()
    error = wire.to("r", wire.take("i")[0])
    assert error is not None and error.reason is reason
    assert_refused(wire.responder, reason)
    assert wire.take("r") == [REFUSE_FRAME]
    chat(world.bystander_session())


@BOTH
def test_clock_skew_is_configurable(transport: Transport) -> None:
    ck = make_ck("alpha", "bravo", not_after=NOW + 10)
    pair = Pair(ck, MemoryKeyStore([ck]), MemoryKeyStore([ck]), transport)
    wire = pair.wire(NOW + 9)  # the initiator's clock says valid
    [init] = wire.take("i")
    assert deliver(pair.responder(), init, NOW + 60) is None  # 50 s late: within 5 min
    strict = pair.responder(clock_skew=30.0)
    assert deliver(strict, init, NOW + 60) is not None
    assert_refused(strict, Reason.CK_EXPIRED)


@BOTH
def test_a_message_1_refused_for_clock_skew_leaves_the_high_water_mark(
    transport: Transport,
) -> None:
    """The mark is raised only once message 1 is fresh on both counts (``docs/protocol.md``,
    step 6): a peer whose clock ran 20 minutes ahead is refused, but does not lock the
    pair out until real time passes its stamp."""
    world = make_world(transport)
    ck = world.victim.ck
    ahead = Pair(ck, MemoryKeyStore([ck]), world.bravo, transport).wire(NOW + 1200)
    error = ahead.to("r", ahead.take("i")[0])
    assert error is not None and error.reason is Reason.CLOCK_SKEW
    assert world.bravo.high_water(ck.ck_id, Role.RESPONDER) == 0
    wire = world.victim.established()  # the clock fixed: the next message 1 is fresh
    assert wire.responder.state is State.ESTABLISHED
    chat(wire)


@BOTH
def test_revoked_ck(transport: Transport) -> None:
    world = make_world(transport)
    wire = world.victim.wire()
    world.bravo.revoke(world.victim.ck.ck_id)
    assert wire.to("r", wire.take("i")[0]) is not None
    assert_refused(wire.responder, Reason.REVOKED_CK)
    chat(world.bystander_session())


@BOTH
def test_identity_mismatch(transport: Transport) -> None:
    """A CK for alpha-bravo used by alpha towards charlie."""
    world = make_world(transport)

    def charlie_refuses(keys: MemoryKeyStore, now: float) -> Connection:
        charlie = Connection(config=config("charlie", transport), keys=keys, role=Role.RESPONDER)
        assert deliver(charlie, world.victim.wire(now).take("i")[0], now) is not None
        return charlie

    # even a charlie that somehow holds the CK refuses it: charlie is not one of its parties
    assert_refused(
        charlie_refuses(MemoryKeyStore([world.victim.ck]), NOW), Reason.IDENTITY_MISMATCH
    )
    assert_refused(charlie_refuses(MemoryKeyStore(), NOW + 1), Reason.UNKNOWN_CK)
    chat(world.bystander_session())


@BOTH
def test_wrong_psk(transport: Transport) -> None:
    world = make_world(transport)
    ck = world.victim.ck
    impostor = dataclasses.replace(ck, pair_key=os.urandom(32))
    wire = Pair(ck, MemoryKeyStore([impostor]), world.bravo, transport).wire()
    assert wire.to("r", wire.take("i")[0]) is not None
    assert_refused(wire.responder, Reason.AUTH_FAILED)
    # and a responder holding a wrong key refuses the genuine initiator
    wire = Pair(ck, world.victim.initiator_store, MemoryKeyStore([impostor]), transport).wire()
    assert wire.to("r", wire.take("i")[0]) is not None
    assert_refused(wire.responder, Reason.AUTH_FAILED)
    chat(world.bystander_session())


# -- sizes ----------------------------------------------------------------------------


def test_oversize_and_zero_length_datagrams() -> None:
    world = make_world(Transport.DATAGRAM)
    wire = world.victim.established()
    for junk, reason in [
        (b"", Reason.MALFORMED),
        (b"\x18", Reason.MALFORMED),
        (b"\x18\x00\x00" + bytes(21), Reason.MALFORMED),  # a record with length 0
        (b"\x18\xff\xff" + bytes(100), Reason.OVERSIZE),
        (bytes([0x18]) + bytes(MAX_FRAME_SIZE + 1), Reason.MALFORMED),
        (b"\x12" + bytes(16) + b"\xff\xff", Reason.OVERSIZE),  # a ticket over the limit
    ]:
        assert wire.to("r", junk) is None
        assert_refused(wire.responder, reason)
    chat(wire)


def test_oversize_stream_frame_is_refused_from_its_header() -> None:
    world = make_world(Transport.STREAM)
    wire = world.victim.established()
    error = wire.to("r", b"\x18\xff\xff")  # nothing buffered beyond the 3-byte header
    assert error is not None and error.reason is Reason.OVERSIZE
    assert wire.responder.state is State.ERROR
    chat(world.bystander_session())


@BOTH
def test_empty_or_padded_control_records_from_a_key_holder(transport: Transport) -> None:
    """A peer with the keys still cannot send an empty DATA or a CLOSE with a payload."""
    for kind, plaintext in ((RecordKind.DATA, b""), (RecordKind.CLOSE, b"why")):
        wire = make_world(transport).victim.established()
        sender = wire.initiator._sender
        assert sender is not None
        forged = sender.seal(kind, plaintext)
        error = wire.to("r", forged)
        assert_refused(wire.responder, Reason.MALFORMED)
        assert_fatal_or_dropped(wire, "r", error, transport)


@BOTH
def test_a_record_kind_changed_between_empty_kinds_fails_its_tag(transport: Transport) -> None:
    """The header is the AEAD's associated data: the kind bits cannot be moved, even between
    two kinds that both carry nothing (a REKEY_REQUEST passed off as a CLOSE would end the
    session). Only the tag can tell these apart: no size or payload check does."""
    wire = make_world(transport).victim.established()
    sender = wire.responder._sender
    assert sender is not None
    request = sender.seal(RecordKind.REKEY_REQUEST, b"")
    moved = (RecordKind.REKEY_REQUEST ^ RecordKind.CLOSE) << 1
    error = wire.to("i", bytes([request[0] ^ moved]) + request[1:])
    assert_refused(wire.initiator, Reason.AUTH_FAILED)
    assert wire.initiator.state is not State.CLOSED
    assert_fatal_or_dropped(wire, "i", error, transport)


def test_record_under_a_phase_with_no_key() -> None:
    wire = make_world(Transport.DATAGRAM).victim.established()
    header = pack_record_header(RecordKind.DATA, 1, 0, 16 + 4)
    assert wire.to("r", header + bytes(20)) is None
    assert_refused(wire.responder, Reason.UNKNOWN_KEY_PHASE)
    chat(wire)


# -- what a stranger can make the responder do -----------------------------------------


def test_forged_message_1_costs_no_diffie_hellman(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.crypto import noise

    calls: list[str] = []
    real_dh, real_generate = noise._dh, noise.KeyPair.generate
    monkeypatch.setattr(noise, "_dh", lambda *a: calls.append("dh") or real_dh(*a))
    monkeypatch.setattr(
        noise.KeyPair, "generate", classmethod(lambda cls: calls.append("gen") or real_generate())
    )
    world = make_world(Transport.DATAGRAM)
    init = world.victim.wire().take("i")[0]
    calls.clear()
    for _ in range(20):  # a non-holder's flood: right ck_id, anything else
        forged = init[:17] + os.urandom(len(init) - 17)
        fresh = world.victim.responder()
        assert deliver(fresh, forged) is not None
        assert_refused(fresh, Reason.AUTH_FAILED)
    assert calls == []
    assert deliver(world.victim.responder(), init) is None
    assert calls == ["gen", "dh"]  # the genuine one does its X25519 work


def test_every_refusal_looks_the_same_to_the_peer() -> None:
    world = make_world(Transport.STREAM)
    init = world.victim.wire().take("i")[0]
    answers = {}
    cases = {
        Reason.UNKNOWN_CK: init[:1] + bytes(16) + init[17:],
        Reason.AUTH_FAILED: init[:-1] + bytes([init[-1] ^ 1]),
        Reason.REPLAYED_INIT: init,
    }
    deliver(world.victim.responder(), init)  # accepted once: the next is a replay
    for reason, frame in cases.items():
        fresh = world.victim.responder()
        error = deliver(fresh, frame)
        assert error is not None and error.reason is reason
        answers[reason] = fresh.data_to_send()
    assert set(answers.values()) == {REFUSE_FRAME}


def test_injected_refusal_cannot_end_a_datagram_session() -> None:
    """REFUSE is unauthenticated: it may end a first handshake (like dropping its
    packets would), never a session that holds keys, even while it rekeys."""
    world = make_world(Transport.DATAGRAM)
    wire = world.victim.established(rekey_after_records=2)
    wire.initiator.send_data(b"x", NOW)  # with the confirmation: 2 records, rekey starts
    assert wire.initiator.state is State.REKEYING
    assert wire.to("i", REFUSE_FRAME) is None
    assert one_refusal(wire.initiator) is Reason.UNEXPECTED_FRAME
    wire.pump()
    assert wire.initiator.epoch == 1
    chat(wire)
    pending = world.victim.wire(NOW + 1)
    pending.take("i")
    assert pending.to("i", REFUSE_FRAME, NOW + 1) is None
    assert pending.initiator.state is State.CLOSED


@BOTH
def test_a_ck_stolen_later_does_not_decrypt_recorded_sessions(transport: Transport) -> None:
    """Forward secrecy: the thief replays the recording into a node of its own that holds
    the CK (and no high-water mark). It reads message 1's payload -- a timestamp and
    capabilities, nothing secret -- but every recorded record fails to open, because the
    session keys also depend on ephemeral private keys that were never stored (a
    regression that reused or derived the responder's ephemeral key would make this test
    fail; the initiator's is the next test's)."""
    world = make_world(transport)
    wire = world.victim.established()
    wire.initiator.send_data(b"the secret plan", NOW)
    wire.pump()
    recorded = wire.log["i"]  # INIT, key confirmation, data record
    thief = Pair(
        world.victim.ck, MemoryKeyStore(), MemoryKeyStore([world.victim.ck]), transport
    ).responder()
    assert deliver(thief, recorded[0], NOW + 1) is None  # the PSK alone opens message 1
    for record in recorded[1:]:
        deliver(thief, record, NOW + 1)
    events = drain(thief)
    assert not [e for e in events if isinstance(e, DataReceived | HandshakeCompleted)]
    assert Reason.AUTH_FAILED in refusals(events)


def _ephemerals(frames: list[bytes]) -> list[bytes]:
    """The ephemeral public key of every message 1 (INIT, REKEY_INIT) and message 2."""
    keys = []
    for frame in frames:
        kind = frame[0] & 0x0F
        if kind in (FrameType.INIT, FrameType.REKEY_INIT):
            keys.append(frame[17:49])
        elif kind == FrameType.RESPONSE:
            keys.append(frame[1:33])
    return keys


@BOTH
def test_every_message_1_and_2_carries_a_fresh_ephemeral_key(transport: Transport) -> None:
    """Forward secrecy needs a new ephemeral key per handshake on *both* sides, and so does
    message 1's AEAD key (derived from the PSK and the initiator's ``e`` alone: one ``e``
    used twice would encrypt two timestamps under one key and nonce). The test above holds
    only while the responder's key is fresh; this one fails if either side ever reuses one:
    across sessions, rekeys and (datagrams) retried messages 1 and the answers to them."""
    pair = make_world(transport).victim
    frames: list[bytes] = []
    for n in range(2):
        wire = pair.established(NOW + n, rekey_after_records=2)
        for _ in range(2):  # the key confirmation and one record: a rekey each time
            wire.initiator.send_data(b"x", NOW + n)
            wire.pump(NOW + n)
        assert wire.initiator.epoch == wire.responder.epoch == 2
        frames += wire.log["i"] + wire.log["r"]
    expected = 2 * 3 * 2  # sessions x handshakes x messages
    if transport is Transport.DATAGRAM:
        wire = pair.wire(NOW + 10, retransmit_interval=1.0)
        wire.take("i")  # message 1 lost: the initiator retries
        wire.initiator.handle_timer(NOW + 11)
        wire.to("r", wire.take("i")[0], NOW + 11)
        wire.take("r")  # message 2 lost: a second retry, answered afresh
        wire.initiator.handle_timer(NOW + 13)
        wire.pump(NOW + 13)
        assert wire.initiator.state is wire.responder.state is State.ESTABLISHED
        frames += wire.log["i"] + wire.log["r"]
        expected += 3 + 2
    keys = _ephemerals(frames)
    assert len(keys) == expected
    assert len(set(keys)) == len(keys)
