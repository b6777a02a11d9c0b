"""A field node's bundle from the AS: after a key change only it opens, not the desk's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.agent.keyring import KeyRing
from mesh.agent.store import AgentStore
from mesh.keyset import BundleError, open_copy
from mesh.keyset.bundle import open_bundle
from mesh.keyset.copies import open_discovery_key
from mesh.token import SecureElement, Slot
from provisioning.authserver import protocol
from provisioning.authserver.errors import MessageError, Refusal
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
from provisioning.authserver.store import KeyStateStore, SqlKeyStateStore
from tests.authserver.conftest import NOW, Site, as_serve, cli_env, make_service, run


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


def test_a_bundle_comes_in_parts_and_one_too_large_for_a_link_is_refused(
    site: Site, store: KeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "BUNDLE_PART_SIZE", 512)
    service = make_service(store, key_lifetime=1e9)
    gs = site.token("gs-1")
    fetched = next(e for e in _fetch(service, gs) if isinstance(e, BundleFetched))
    assert len(fetched.data) > 20 * 512  # many parts, put back together
    assert open_bundle(fetched.data, gs).identity == "gs-1"
    monkeypatch.setattr("provisioning.authserver.store.MAX_LINK_BUNDLE", 1000)
    events = _fetch(service, gs)
    assert [e.refusal for e in events if isinstance(e, Refused)] == [Refusal.POLICY]


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
