"""The online flow in memory: key change, CK, ticket handshake, lost replies, clones, policy."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from mesh.keyset import open_copy
from mesh.protocol import Connection, DataReceived, MemoryKeyStore, Role, SessionConfig
from mesh.protocol.frames import VERSION, FrameType, frame_size
from mesh.token import Slot
from provisioning.authserver.errors import LocalAuthError, Refusal
from provisioning.authserver.messages import Answer, decode, encode
from provisioning.authserver.meters import (
    MemoryToken,
    factory_keys,
    meter_identity,
    meter_token,
)
from provisioning.authserver.protocol import Authenticated, ClientSession, Granted, Refused
from provisioning.authserver.store import KeyStateStore, SqliteKeyStateStore, SqlKeyStateStore
from provisioning.errors import DeskCorrupt
from tests.authserver.conftest import (
    NOW,
    PASSPHRASE,
    SEED,
    Site,
    make_service,
    request,
    run,
    transfer,
)


def _audit(store: KeyStateStore, op: str | None) -> list[dict[str, object]]:
    assert isinstance(store, SqlKeyStateStore)
    return store.audit_log(op)


def _revoke(site: Site, store: KeyStateStore, node: str) -> None:
    """The desk revokes on its own file; a PostgreSQL store is revoked in place."""
    if isinstance(store, SqliteKeyStateStore):
        with site.open() as desk:
            desk.revoke(node, now=NOW)
    else:
        assert isinstance(store, SqlKeyStateStore)
        store.revoke(node, NOW)


def test_full_flow_key_change_keyset_ticket_handshake_and_chat(
    site: Site, store: KeyStateStore
) -> None:
    service = make_service(store)
    alpha = site.token("alpha-1")
    events = run(service, alpha, [request("gs-1")])
    assert isinstance(events[0], Authenticated) and events[0].key_changed
    assert events[0].generation == 2 == alpha.info().generation(Slot.AUTH)
    assert store.load("alpha-1").generation == 2  # type: ignore[union-attr]
    grant = next(e.grant for e in events if isinstance(e, Granted))
    ck = open_copy(alpha, grant.own)
    assert ck.ck_id == grant.ck_id and ck.not_before <= NOW < ck.not_after
    # alpha-1 dials gs-1 with the ticket; gs-1 has no CK yet, only its token
    gs = site.token("gs-1")
    mission = ck.mission_id
    dialler = Connection(
        config=SessionConfig(identity="alpha-1", mission_id=mission),
        keys=MemoryKeyStore([ck]),
        role=Role.INITIATOR,
    )
    answerer = Connection(
        config=SessionConfig(identity="gs-1", mission_id=mission),
        keys=MemoryKeyStore(ticket_opener=lambda t: open_copy(gs, t)),
        role=Role.RESPONDER,
    )
    dialler.connect(ck.ck_id, NOW, ticket=grant.ticket)
    dialler.send_data(b"hello gs-1", NOW)
    for _ in range(4):
        answerer.receive_data(dialler.data_to_send(), NOW)
        dialler.receive_data(answerer.data_to_send(), NOW)
    received = []
    while (event := answerer.next_event()) is not None:
        if isinstance(event, DataReceived):
            received.append(event.data)
    assert received == [b"hello gs-1"]
    # the audit log names the key change and the keyset, never a key
    changes = _audit(store, "as-key-change")
    assert [c["outcome"] for c in changes] == ["sent", "committed"]
    issued = _audit(store, "as-keyset")
    assert issued[0]["ck"] == grant.ck_id.hex() and issued[0]["epoch"] == 0
    text = json.dumps(_audit(store, None))
    assert grant.own not in text and ck.pair_key.hex() not in text


def test_a_link_is_three_round_trips_and_ends_without_a_close_record(
    site: Site, store: KeyStateStore
) -> None:
    """CHALLENGE rides with message 2; the REQUEST rides behind the ANSWER; the client hangs up."""
    service = make_service(store, key_lifetime=1e9)
    flights: list[tuple[str, list[str]]] = []

    def spy(direction: str, data: bytes) -> bytes:
        flights.append((direction, _frames(data)))
        return data

    client = ClientSession(meter_token(SEED, meter_identity("meter", 10)), [request("gs-1")])
    events = transfer(client, service.session("127.0.0.1", NOW), hook=spy)
    assert any(isinstance(e, Granted) for e in events) and client.finished
    assert flights == [
        ("up", ["clear"]),  # HELLO
        ("down", ["clear"]),  # START
        ("up", ["init"]),  # message 1
        ("down", ["response", "record"]),  # message 2 + CHALLENGE
        ("up", ["record", "record", "record"]),  # KEY_CONFIRM + ANSWER + REQUEST
        ("down", ["record", "record"]),  # READY + KEYSET
    ]


def _frames(data: bytes) -> list[str]:
    """The kinds of frames in one flight: clear messages, then the Noise stream's frames."""
    if data[0] >> 4 != VERSION:  # a clear message starts with its 16-bit length
        return ["clear"]
    kinds, offset = [], 0
    while offset < len(data):
        size = frame_size(data, offset)
        assert size is not None
        kind = data[offset] & 0x0F
        kinds.append(
            "record"
            if kind & FrameType.RECORD
            else "init"
            if kind == FrameType.INIT
            else "response"
        )
        offset += size
    return kinds


