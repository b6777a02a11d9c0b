"""Rekey: the old bundle and copies die, the new ones work, a crash between phases converges."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

import pytest

from mesh.keyset import KeysetError, decrypt_copy, open_copy, read_copy_header
from mesh.keyset.bundle import Bundle, open_bundle
from mesh.token import Slot, TokenError, UnwrapFailed
from mesh.token.software import SoftwareToken
from provisioning import desk as desk_module
from provisioning.desk import Desk
from provisioning.errors import PolicyError
from tests.provisioning.conftest import Site, snapshot
from tests.token.tokens import oct_jwk


class PowerCut(Exception):
    """Stands for the process dying at that point."""


def _now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class Before:
    """alpha-1 as it was before the rekey."""

    raw: bytes
    bundle: Bundle
    pair_keys: dict[bytes, bytes]


def _before(site: Site) -> Before:
    token = site.unlock("alpha-1")
    raw = site.bundle("alpha-1").read_bytes()
    bundle = open_bundle(raw, token)
    keys = {k.ck_id: open_copy(token, k.own).pair_key for k in bundle.keysets}
    assert len(keys) == 8
    return Before(raw, bundle, keys)


def _assert_rekeyed(site: Site, before: Before, *, generation: int = 2) -> None:
    """alpha-1 at ``generation`` in token and desk; old bundle refused; new one opens the CKs."""
    token = site.unlock("alpha-1")  # from the file, as the node will
    assert [token.info().generation(s) for s in Slot] == [generation] * 4
    with site.open() as desk:
        assert desk.node("alpha-1").generation == generation
        pending = "SELECT pending_keys FROM nodes WHERE identity = 'alpha-1'"
        assert desk._db.execute(pending).fetchone() == (None,)
        new_wrap = desk._keys("alpha-1")[Slot.WRAP]
        fresh = desk.export("alpha-1", site.bundle("alpha-1"), now=_now())
        desk.export("gs-1", site.bundle("gs-1"), now=_now())

    with pytest.raises(KeysetError, match=r"older key generation of alpha-1's token.*rekeyed"):
        open_bundle(before.raw, token)
    for k in before.bundle.keysets:
        with pytest.raises(UnwrapFailed):
            token.unwrap(k.own)
        with pytest.raises(KeysetError):
            decrypt_copy(k.own, oct_jwk(new_wrap))  # not just the kid: the key changed

    assert open_bundle(site.bundle("alpha-1").read_bytes(), token) == fresh
    assert {k.ck_id: open_copy(token, k.own).pair_key for k in fresh.keysets} == before.pair_keys
    gs = site.unlock("gs-1")  # a mate's new bundle carries tickets for alpha-1's new keys
    tickets = open_bundle(site.bundle("gs-1").read_bytes(), gs).keysets_with("alpha-1")
    assert len(tickets) == 4
    for k in tickets:
        assert open_copy(token, k.ticket).pair_key == open_copy(gs, k.own).pair_key


def test_rekey_kills_the_old_bundle_and_copies_and_the_new_ones_work(site: Site) -> None:
    before = _before(site)
    with site.open() as desk:
        record = desk.rekey("alpha-1", site.unlock("alpha-1"), now=_now())
    assert record.generation == 2
    _assert_rekeyed(site, before)


def test_a_second_rekey_moves_on_again(site: Site) -> None:
    before = _before(site)
    with site.open() as desk:
        desk.rekey("alpha-1", site.unlock("alpha-1"), now=_now())
        desk.rekey("alpha-1", site.unlock("alpha-1"), now=_now())
    _assert_rekeyed(site, before, generation=3)


def _fail_rekey_commit_by_audit(desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    real = desk._audit

    def audit(now: int, op: str, **detail: object) -> None:
        if op == "rekey":
            raise PowerCut
        real(now, op, **detail)

    monkeypatch.setattr(desk, "_audit", audit)


def _fail_rekey_commit_midway(desk: Desk, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = desk_module._rewrap, []

    def rewrap(*args: object) -> str:
        calls.append(1)
        if len(calls) == 5:  # some copies already rewritten in this transaction
            raise PowerCut
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(desk_module, "_rewrap", rewrap)


@pytest.mark.parametrize(
    "cut", [_fail_rekey_commit_by_audit, _fail_rekey_commit_midway], ids=["at-commit", "midway"]
)
def test_rekey_converges_after_a_crash_after_the_token_changed(
    site: Site, monkeypatch: pytest.MonkeyPatch, cut: object
) -> None:
    before = _before(site)
    desk = site.open()
    cut(desk, monkeypatch)  # type: ignore[operator]
    with pytest.raises(PowerCut):
        desk.rekey("alpha-1", site.unlock("alpha-1"), now=_now())
    desk.close()
    monkeypatch.undo()

    # the token has its new keys, the store still the old ones plus the pending new ones
    assert SoftwareToken(site.token("alpha-1")).info().generation(Slot.MAC) == 2
    with site.open() as desk:
        assert desk.node("alpha-1").generation == 1
        pending = desk._keys("alpha-1", pending=True)
        rows = desk._db.execute("SELECT copy_a, copy_b FROM keysets").fetchall()
        kids = {read_copy_header(c).kid[-4:] for row in rows for c in row}
        assert kids == {".0.1"}  # nothing rewrapped in the failed transaction was kept
        # a bundle for generation 1 would not open with the token: it was written all the same
        with pytest.raises(PolicyError, match="key change of alpha-1 is unfinished"):
            desk.export("alpha-1", site.root / "early.bundle", now=_now())
        assert not (site.root / "early.bundle").exists()

        desk.rekey("alpha-1", site.unlock("alpha-1"), now=_now())  # run again: resumes
        assert desk._keys("alpha-1") == pending
        ops = [e["op"] for e in desk.audit_log()]
        assert (ops.count("rekey-prepare"), ops.count("rekey")) == (1, 1)
    _assert_rekeyed(site, before)


def test_rekey_converges_after_a_crash_before_the_token_changed(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _before(site)
    token_file = site.token("alpha-1").read_bytes()
    with site.open() as desk:
        token = site.unlock("alpha-1")

        def key_change(message: str) -> None:
            raise PowerCut

        monkeypatch.setattr(token, "key_change", key_change)
        with pytest.raises(PowerCut):
            desk.rekey("alpha-1", token, now=_now())
        assert site.token("alpha-1").read_bytes() == token_file
        pending = desk._keys("alpha-1", pending=True)

    with site.open() as desk:
        desk.rekey("alpha-1", site.unlock("alpha-1"), now=_now())
        assert desk._keys("alpha-1") == pending  # the same new keys, not a third set
    _assert_rekeyed(site, before)


def test_rekey_refuses_another_nodes_token(site: Site) -> None:
    before = snapshot(site.root)
    with site.open() as desk, pytest.raises(PolicyError, match="belongs to alpha-2"):
        desk.rekey("alpha-1", site.unlock("alpha-2"), now=_now())
    assert snapshot(site.root) == before


def test_rekey_refuses_a_token_that_moved_on_without_this_desk(site: Site) -> None:
    """A desk restored from a backup taken before a completed rekey must not guess new keys."""
    backup = site.root.parent / "desk-backup"
    shutil.copytree(site.desk_dir, backup)
    with site.open() as desk:
        desk.rekey("alpha-1", site.unlock("alpha-1"), now=_now())  # token now at generation 2
    shutil.rmtree(site.desk_dir)
    shutil.copytree(backup, site.desk_dir)  # the desk is back at generation 1

    token = site.unlock("alpha-1")
    before = snapshot(site.root)
    with site.open() as desk, pytest.raises(TokenError, match="generation 2, the desk expected 1"):
        desk.rekey("alpha-1", token, now=_now())
    assert snapshot(site.root) == before  # no pending keys recorded, token untouched


def test_a_rekey_overtaken_by_an_import_says_where_its_key_change_stands(site: Site) -> None:
    """'as import-desk' marks the desk between the token's key change and the desk's switch."""
    desk = site.open()
    token = site.unlock("alpha-1")
    key_change = token.key_change

    def and_the_import_begins(message: str) -> None:
        key_change(message)
        with desk.store.transaction(imported=True) as db:
            db.execute("INSERT INTO meta VALUES ('as_importing_into', 'PostgreSQL x:5432/as#r')")

    token.key_change = and_the_import_begins  # type: ignore[method-assign]
    try:
        with pytest.raises(PolicyError, match="the token holds generation 2 already"):
            desk.rekey("alpha-1", token, now=_now())
        assert desk.node("alpha-1").generation == 1  # this file did not switch
    finally:
        desk.close()
