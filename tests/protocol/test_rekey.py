"""Rekeying by a fresh handshake: by count, by age, on request; nothing in flight is lost."""

from __future__ import annotations

import pytest

from mesh.protocol import (
    ConnectionTerminated,
    FrameRejected,
    HandshakeCompleted,
    LocalProtocolError,
    Reason,
    State,
    Termination,
    Transport,
)
from mesh.protocol.frames import RecordKind, unpack_record_header
from tests.protocol.harness import NOW, chat, drain, make_pair, received_data

BOTH = pytest.mark.parametrize("transport", list(Transport))


def _completed(events: list[object]) -> list[int]:
    return [e.epoch for e in events if isinstance(e, HandshakeCompleted)]


@BOTH
def test_rekey_after_a_record_count_loses_nothing_in_flight(transport: Transport) -> None:
    wire = make_pair(transport).established(rekey_after_records=4)
    for n in range(4):
        wire.initiator.send_data(b"old %d" % n, NOW)
    assert wire.initiator.state is State.REKEYING  # the 4th record triggered message 1
    wire.initiator.send_data(b"during", NOW)  # still under the old keys
    i_frames = wire.take("i")
    wire.responder.send_data(b"reply before rekey", NOW)
    r_old = wire.take("r")
    for frame in i_frames:  # records, INIT, record
        assert wire.to("r", frame) is None
    assert wire.responder.state is State.REKEYING
    wire.responder.send_data(b"reply during", NOW)  # old keys: not confirmed yet
    r_frames = wire.take("r")  # RESPONSE, record
    for frame in r_old + r_frames:
        assert wire.to("i", frame) is None
    assert wire.initiator.state is State.ESTABLISHED and wire.initiator.epoch == 1
    wire.initiator.send_data(b"new", NOW)
    wire.pump()
    assert wire.responder.epoch == 1
    r_events, i_events = drain(wire.responder), drain(wire.initiator)
    assert received_data(r_events) == [b"old 0", b"old 1", b"old 2", b"old 3", b"during", b"new"]
    assert received_data(i_events) == [b"reply before rekey", b"reply during"]
    assert _completed(r_events) == _completed(i_events) == [1]
    chat(wire)


def test_datagram_records_of_the_old_epoch_arriving_late_are_still_accepted() -> None:
    wire = make_pair(Transport.DATAGRAM).established(rekey_after_records=3)
    wire.responder.send_data(b"late 1", NOW)
    wire.responder.send_data(b"late 2", NOW)
    late = wire.take("r")  # held back by the network
    wire.initiator.send_data(b"a", NOW)
    wire.initiator.send_data(b"b", NOW)
    wire.pump()  # the rekey completes meanwhile
    assert wire.initiator.epoch == wire.responder.epoch == 1
    for frame in reversed(late):
        assert wire.to("i", frame) is None
    assert received_data(drain(wire.initiator)) == [b"late 2", b"late 1"]
    # ... until the previous key's lifetime has passed
    wire.responder.send_data(b"fresh", NOW)
    expiry = wire.initiator.get_timer()
    assert expiry is not None
    wire.initiator.handle_timer(expiry)
    assert wire.to("i", late[0], expiry) is None
    assert drain(wire.initiator) == [FrameRejected(Reason.UNKNOWN_KEY_PHASE)]
    wire.pump(expiry)
    assert received_data(drain(wire.initiator)) == [b"fresh"]


@BOTH
def test_rekey_after_an_age(transport: Transport) -> None:
    wire = make_pair(transport).established(rekey_after_seconds=600.0)
    assert wire.initiator.get_timer() == NOW + 600.0
    wire.initiator.handle_timer(NOW + 599.0)
    assert wire.initiator.state is State.ESTABLISHED
    wire.initiator.handle_timer(NOW + 600.0)
    assert wire.initiator.state is State.REKEYING
    wire.pump(NOW + 600.0)
    assert wire.initiator.epoch == wire.responder.epoch == 1
    wire.initiator.handle_timer(NOW + 1199.0)
    assert wire.initiator.state is State.ESTABLISHED
    wire.initiator.handle_timer(NOW + 1200.0)  # the age counts from the new keys
    assert wire.initiator.state is State.REKEYING
    wire.pump(NOW + 1200.0)
    chat(wire, now=NOW + 1200.0)


@BOTH
def test_responder_asks_for_a_rekey_when_its_keys_wear_out(transport: Transport) -> None:
    wire = make_pair(transport).established(rekey_after_records=3)
    for n in range(3):
        wire.responder.send_data(b"%d" % n, NOW)
    frames = wire.take("r")
    kinds = [unpack_record_header(f)[0] for f in frames]
    assert kinds == [RecordKind.DATA] * 3 + [RecordKind.REKEY_REQUEST]
    for frame in frames:
        wire.to("i", frame)
    assert wire.initiator.state is State.REKEYING
    wire.pump()
    assert wire.initiator.epoch == wire.responder.epoch == 1


@BOTH
def test_each_epoch_has_its_own_keys(transport: Transport) -> None:
    wire = make_pair(transport).established(rekey_after_records=3)
    wire.initiator.send_data(b"same", NOW)
    first = wire.take("i")[0]
    wire.to("r", first)
    wire.initiator.send_data(b"x", NOW)
    wire.pump()
    assert wire.initiator.epoch == 1
    wire.initiator.send_data(b"same", NOW)
    second = wire.take("i")[0]
    # counter 1 under both epochs, same plaintext: only the key differs
    assert unpack_record_header(first)[2] == unpack_record_header(second)[2] == 1
    assert unpack_record_header(first)[1] != unpack_record_header(second)[1]
    assert first[8:] != second[8:]


@BOTH
def test_no_record_past_the_per_key_limit(transport: Transport) -> None:
    wire = make_pair(transport).established(record_limit=5, rekey_after_records=5)
    for n in range(4):  # the key confirmation used counter 0
        wire.initiator.send_data(b"%d" % n, NOW)
    assert wire.initiator.state is State.REKEYING  # the rekey cannot complete: never pumped
    with pytest.raises(LocalProtocolError):
        wire.initiator.send_data(b"one too many", NOW)
    wire.pump()  # once it completes, the new keys allow sending again
    wire.initiator.send_data(b"after", NOW)
    wire.pump()
    assert received_data(drain(wire.responder))[-1] == b"after"


def test_rekey_is_refused_once_the_ck_is_revoked() -> None:
    pair = make_pair(Transport.STREAM)
    wire = pair.established(rekey_after_records=2)
    pair.responder_store.revoke(pair.ck.ck_id)
    wire.initiator.send_data(b"a", NOW)  # with the key confirmation, 2 records: rekey
    record, init = wire.take("i")
    wire.to("r", record)
    error = wire.to("r", init)
    assert error is not None and error.reason is Reason.REVOKED_CK
    assert wire.responder.state is State.ERROR
    *_, refuse = wire.take("r")
    assert refuse == b"\x14"
    wire.to("i", refuse)
    assert wire.initiator.state is State.CLOSED
    assert drain(wire.initiator)[-1] == ConnectionTerminated(Termination.PEER_REFUSED)


def test_initiator_closes_instead_of_rekeying_with_an_expired_ck() -> None:
    pair = make_pair(Transport.STREAM, not_after=NOW + 100)
    wire = pair.established(rekey_after_seconds=200.0)
    wire.initiator.handle_timer(NOW + 200.0)
    assert wire.initiator.state is State.CLOSED
    wire.pump(NOW + 200.0)
    assert drain(wire.responder)[-1] == ConnectionTerminated(Termination.PEER_CLOSE)