def test_requests_behind_a_refused_answer_are_never_read(site: Site, store: KeyStateStore) -> None:
    service = make_service(store, key_lifetime=1e9)
    meter = meter_token(SEED, meter_identity("meter", 11))
    meter.mac = lambda slot, data: b"\x00" * 32  # type: ignore[method-assign]
    events = run(service, meter, [request("gs-1"), request("gs-1", epoch=1)])
    assert events == [Refused(Refusal.AUTH_FAILED, None)]
    assert "keysets" not in service.counters and not _audit(store, "as-keyset")


def test_both_parties_get_the_same_keyset_and_the_desk_exports_it(
    site: Site, store: KeyStateStore
) -> None:
    service = make_service(store, key_lifetime=1e9)
    first = next(
        e for e in run(service, site.token("alpha-1"), [request("gs-1")]) if isinstance(e, Granted)
    )
    second = next(
        e for e in run(service, site.token("gs-1"), [request("alpha-1")]) if isinstance(e, Granted)
    )
    assert first.grant.ck_id == second.grant.ck_id
    assert first.grant.own == second.grant.ticket


def test_next_epochs_but_not_beyond_the_window(site: Site, store: KeyStateStore) -> None:
    service = make_service(store, key_lifetime=1e9)
    events = run(
        service, site.token("alpha-1"), [request("gs-1", epoch=1), request("gs-1", epoch=9)]
    )
    grant = next(e.grant for e in events if isinstance(e, Granted))
    assert grant.not_before == NOW - 60 + 86400
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY]


def test_lost_answer_during_key_change_then_retry_converges(
    site: Site, store: KeyStateStore
) -> None:
    service = make_service(store)
    meter = meter_token(SEED, meter_identity("meter", 1))
    ups: list[bytes] = []

    def lose_answer(direction: str, data: bytes) -> bytes | None:
        if direction == "up":
            ups.append(data)
            return None if len(ups) >= 3 else data  # HELLO, message 1; then confirm + ANSWER
        return data

    # the token applies the key change, then its answer (and the connection) are lost
    client = ClientSession(meter, [request("gs-1")])
    server = service.session("127.0.0.1", NOW)
    transfer(client, server, hook=lose_answer)
    server.connection_lost()
    assert meter.info().generation(Slot.AUTH) == 2
    record = store.load(meter.identity)
    assert record is not None and record.generation == 1 and record.pending is not None
    events = run(service, meter, [request("gs-1")])
    assert isinstance(events[0], Authenticated) and events[0].generation == 2
    assert any(isinstance(e, Granted) for e in events)
    assert store.load(meter.identity).generation == 2  # type: ignore[union-attr]
    assert service.counters["resumed_key_change"] == 1


