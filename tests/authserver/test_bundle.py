"""A field node's bundle from the AS: after a key change only it opens, not the desk's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jwcrypto.common import base64url_decode

from mesh.agent.keyring import KeyRing
from mesh.agent.store import AgentStore
from mesh.keyset import BundleError, open_copy, read_copy_header
from mesh.keyset.bundle import BundleKeyset, open_bundle
from mesh.keyset.copies import open_discovery_key
from mesh.token import SecureElement, Slot
from provisioning.authserver import protocol
from provisioning.authserver.errors import MessageError, Refusal, RemoteAuthError
from provisioning.authserver.messages import (
    BUNDLE_PART_SIZE,
    BundlePart,
    BundleRequest,
    decode,
    encode,
)
from provisioning.authserver.protocol import (
    Authenticated,
    BundleFetched,
    ClientSession,
    ClientState,
    Refused,
)
from provisioning.authserver.store import KeyStateStore, SqliteKeyStateStore, SqlKeyStateStore
from tests.authserver.conftest import (
    NOW,
    PASSPHRASE,
    Site,
    as_serve,
    cli_env,
    make_service,
    run,
)


def _fetch(service: protocol.AuthService, token: SecureElement, ahead: int = 1) -> list[object]:
    return list(run(service, token, [BundleRequest(b"b" * 16, ahead)]))


def test_after_a_key_change_only_the_as_bundle_opens_and_it_carries_the_next_epoch(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    with site.open() as desk:
        desk_bundle = desk.export("alpha-1", tmp_path / "desk.bundle", now=NOW)
    assert desk_bundle.keysets == ()  # the desk issued no CKs for this mission
    old = (tmp_path / "desk.bundle").read_bytes()
    alpha = site.token("alpha-1")
    events = _fetch(make_service(store), alpha)  # a key change at every link
    assert isinstance(events[0], Authenticated) and events[0].key_changed
    fetched = next(e for e in events if isinstance(e, BundleFetched))
    with pytest.raises(BundleError):
        open_bundle(old, alpha)  # sealed under the MAC key the token just replaced
    bundle = open_bundle(fetched.data, alpha)
    assert bundle.identity == "alpha-1" and [m.identity for m in bundle.mates] == ["gs-1"]
    assert bundle.groups == {"squad": ("alpha-1", "gs-1")}
    epoch_seconds = bundle.mission.epoch_seconds
    epochs = [(k.not_before - bundle.mission.start) // epoch_seconds for k in bundle.keysets]
    assert epochs == [0, 1] and {k.peer for k in bundle.keysets} == {"gs-1"}
    gs = site.token("gs-1")
    for entry in bundle.keysets:  # our copies open with the new keys, the tickets for gs-1
        assert open_copy(alpha, entry.own).ck_id == entry.ck_id
        assert open_copy(gs, entry.ticket).ck_id == entry.ck_id
    assert all(open_discovery_key(alpha, d.wrapped).epoch == d.epoch for d in bundle.discovery)
    # the agent's key ring takes it as it takes a desk bundle
    ring = KeyRing(bundle, alpha, AgentStore(tmp_path / "agent"), now=NOW)
    assert ring.keyset_for("gs-1", NOW) is not None and ring.discovery_key(NOW) is not None
    assert isinstance(store, SqlKeyStateStore)
    (row,) = store.audit_log("as-bundle")
    assert row["node"] == "alpha-1" and row["minted"] == 2 and row["keysets"] == 2
    assert row["generation"] == 2 == alpha.info().generation(Slot.MAC)
    text = json.dumps(store.audit_log(None))
    assert all(k.own not in text and k.ticket not in text for k in bundle.keysets)
    # fetched again: the same CKs, none minted
    again = open_bundle(
        next(
            e
            for e in _fetch(make_service(store, key_lifetime=1e9), alpha)
            if isinstance(e, BundleFetched)
        ).data,
        alpha,
    )
    assert [k.ck_id for k in again.keysets] == [k.ck_id for k in bundle.keysets]


def test_a_bundle_leaves_revoked_mates_out_and_a_suspended_node_gets_none(
    site: Site, store: KeyStateStore
) -> None:
    assert isinstance(store, SqlKeyStateStore)
    store.revoke("alpha-2", NOW)
    service = make_service(store, key_lifetime=1e9)
    gs = site.token("gs-1")
    fetched = next(e for e in _fetch(service, gs, ahead=0) if isinstance(e, BundleFetched))
    bundle = open_bundle(fetched.data, gs)
    mates = {m.identity for m in bundle.mates}
    assert "alpha-2" not in mates and {"alpha-1", "uav-1"} <= mates
    assert "alpha-2" in bundle.revoked
    assert {k.peer for k in bundle.keysets} == mates  # one CK per mate, this epoch only
    store.suspend("uav-1", 0, NOW)
    events = _fetch(service, site.token("uav-1"))
    assert any(isinstance(e, Refused) and e.refusal is Refusal.SUSPENDED for e in events)
    assert not any(isinstance(e, BundleFetched) for e in events)
    # nor does a suspended mate stay in others' bundles, with the CKs issuance now refuses
    later = _fetch(make_service(store, key_lifetime=1e9), gs, ahead=0)
    again = open_bundle(next(e for e in later if isinstance(e, BundleFetched)).data, gs)
    assert "uav-1" not in {m.identity for m in again.mates}
    assert "uav-1" not in {k.peer for k in again.keysets}


def test_a_bundle_that_would_mint_too_many_keysets_is_refused_before_minting_any(
    site: Site, store: KeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each CK is a transaction on the worker's loop: a bundle mints at most MAX_BUNDLE_MINTS."""
    monkeypatch.setattr("provisioning.authserver.store.MAX_BUNDLE_MINTS", 5)
    events = _fetch(make_service(store, key_lifetime=1e9), site.token("gs-1"))  # 23 mates
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY]
    assert isinstance(store, SqlKeyStateStore) and store.audit_log("as-keyset") == []


