"""Honest sessions: handshake, records, close, timers, over streams and datagrams."""

from __future__ import annotations

import pytest

from mesh.protocol import (
    Connection,
    ConnectionTerminated,
    HandshakeCompleted,
    LocalProtocolError,
    MemoryKeyStore,
    Role,
    State,
    Termination,
    Transport,
)
from mesh.protocol.frames import MAX_RECORD_PLAINTEXT, RECORD_OVERHEAD, unpack_record_header
from tests.protocol.harness import (
    NOW,
    chat,
    config,
    deliver,
    drain,
    make_ck,
    make_pair,
    received_data,
    split_frames,
)

BOTH = pytest.mark.parametrize("transport", list(Transport))


@BOTH
def test_handshake_then_data_both_ways(transport: Transport) -> None:
    pair = make_pair(transport)
    wire = pair.wire(capabilities=0x0102)
    wire.pump()
    [i_done] = drain(wire.initiator)
    [r_done] = drain(wire.responder)
    assert i_done == HandshakeCompleted("bravo", pair.ck.ck_id, 0, 0x0102)
    assert r_done == HandshakeCompleted("alpha", pair.ck.ck_id, 0, 0x0102)
    assert wire.initiator.peer == "bravo" and wire.responder.peer == "alpha"
    chat(wire)


@BOTH
def test_handshake_fits_160_bytes_and_records_cost_24(transport: Transport) -> None:
    wire = make_pair(transport).wire()
    wire.pump()
    assert [len(f) for f in wire.log["i"]] == [75, 24]  # INIT, KEY_CONFIRM
    assert [len(f) for f in wire.log["r"]] == [51]  # RESPONSE
    assert sum(map(len, wire.log["i"] + wire.log["r"])) == 150
    wire.initiator.send_data(b"x" * 100, NOW)
    assert [len(f) for f in wire.take("i")] == [100 + RECORD_OVERHEAD]