def test_lost_challenge_gets_the_identical_key_change_again(
    site: Site, store: KeyStateStore
) -> None:
    service = make_service(store)
    meter = meter_token(SEED, meter_identity("meter", 2))
    downs: list[bytes] = []

    def drop_challenge(direction: str, data: bytes) -> bytes | None:
        if direction == "down":
            downs.append(data)
            return None if len(downs) >= 2 else data  # START; then message 2 + CHALLENGE
        return data

    run(service, meter, [request("gs-1")], hook=drop_challenge)
    assert meter.info().generation(Slot.AUTH) == 1
    first_message = service.key_changes[(meter.token_id, 2)]
    events = run(service, meter, [request("gs-1")])
    assert isinstance(events[0], Authenticated) and events[0].generation == 2
    assert service.key_changes[(meter.token_id, 2)] == first_message
    assert store.load(meter.identity).generation == 2  # type: ignore[union-attr]


def test_retransmitted_request_gets_the_identical_answer(site: Site, store: KeyStateStore) -> None:
    service = make_service(store, key_lifetime=1e9)
    meter = meter_token(SEED, meter_identity("meter", 3))
    rid = b"r" * 16
    first = [e for e in run(service, meter, [request("gs-1", rid=rid)]) if isinstance(e, Granted)]
    again = [e for e in run(service, meter, [request("gs-1", rid=rid)]) if isinstance(e, Granted)]
    assert first == again and len(first) == 1
    # issued again (with the checks of now), from the same CK: nothing new is minted
    assert [k["outcome"] for k in _audit(store, "as-keyset")] == ["minted", "existing"]


def test_a_request_retransmitted_after_its_target_was_revoked_is_refused(
    site: Site, store: KeyStateStore
) -> None:
    """A retransmit is issued again, with the checks: a revocation since then holds."""
    service = make_service(store, key_lifetime=1e9)
    alpha = site.token("alpha-1")
    rid = b"v" * 16
    assert any(isinstance(e, Granted) for e in run(service, alpha, [request("gs-1", rid=rid)]))
    _revoke(site, store, "gs-1")
    events = run(service, alpha, [request("gs-1", rid=rid)])
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY], events


def test_a_request_retransmitted_after_its_targets_key_change_carries_a_ticket_it_opens(
    site: Site, store: KeyStateStore
) -> None:
    """The target's key change (on another worker) rewraps its copy: the retransmit gets that."""
    worker, other_worker = make_service(store, key_lifetime=1e9), make_service(store)
    alpha, gs = site.token("alpha-1"), site.token("gs-1")
    rid = b"t" * 16
    first = next(
        e.grant for e in run(worker, alpha, [request("gs-1", rid=rid)]) if isinstance(e, Granted)
    )
    assert run(other_worker, gs, [])[0] == Authenticated(2, True)  # rewraps gs-1's copies
    again = next(
        e.grant for e in run(worker, alpha, [request("gs-1", rid=rid)]) if isinstance(e, Granted)
    )
    assert again.ck_id == first.ck_id and again.own == first.own
    assert open_copy(gs, again.ticket).ck_id == again.ck_id