def test_a_key_change_committed_while_a_bundle_is_built_gets_it_built_again(
    site: Site, store: KeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sealed (MAC) and wrapped for one generation, never for two."""
    assert isinstance(store, SqlKeyStateStore)
    secret = store._discovery_secret
    changed: list[int] = []

    def with_a_key_change_meanwhile() -> bytes:
        if not changed:  # another worker changes alpha-1's keys during the first build
            changed.append(store.prepare_key_change("alpha-1", 1, NOW).generation)
            store.commit_key_change("alpha-1", 2, NOW)
        return secret()

    monkeypatch.setattr(store, "_discovery_secret", with_a_key_change_meanwhile)
    sealed = store.bundle("alpha-1", 1, NOW)
    header = json.loads(base64url_decode(sealed.split(b".")[0].decode()))
    assert header["kid"].endswith(".2")  # the MAC key of generation 2
    bundle_kids = {read_copy_header(k.own).kid for k in _keysets_of(sealed)}
    assert bundle_kids and all(kid.endswith(".2") for kid in bundle_kids)
    (row,) = store.audit_log("as-bundle")
    assert row["generation"] == 2


def _keysets_of(sealed: bytes) -> list[BundleKeyset]:
    payload = json.loads(base64url_decode(sealed.split(b".")[1].decode()))
    return [
        BundleKeyset(b"", k["peer"], k["nbf"], k["exp"], own=k["own"], ticket=k["ticket"])
        for k in payload["keysets"]
    ]


def test_a_bundle_comes_in_parts_and_one_too_large_for_a_link_is_refused(
    site: Site, store: KeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "BUNDLE_PART_SIZE", 512)
    service = make_service(store, key_lifetime=1e9, identity_burst=100)
    gs = site.token("gs-1")
    fetched = next(e for e in _fetch(service, gs) if isinstance(e, BundleFetched))
    assert len(fetched.data) > 20 * 512  # many parts, put back together
    assert open_bundle(fetched.data, gs).identity == "gs-1"
    monkeypatch.setattr("provisioning.authserver.store.MAX_LINK_BUNDLE", 1000)
    events = _fetch(service, gs)
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY]


def test_a_bundle_weighs_a_burst_of_keysets_against_the_identity_rate(
    site: Site, store: KeyStateStore
) -> None:
    """A bundle costs the AS what ten keysets do or more: it spends BUNDLE_COST of the budget."""
    service = make_service(store, key_lifetime=1e9)  # 1 keyset/s, bursts of 10
    gs = site.token("gs-1")
    assert any(isinstance(e, BundleFetched) for e in _fetch(service, gs))
    again = _fetch(service, gs)
    (refused,) = [e for e in again if isinstance(e, Refused)]
    assert refused.refusal is Refusal.RATE_LIMITED and refused.retry_after is not None
    assert 9 <= refused.retry_after <= 10  # the budget refills at 1/s
    later = run(service, gs, [BundleRequest(b"c" * 16)], now=NOW + 10)
    assert any(isinstance(e, BundleFetched) for e in later)


def _requesting(site: Site) -> ClientSession:
    client = ClientSession(site.token("gs-1"), [BundleRequest(b"b" * 16)])
    client.state = ClientState.REQUESTING  # as after READY
    return client


@pytest.mark.parametrize(
    "parts",
    [
        [BundlePart(b"b" * 16, 1, 2, b"x")],  # not from the first part
        [BundlePart(b"b" * 16, 0, 2, b"x"), BundlePart(b"b" * 16, 0, 2, b"x")],  # repeated
        [BundlePart(b"b" * 16, 0, 3, b"x"), BundlePart(b"b" * 16, 1, 2, b"x")],  # count moved
        [BundlePart(b"c" * 16, 0, 1, b"x")],  # not asked for
    ],
)
def test_bundle_parts_out_of_order_or_not_asked_for_fail_the_link(
    site: Site, parts: list[BundlePart]
) -> None:
    client = _requesting(site)
    with pytest.raises(MessageError):
        for part in parts:
            client._on_message(part, NOW)


@pytest.mark.parametrize(
    "body",
    [
        {"t": 11, "rid": b"b" * 16, "i": 0, "n": 0, "d": b"x"},
        {"t": 11, "rid": b"b" * 16, "i": 0, "n": 1025, "d": b"x"},
        {"t": 11, "rid": b"b" * 16, "i": 2, "n": 2, "d": b"x"},
        {"t": 11, "rid": b"b" * 16, "i": 0, "n": 1, "d": b""},
        {"t": 11, "rid": b"b" * 16, "i": 0, "n": 1, "d": b"x" * (BUNDLE_PART_SIZE + 1)},
        {"t": 10, "rid": b"b" * 16, "ah": 5},
        {"t": 10, "rid": b"b" * 16, "ah": -1},
        {"t": 10, "rid": b"b" * 15, "ah": 1},
    ],
)
def test_bundle_messages_are_bounded(body: dict[str, object]) -> None:
    import cbor2

    with pytest.raises(MessageError):
        decode(cbor2.dumps(body))


def test_bundle_messages_round_trip() -> None:
    for message in (BundleRequest(b"b" * 16, 4), BundlePart(b"b" * 16, 1, 2, b"x" * 7168)):
        assert decode(encode(message)) == message


def test_as_bundle_command_writes_a_bundle_the_token_opens(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "alpha-1.bundle"
    cli = [sys.executable, "-m", "mesh.cli", "as"]
    token = str(site.root / "alpha-1.token")
    with as_serve("--store", str(site.desk_dir), "--key-lifetime", "0") as server:
        args = ["bundle", "--as", server.address, "--token", token, "--out", str(out)]
        done = subprocess.run(
            [*cli, *args, "--json"], env=cli_env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["key_changed"] and report["generation"] == 2 and report["epochs"] == [0, 1]
        for bad in (["--ahead", "5"], ["--out", str(tmp_path / "no" / "such" / "dir" / "b")]):
            refused = subprocess.run(
                [*cli, *args, *bad], env=cli_env(), capture_output=True, text=True, timeout=60
            )
            assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert server.returncode == 0, server.err
    bundle = open_bundle(out.read_bytes(), site.token("alpha-1"))
    assert bundle.identity == "alpha-1" and len(bundle.keysets) >= 2
    assert time.time() < bundle.keysets[-1].not_after


def test_a_bundle_request_reads_the_sqlite_store_by_index_only(site: Site) -> None:
    """Asked over the network, in a store of a million meters: no statement may scan a table."""
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        statements: list[str] = []
        store.store.db.set_trace_callback(statements.append)
        store.bundle("gs-1", 1, NOW)
        store.store.db.set_trace_callback(None)
        scans = []
        for sql in statements:
            if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            for row in store.store.db.execute("EXPLAIN QUERY PLAN " + sql):
                detail = row[-1]
                if re.match(r"SCAN (nodes|pairs|groups|keysets|audit)\b", detail):
                    scans.append((detail, sql[:80]))
        assert statements and not scans, scans
    finally:
        store.close()


def test_before_the_mission_a_bundle_carries_its_first_epochs(
    site: Site, store: KeyStateStore
) -> None:
    """The preparatory phase is when field nodes fetch their bundles: epoch 0 counts as current."""
    assert isinstance(store, SqlKeyStateStore)
    early = store.mission.start - 3600
    bundle = open_bundle(store.bundle("alpha-1", 1, early), site.token("alpha-1"))
    start, length = bundle.mission.start, bundle.mission.epoch_seconds
    assert sorted((k.not_before - start) // length for k in bundle.keysets) == [0, 1]


def test_a_node_with_more_mates_than_a_bundle_lists_is_refused_before_minting(
    site: Site, store: KeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too many mates (a head-end's million) is refused from a bounded count, nothing minted."""
    monkeypatch.setattr("provisioning.authserver.store.MAX_MATES", 2)  # gs-1 has 23
    events = _fetch(make_service(store, key_lifetime=1e9), site.token("gs-1"))
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY]
    assert isinstance(store, SqlKeyStateStore) and store.audit_log("as-keyset") == []


def test_before_the_mission_a_keyset_request_gets_the_first_epoch(
    site: Site, store: KeyStateStore
) -> None:
    """The preparatory phase: with no epoch given, the mission's first one is issued."""
    early = store.mission.start - 3600
    issued = store.issue("alpha-1", "gs-1", "prep", None, early)
    assert issued.epoch == 0 and issued.not_before == store.mission.start
    assert store.issue("alpha-1", "gs-1", "prep", 4, early).epoch == 4
    with pytest.raises(RemoteAuthError):
        store.issue("alpha-1", "gs-1", "prep", 5, early)
    with pytest.raises(RemoteAuthError):  # once the mission is over, nothing
        store.issue("alpha-1", "gs-1", "late", None, store.mission.end)