@BOTH
def test_record_sizes(transport: Transport) -> None:
    wire = make_pair(transport).established()
    big = bytes(range(256)) * (MAX_RECORD_PLAINTEXT // 256)
    wire.initiator.send_data(big, NOW)
    wire.pump()
    assert received_data(drain(wire.responder)) == [big]
    for bad in (b"", big + b"x"):
        with pytest.raises(LocalProtocolError):
            wire.initiator.send_data(bad, NOW)


@BOTH
def test_data_sent_before_the_handshake_waits_for_it(transport: Transport) -> None:
    pair = make_pair(transport)
    wire = pair.wire(connect=False, max_pending_records=2)
    wire.initiator.send_data(b"early 1", NOW)
    wire.initiator.send_data(b"early 2", NOW)
    with pytest.raises(LocalProtocolError):
        wire.initiator.send_data(b"one too many", NOW)
    wire.initiator.connect(pair.ck.ck_id, NOW)
    wire.responder.send_data(b"early reply", NOW)
    wire.pump()
    assert received_data(drain(wire.responder)) == [b"early 1", b"early 2"]
    assert received_data(drain(wire.initiator)) == [b"early reply"]


@BOTH
def test_responder_authenticates_the_peer_only_on_key_confirmation(transport: Transport) -> None:
    wire = make_pair(transport).wire()
    [init] = wire.take("i")
    wire.to("r", init)
    assert wire.responder.state is State.AWAIT_CONFIRM and drain(wire.responder) == []
    [response] = wire.take("r")
    wire.to("i", response)
    assert wire.initiator.state is State.ESTABLISHED
    [confirm] = wire.take("i")
    assert wire.responder.state is State.AWAIT_CONFIRM
    wire.to("r", confirm)
    assert wire.responder.state is State.ESTABLISHED
    assert isinstance(drain(wire.responder)[0], HandshakeCompleted)


def test_early_data_leaves_with_message_2_and_is_read_before_confirmation() -> None:
    """``early_data``: the responder's record rides with message 2 (0.5-RTT data)."""
    wire = make_pair(Transport.STREAM).wire(early_data=True)
    [init] = wire.take("i")
    wire.to("r", init)
    wire.responder.send_data(b"challenge", NOW)
    assert wire.responder.state is State.AWAIT_CONFIRM  # still unconfirmed
    response, early = wire.take("r")
    assert unpack_record_header(early)[2] == 0  # the first record under message 2's keys
    for frame in (response, early):
        wire.to("i", frame)
    assert received_data(drain(wire.initiator)) == [b"challenge"]
    # the initiator answers behind its key confirmation; the responder confirms, then reads
    wire.initiator.send_data(b"answer", NOW)
    for frame in wire.take("i"):
        wire.to("r", frame)
    events = drain(wire.responder)
    assert isinstance(events[0], HandshakeCompleted) and received_data(events) == [b"answer"]
    wire.responder.send_data(b"after", NOW)  # same key, next counter: no gap, no reuse
    [after] = wire.take("r")
    assert unpack_record_header(after)[2] == 1
    wire.to("i", after)
    assert received_data(drain(wire.initiator)) == [b"after"]


def test_without_early_data_the_responder_waits_for_confirmation() -> None:
    wire = make_pair(Transport.STREAM).wire()
    wire.to("r", wire.take("i")[0])
    wire.responder.send_data(b"held", NOW)
    [response] = wire.take("r")  # message 2 alone: the record is queued
    wire.to("i", response)
    wire.pump()
    assert received_data(drain(wire.initiator)) == [b"held"]


def test_early_data_is_for_streams_only() -> None:
    with pytest.raises(LocalProtocolError):
        config("bravo", Transport.DATAGRAM, early_data=True)


@BOTH
def test_orderly_close(transport: Transport) -> None:
    wire = make_pair(transport).established()
    wire.responder.send_data(b"last words", NOW)
    wire.responder.close(NOW)
    assert wire.responder.state is State.CLOSED
    assert drain(wire.responder) == [ConnectionTerminated(Termination.LOCAL_CLOSE)]
    wire.pump()
    events = drain(wire.initiator)
    assert received_data(events) == [b"last words"]
    assert events[-1] == ConnectionTerminated(Termination.PEER_CLOSE)
    assert wire.initiator.state is State.CLOSED
    for connection in (wire.initiator, wire.responder):
        with pytest.raises(LocalProtocolError):
            connection.send_data(b"x", NOW)
        connection.close(NOW)  # idempotent
        assert connection.get_timer() is None


def test_stream_input_in_any_chunking() -> None:
    pair = make_pair(Transport.STREAM)
    wire = pair.wire()
    init = wire.initiator.data_to_send()
    for byte in init:  # one byte at a time
        wire.responder.receive_data(bytes([byte]), NOW)
    wire.initiator.receive_data(wire.responder.data_to_send(), NOW)
    for n in range(3):
        wire.initiator.send_data(b"chunk %d" % n, NOW)
    stream = wire.initiator.data_to_send()  # confirm + three records, coalesced
    wire.responder.receive_data(stream[:30], NOW)
    wire.responder.receive_data(stream[30:], NOW)
    assert received_data(drain(wire.responder)) == [b"chunk 0", b"chunk 1", b"chunk 2"]


@BOTH
def test_counters_never_repeat(transport: Transport) -> None:
    wire = make_pair(transport).established()
    for n in range(50):
        wire.initiator.send_data(b"%d" % n, NOW)
    counters = [unpack_record_header(f)[2] for f in wire.take("i")]
    assert counters == list(range(1, 51))  # 0 was the key confirmation


@BOTH
def test_handshake_timeout(transport: Transport) -> None:
    wire = make_pair(transport).wire(handshake_timeout=5.0)
    wire.take("i")  # lost
    deadline = wire.initiator.get_timer()
    assert deadline is not None and deadline <= NOW + 5.0
    wire.initiator.handle_timer(NOW + 5.0)
    assert wire.initiator.state is State.CLOSED
    assert drain(wire.initiator)[-1] == ConnectionTerminated(Termination.HANDSHAKE_TIMEOUT)
    # the responder that never saw a confirmation gives up too
    wire = make_pair(transport).wire(handshake_timeout=5.0)
    [init] = wire.take("i")
    wire.to("r", init)
    wire.responder.handle_timer(NOW + 5.0)
    assert wire.responder.state is State.CLOSED


def test_datagram_handshake_survives_loss_by_retransmitting() -> None:
    wire = make_pair(Transport.DATAGRAM).wire(retransmit_interval=1.0)
    wire.take("i")  # message 1 lost
    assert wire.initiator.get_timer() == NOW + 1.0
    wire.initiator.handle_timer(NOW + 1.0)
    [init] = wire.take("i")  # a fresh message 1
    wire.to("r", init, NOW + 1.0)
    wire.take("r")  # message 2 lost
    wire.initiator.handle_timer(NOW + 3.0)  # backoff doubled the interval
    wire.pump(NOW + 3.0)
    assert wire.initiator.state is State.ESTABLISHED
    assert wire.responder.state is State.ESTABLISHED
    chat(wire, now=NOW + 3.0)


def test_api_misuse_is_a_local_error() -> None:
    pair = make_pair(Transport.STREAM)
    wire = pair.wire()
    with pytest.raises(LocalProtocolError):
        wire.initiator.connect(pair.ck.ck_id, NOW)  # twice
    with pytest.raises(LocalProtocolError):
        wire.responder.connect(pair.ck.ck_id, NOW)  # a responder does not dial
    with pytest.raises(LocalProtocolError):
        wire.initiator.datagrams_to_send()
    with pytest.raises(LocalProtocolError):
        wire.initiator.datagram_received(b"", NOW)
    fresh = Connection(
        config=config("alpha", Transport.STREAM), keys=pair.initiator_store, role=Role.INITIATOR
    )
    with pytest.raises(LocalProtocolError):
        fresh.connect(bytes(16), NOW)  # no such CK
    with pytest.raises(LocalProtocolError):
        fresh.connect(pair.ck.ck_id, pair.ck.not_after + 1.0)  # our own CK expired
    pair.initiator_store.revoke(pair.ck.ck_id)
    with pytest.raises(LocalProtocolError):
        fresh.connect(pair.ck.ck_id, NOW)
    assert fresh.state is State.START
    with pytest.raises(LocalProtocolError):
        config("Not An Identity", Transport.STREAM)
    with pytest.raises(LocalProtocolError):
        config("alpha", Transport.STREAM, rekey_after_records=0)


def test_initiator_timestamps_strictly_increase_and_marks_persist() -> None:
    pair = make_pair(Transport.STREAM)
    for _ in range(3):  # three handshakes in the same microsecond
        pair.established(NOW)
    sent = [(c, m) for c, role, m in pair.initiator_store.marks() if role is Role.INITIATOR]
    accepted = [(c, m) for c, role, m in pair.responder_store.marks() if role is Role.RESPONDER]
    assert sent == accepted == [(pair.ck.ck_id, int(NOW * 1e6) + 2)]
    # a responder restarted with its marks refuses what it accepted before
    restored = MemoryKeyStore([pair.ck], marks=pair.responder_store.marks())
    assert restored.high_water(pair.ck.ck_id, Role.RESPONDER) == int(NOW * 1e6) + 2


def test_keyset_store_caches_learnt_keysets_boundedly() -> None:
    from mesh.protocol.keysets import MAX_CACHED_KEYSETS

    store = MemoryKeyStore()
    first = make_ck("alpha", "bravo")
    store.cache(first)
    for _ in range(MAX_CACHED_KEYSETS):
        store.cache(make_ck("alpha", "bravo"))
    assert store.lookup(first.ck_id) is None  # the oldest went first


def test_stream_frames_split_cleanly() -> None:
    wire = make_pair(Transport.STREAM).wire()
    assert [len(f) for f in split_frames(wire.initiator.data_to_send())] == [75]
    assert deliver(wire.responder, b"") is None  # nothing is not an error on a stream


@BOTH
def test_plaintext_never_appears_on_the_wire(transport: Transport) -> None:
    wire = make_pair(transport).established()
    secret = b"the eagle lands at 0400 on grid 31U"
    wire.initiator.send_data(secret, NOW)
    wire.responder.send_data(secret, NOW)
    frames = wire.take("i") + wire.take("r")
    assert frames and not any(secret[:8] in frame for frame in frames + wire.log["i"])