def test_a_request_retransmitted_after_another_key_change_gets_copies_under_the_new_keys(
    site: Site, store: KeyStateStore
) -> None:
    """A retransmit after the retry changed the keys again: its copy under the new keys opens."""
    service = make_service(store)  # a key change at every link
    meter = meter_token(SEED, meter_identity("meter", 4))
    rid = b"k" * 16
    downs: list[bytes] = []

    def lose_keyset(direction: str, data: bytes) -> bytes | None:
        if direction == "down":
            downs.append(data)
            return None if len(downs) >= 3 else data  # START, message 2; READY + KEYSET lost
        return data

    run(service, meter, [request("gs-1", rid=rid)], hook=lose_keyset)
    assert meter.info().generation(Slot.AUTH) == 2  # the change was committed, the CK was lost
    events = run(service, meter, [request("gs-1", rid=rid)])
    assert isinstance(events[0], Authenticated) and events[0].generation == 3
    grant = next(e.grant for e in events if isinstance(e, Granted))
    assert open_copy(meter, grant.own).ck_id == grant.ck_id  # wrapped for generation 3
    assert [k["ck"] for k in _audit(store, "as-keyset")] == [grant.ck_id.hex()] * 2  # one CK


def test_cloned_token_detected_and_suspended(
    site: Site, store: KeyStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(store)
    original = meter_token(SEED, meter_identity("meter", 4))
    clone = original.clone()
    assert isinstance(run(service, original, [request("gs-1")])[0], Authenticated)
    with caplog.at_level(logging.WARNING, logger="snrmesh.as"):
        events = run(service, clone, [request("gs-1")])
    assert events == [Refused(Refusal.SUSPENDED, None)]
    assert store.load(original.identity).suspended  # type: ignore[union-attr]
    # the identity stays suspended, for the original too, until the desk acts
    assert run(service, original, [request("gs-1")]) == [Refused(Refusal.SUSPENDED, None)]
    alerts = _audit(store, "as-clone-alert")
    assert alerts[0]["node"] == original.identity and alerts[0]["presented_generation"] == 1
    # the operator's alarm: one log line naming the node and token, and no key of either copy
    (alarm,) = [r.getMessage() for r in caplog.records if "CLONE ALERT" in r.getMessage()]
    assert original.identity in alarm and original.token_id.hex() in alarm
    record = store.load(original.identity)
    assert record is not None and record.previous is not None
    keys = [*record.keys, *record.previous]  # generation 2 (the original's), 1 (the copy's)
    assert len(keys) == 8 and not any(k.hex() in alarm for k in keys)
    # the bounded view an operator reads ('as audit'): the last entries, oldest first
    assert isinstance(store, SqlKeyStateStore)
    everything = _audit(store, None)
    assert store.audit_log(None, 2) == everything[-2:]
    assert store.audit_log("as-clone-alert", 1) == alerts[-1:]


def test_a_claimed_old_generation_without_its_key_suspends_nothing(
    site: Site, store: KeyStateStore
) -> None:
    service = make_service(store)
    meter = meter_token(SEED, meter_identity("meter", 5))
    run(service, meter, [])  # now at generation 2; generation 1 is "superseded"
    _, other_keys = factory_keys(SEED, meter_identity("meter", 6))
    impostor = MemoryToken(  # other keys, same claim
        token_id=meter.token_id, identity=meter.identity, role="meter", keys=other_keys
    )
    events = run(service, impostor, [])
    assert not any(isinstance(e, Authenticated) for e in events)
    assert not store.load(meter.identity).suspended  # type: ignore[union-attr]


def test_replayed_answer_and_replayed_link_are_refused(site: Site, store: KeyStateStore) -> None:
    service = make_service(store, key_lifetime=1e9)
    meter = meter_token(SEED, meter_identity("meter", 7))
    recorded: list[bytes] = []
    answers: list[bytes] = []

    real_mac = meter.mac

    def spy_mac(slot: Slot, data: bytes) -> bytes:
        answers.append(real_mac(slot, data))
        return answers[-1]

    meter.mac = spy_mac  # type: ignore[method-assign]
    run(service, meter, [], hook=lambda d, b: (recorded.append(b) if d == "up" else None) or b)
    # a second session whose token answers with the first session's MAC
    meter.mac = lambda slot, data: answers[0]  # type: ignore[method-assign]
    events = run(service, meter, [])
    assert events[-1] == Refused(Refusal.AUTH_FAILED, None)
    # replaying the first session's bytes to a new server session: the nonces differ
    server = service.session("127.0.0.1", NOW)
    for chunk in recorded:
        server.receive_data(chunk, NOW)
        server.data_to_send()
    assert server.closed and service.counters.get("answer_authenticated") == 1
    assert Answer(answers[0]) == decode(encode(Answer(answers[0])))


def test_keyset_outside_policy_or_for_revoked_target_refused(
    site: Site, store: KeyStateStore
) -> None:
    service = make_service(store, key_lifetime=1e9)
    alpha = site.token("alpha-1")
    events = run(service, alpha, [request("uav-1"), request("nobody"), request("alpha-1")])
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY] * 3
    _revoke(site, store, "gs-1")
    events = run(service, alpha, [request("gs-1")])
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY]
    _revoke(site, store, "alpha-2")
    # a revoked requestor is told so (not "suspended", which a clone alert means)
    assert run(service, site.token("alpha-2"), []) == [Refused(Refusal.REVOKED, None)]


def test_a_copy_of_a_revoked_token_is_told_revoked_with_no_clone_alert(
    site: Site, store: KeyStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A revocation is final: a copy left behind gets "revoked", not "suspended ... reinstate"
    (a command that then refuses), and raises no clone alert for a node already out."""
    service = make_service(store)
    original = meter_token(SEED, meter_identity("meter", 5))
    copy = original.clone()
    assert isinstance(run(service, original, [request("gs-1")])[0], Authenticated)  # keys changed
    _revoke(site, store, original.identity)
    with caplog.at_level(logging.WARNING, logger="snrmesh.as"):
        assert run(service, copy, []) == [Refused(Refusal.REVOKED, None)]
    assert _audit(store, "as-clone-alert") == []
    assert not [r for r in caplog.records if "CLONE ALERT" in r.getMessage()]


def test_unknown_identity_fails_like_a_wrong_key(site: Site, store: KeyStateStore) -> None:
    service = make_service(store)
    stranger = meter_token(SEED, "meter-9999999")
    events = run(service, stranger, [])
    assert not any(isinstance(e, Authenticated) for e in events)
    assert service.counters["link_failed"] == 1


def test_flood_from_one_source_others_still_served(site: Site, store: KeyStateStore) -> None:
    service = make_service(store, key_lifetime=1e9, cookie_threshold=5, max_pending=50)
    flood = []
    for i in range(40):  # HELLOs that never finish their handshake
        meter = meter_token(SEED, meter_identity("meter", 1 + i % 10))
        client = ClientSession(meter, [])
        server = service.session("10.0.0.66", NOW)
        server.receive_data(client.data_to_send(), NOW)
        flood.append(decode(server.data_to_send()[2:]))
    kinds = [type(m).__name__ for m in flood]
    assert kinds.count("Start") == 5 and kinds.count("CookieReply") == 35
    assert service.admission.pending("10.0.0.66") == 5
    events = run(
        service,
        meter_token(SEED, meter_identity("meter", 11)),
        [request("gs-1")],
        source="10.0.0.7",
    )
    assert any(isinstance(e, Granted) for e in events)
    # a flooding client that echoes its cookie is admitted, within the global bound
    echo = run(service, meter_token(SEED, meter_identity("meter", 12)), [], source="10.0.0.66")
    assert isinstance(echo[0], Authenticated)


def test_a_link_reads_its_token_row_once_outside_its_changes(
    site: Site, store: SqlKeyStateStore
) -> None:
    """HELLO's record serves the challenge and the answer; changes re-read under the lock."""
    loads: list[str] = []
    real_load = store.load

    def load(identity: str) -> object:
        loads.append(identity)
        return real_load(identity)

    store.load = load  # type: ignore[method-assign]
    service = make_service(store, key_lifetime=1e9)
    meter = meter_token(SEED, meter_identity("meter", 8))
    events = run(service, meter, [request("gs-1"), request("gs-1")])
    assert sum(isinstance(e, Granted) for e in events) == 2
    assert loads == [meter.identity]


def test_cached_key_opens_never_pass_a_tampered_blob(site: Site, store: SqlKeyStateStore) -> None:
    identity = meter_identity("meter", 9)
    record = store.load(identity)
    assert record is not None
    sealed = store.sealing.seal(identity, record.token_id, record.generation, record.keys)
    assert store.sealing.open(identity, record.token_id, record.generation, sealed) == record.keys
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DeskCorrupt):
        store.sealing.open(identity, record.token_id, record.generation, tampered)
    with pytest.raises(DeskCorrupt):  # the same blob, bound to another generation
        store.sealing.open(identity, record.token_id, record.generation + 1, sealed)


def test_a_desk_rekey_of_the_genuine_token_lifts_a_clone_suspension(site: Site) -> None:
    """The remedy the alert names: rekey the token one trusts; its copy is locked out for good."""
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        service = make_service(store)
        original = meter_token(SEED, meter_identity("meter", 6))
        clone = original.clone()
        assert isinstance(run(service, original, [request("gs-1")])[0], Authenticated)
        assert run(service, clone, [request("gs-1")]) == [Refused(Refusal.SUSPENDED, None)]
        with site.open() as desk:
            flags = {n["id"]: n["suspended"] for n in desk.summary(now=NOW)["nodes"]}
            assert flags[original.identity] is True
            desk.rekey(original.identity, original, now=NOW)
            flags = {n["id"]: n["suspended"] for n in desk.summary(now=NOW)["nodes"]}
            assert flags[original.identity] is False
            assert desk.audit_log()[-1]["suspension_lifted"] is True
        events = run(service, original, [request("gs-1")])
        assert isinstance(events[0], Authenticated), events
        assert any(isinstance(e, Granted) for e in events)
        # the copy holds keys two generations old: it fails like a stranger, and raises nothing
        assert not any(isinstance(e, Authenticated) for e in run(service, clone, [request("gs-1")]))
        record = store.load(original.identity)
        assert record is not None and not record.suspended
    finally:
        store.close()


def test_desk_rekey_after_an_as_key_change_that_skipped_a_past_epoch(site: Site) -> None:
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        service = make_service(store)  # keys due at every authentication
        meter = meter_token(SEED, meter_identity("meter", 5))
        run(service, meter, [request("gs-1")])  # an epoch-0 CK: a copy for gs-1 under gen 1
        events = run(service, site.token("gs-1"), [], now=NOW + 86400)  # epoch 1: gs-1 -> gen 2
        assert isinstance(events[0], Authenticated) and events[0].generation == 2
    finally:
        store.close()
    # the remedy docs/authentication-server.md names (clone alert, head-end before an import)
    with site.open() as desk:
        node = desk.rekey("gs-1", site.token("gs-1"), now=NOW + 86400)
        assert node.generation == 3


def test_clone_suspension_remedy_after_a_key_change_in_a_later_epoch(site: Site) -> None:
    """docs 'Clones': desk rekey of the genuine token lifts the suspension. Not once the AS
    changed the node's keys in a later epoch than one of its CKs."""
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        service = make_service(store)
        original = meter_token(SEED, meter_identity("meter", 6))
        run(service, original, [request("gs-1")])  # epoch 0: a CK, the meter's copy at gen 2
        clone = original.clone()
        assert isinstance(run(service, original, [], now=NOW + 86400)[0], Authenticated)  # gen 3
        assert run(service, clone, [], now=NOW + 86400) == [Refused(Refusal.SUSPENDED, None)]
    finally:
        store.close()
    with site.open() as desk:
        try:
            desk.rekey(original.identity, original, now=NOW + 86400)
        except Exception as exc:
            first = exc
        else:
            first = None
        try:  # 'run again after a failure, it resumes'
            desk.rekey(original.identity, original, now=NOW + 86400)
            second = None
        except Exception as exc:
            second = exc
        suspended = {n["id"]: n["suspended"] for n in desk.summary(now=NOW + 86400)["nodes"]}
    assert (first, second) == (None, None), (first, second, original.info().generation(0))
    assert not suspended[original.identity]


def test_clone_suspension_remedy_when_the_copy_took_the_key_change_first(site: Site) -> None:
    """docs 'Clones': 'until the operator rekeys the token they trust at the desk'. The copy
    that authenticates first takes K[g+1]; the genuine token then proves K[g] and sets off
    the alert. Its rekey is what the alert names -- same epoch, so no stale copy is involved."""
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        service = make_service(store)
        genuine = meter_token(SEED, meter_identity("meter", 7))
        copy = genuine.clone()
        assert isinstance(run(service, copy, [])[0], Authenticated)  # the copy changes keys
        assert run(service, genuine, []) == [Refused(Refusal.SUSPENDED, None)]
    finally:
        store.close()
    with site.open() as desk:
        desk.rekey(genuine.identity, genuine, now=NOW)
        suspended = {n["id"]: n["suspended"] for n in desk.summary(now=NOW)["nodes"]}
    assert not suspended[genuine.identity]
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        service = make_service(store)
        assert isinstance(run(service, genuine, [request("gs-1")])[0], Authenticated)
        assert not any(isinstance(e, Authenticated) for e in run(service, copy, []))
        record = store.load(genuine.identity)
        assert record is not None and not record.suspended
    finally:
        store.close()


def test_as_reinstate_lifts_a_clone_suspension_in_either_order(
    site: Site, store: KeyStateStore
) -> None:
    """The AS's own remedy (PostgreSQL, where the desk cannot rekey), whichever copy went first."""
    assert isinstance(store, SqlKeyStateStore)
    service = make_service(store)  # keys due at every authentication
    for n, first_is_copy in ((8, False), (9, True)):
        genuine = meter_token(SEED, meter_identity("meter", n))
        copy = genuine.clone()
        first, second = (copy, genuine) if first_is_copy else (genuine, copy)
        assert isinstance(run(service, first, [])[0], Authenticated)
        assert run(service, second, []) == [Refused(Refusal.SUSPENDED, None)]
        generation = store.reinstate(genuine.identity, genuine, NOW)
        assert genuine.info().generation(Slot.AUTH) == generation
        events = run(service, genuine, [request("gs-1")])
        assert isinstance(events[0], Authenticated), events
        assert any(isinstance(e, Granted) for e in events)
        assert not any(isinstance(e, Authenticated) for e in run(service, copy, []))
        record = store.load(genuine.identity)
        assert record is not None and not record.suspended


def test_as_reinstate_refuses_what_it_must_not_lift_and_resumes_after_a_crash(
    site: Site, store: KeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(store, SqlKeyStateStore)
    service = make_service(store)
    meter = meter_token(SEED, meter_identity("meter", 10))
    with pytest.raises(LocalAuthError, match="not suspended"):
        store.reinstate(meter.identity, meter, NOW)
    with pytest.raises(LocalAuthError, match="belongs to"):
        store.reinstate("meter-0000011", meter, NOW)
    copy = meter.clone()
    run(service, meter, [])
    run(service, copy, [])  # suspended
    real = store.commit_key_change

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the process dies after the token's key change

    monkeypatch.setattr(store, "commit_key_change", crash)
    with pytest.raises(KeyboardInterrupt):
        store.reinstate(meter.identity, meter, NOW)
    monkeypatch.setattr(store, "commit_key_change", real)
    generation = store.reinstate(meter.identity, meter, NOW)  # resumes: token already moved
    assert meter.info().generation(Slot.AUTH) == generation == 3
    assert isinstance(run(service, meter, [])[0], Authenticated)
    store.revoke(meter.identity, NOW)
    store.suspend(meter.identity, 0, NOW)
    with pytest.raises(LocalAuthError, match="revoked"):
        store.reinstate(meter.identity, meter, NOW)
