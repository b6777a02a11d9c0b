"""The desk: what it issues opens with plain JOSE, who gets what, and what it never writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jwcrypto import jwe, jws
from jwcrypto.common import base64url_decode

from mesh.errors import sqlite_reason
from mesh.keyset import open_copy, read_copy_header
from mesh.keyset.bundle import open_bundle
from mesh.token import Slot, slot_kid
from mesh.token.software import SoftwareToken
from provisioning.desk import Desk
from provisioning.errors import (
    DuplicateNode,
    MissionError,
    PolicyError,
    UnknownNode,
    WrongPassphrase,
)
from provisioning.plan import parse_plan
from tests.provisioning.conftest import (
    EPOCHS,
    HOUR,
    NODES,
    PASSPHRASE,
    PIN,
    SQUAD,
    Site,
    assert_no_key_in,
    desk_secrets,
    snapshot,
)
from tests.token.tokens import oct_jwk


def _now() -> int:
    return int(time.time())


def _rows(desk: Desk) -> list[tuple[object, ...]]:
    return desk._db.execute("SELECT * FROM keysets ORDER BY ck_id").fetchall()


# -- acceptance 1: plain jwcrypto, given the slot key -----------------------------------------


def test_plain_jwcrypto_decrypts_every_issued_copy_with_the_wrap_slot_key(site: Site) -> None:
    with site.open() as desk:
        wrap = {n: desk._keys(n)[Slot.WRAP] for n in NODES}
        token_ids = {n.identity: n.token_id for n in desk.nodes()}
        rows = _rows(desk)
    assert len(rows) == 4 * EPOCHS  # squad (3 pairs) + gs-1/uav-1, 4 epochs each
    for ck_id, a, b, _epoch, nbf, exp, copy_a, copy_b in rows:
        keys = []
        for holder, copy in ((str(a), copy_a), (str(b), copy_b)):
            message = jwe.JWE()
            message.deserialize(copy, key=oct_jwk(wrap[holder]))
            header = json.loads(message.objects["protected"])
            assert header["kid"] == slot_kid(token_ids[holder], Slot.WRAP, 1)
            assert (header["for"], header["a"], header["b"]) == (holder, a, b)
            assert (header["nbf"], header["exp"]) == (nbf, exp)
            assert base64url_decode(header["ck"]) == ck_id
            keys.append(message.payload)
        assert keys[0] == keys[1] and len(keys[0]) == 32
    assert len({row[0] for row in rows}) == len(rows)


def test_plain_jwcrypto_verifies_every_bundle_with_the_mac_slot_key(site: Site) -> None:
    with site.open() as desk:
        mac = {n: desk._keys(n)[Slot.MAC] for n in NODES}
    for node in NODES:
        raw = site.bundle(node).read_text()
        checked = jws.JWS()
        checked.deserialize(raw)
        checked.verify(oct_jwk(mac[node]))
        assert json.loads(checked.payload)["node"]["id"] == node
        other = "gs-1" if node != "gs-1" else "uav-1"
        with pytest.raises(jws.InvalidJWSSignature):
            jws.JWS().deserialize(raw, key=oct_jwk(mac[other]))


# -- who gets what ---------------------------------------------------------------------------


def test_a_bundle_lists_only_the_nodes_own_mates(site: Site) -> None:
    alpha, gs = site.unlock("alpha-1"), site.unlock("gs-1")
    bundle = open_bundle(site.bundle("alpha-1").read_bytes(), alpha)
    assert [(m.identity, m.role) for m in bundle.mates] == [
        ("alpha-2", "soldier"),
        ("gs-1", "ground-station"),
    ]
    assert dict(bundle.groups) == {"squad": SQUAD}
    assert {k.peer for k in bundle.keysets} == {"alpha-2", "gs-1"}
    assert len(bundle.keysets_with("gs-1")) == len(bundle.keysets_with("alpha-2")) == EPOCHS
    payload = base64url_decode(site.bundle("alpha-1").read_text().split(".")[1])
    assert b"alpha-2" in payload and b"uav-1" not in payload  # not even named
    # own copy opens with our token; the ticket opens with the peer's, to the same key
    for k in bundle.keysets_with("gs-1"):
        assert open_copy(alpha, k.own).pair_key == open_copy(gs, k.ticket).pair_key
        assert read_copy_header(k.own).ck_id == k.ck_id

    uav = open_bundle(site.bundle("uav-1").read_bytes(), site.unlock("uav-1"))
    assert [m.identity for m in uav.mates] == ["gs-1"] and dict(uav.groups) == {}
    assert {k.peer for k in uav.keysets} == {"gs-1"} and len(uav.keysets) == EPOCHS


def test_issue_is_idempotent(site: Site) -> None:
    with site.open() as desk:
        before = _rows(desk)
        report = desk.issue(now=_now())
        assert (report.issued, report.skipped_existing) == (0, len(before))
        assert (report.pairs, report.epochs) == (4, EPOCHS)
        assert _rows(desk) == before


def test_issue_covers_new_pairs_only_for_epochs_not_over(site: Site) -> None:
    later = _now() + 7 * HOUR  # the first 6 h epoch is over
    with site.open() as desk:
        desk.pair("alpha-1", "uav-1", now=later)
        report = desk.issue(now=later)
        assert report.issued == EPOCHS - 1
        epochs = desk._db.execute(
            "SELECT epoch FROM keysets WHERE a = 'alpha-1' AND b = 'uav-1' ORDER BY epoch"
        ).fetchall()
    assert [e for (e,) in epochs] == list(range(1, EPOCHS))


@pytest.mark.parametrize("change", ["rekey", "revoke"])
def test_issue_sees_a_rekey_or_revocation_that_commits_while_it_starts(
    site: Site, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another desk command that commits just before issue takes the write lock is seen: no CK
    wrapped for uav-1's keys before a rekey (its token could never open it, and no later rekey
    rewraps it), none for uav-1 once revoked."""
    now = _now()
    with site.open() as desk, site.open() as other:
        desk.pair("alpha-1", "uav-1", now=now)
        begin = desk.store.transaction

        @contextlib.contextmanager
        def racing(**kwargs: bool) -> Iterator[sqlite3.Connection]:
            if change == "rekey":
                other.rekey("uav-1", site.unlock("uav-1"), now=now)
            else:
                other.revoke("uav-1", now=now)
            with begin(**kwargs) as db:
                yield db

        monkeypatch.setattr(desk.store, "transaction", racing)
        report = desk.issue(now=now)
        monkeypatch.undo()
        new_kid = slot_kid(desk.node("uav-1").token_id, Slot.WRAP, desk.node("uav-1").generation)
        copies = desk._db.execute(
            "SELECT copy_b FROM keysets WHERE a = 'alpha-1' AND b = 'uav-1'"
        ).fetchall()
    if change == "revoke":
        assert (report.issued, copies) == (0, [])
    else:
        assert report.issued == EPOCHS
        assert {read_copy_header(c).kid for (c,) in copies} == {new_kid}
        token = site.unlock("uav-1")
        for (copy,) in copies:
            open_copy(token, copy)


def test_two_revokes_of_one_node_at_once_revoke_it_once(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "already revoked" check ran before the write lock: both revokes passed it, the
    second moved revoked_at and the audit log said it was revoked twice."""
    now = _now()
    with site.open() as desk, site.open() as other:
        begin = desk.store.transaction

        @contextlib.contextmanager
        def racing(**kwargs: bool) -> Iterator[sqlite3.Connection]:
            other.revoke("alpha-2", now=now)
            with begin(**kwargs) as db:
                yield db

        monkeypatch.setattr(desk.store, "transaction", racing)
        with pytest.raises(PolicyError, match="already revoked"):
            desk.revoke("alpha-2", now=now + 5)
        monkeypatch.undo()
        revokes = [e for e in desk.audit_log() if e["op"] == "revoke"]
        assert len(revokes) == 1
        assert desk._db.execute(
            "SELECT revoked_at FROM nodes WHERE identity = 'alpha-2'"
        ).fetchone() == (now,)


def test_a_revoked_node_gets_no_more_keysets_and_is_named_to_the_others(site: Site) -> None:
    now = _now()
    with site.open() as desk:
        desk.revoke("alpha-2", now=now)
        desk.apply(parse_plan({"node": [{"id": "alpha-3", "role": "soldier"}]}), now=now)
        desk.group("squad", ["alpha-3"], now=now)  # alpha-2 is still listed in squad
        report = desk.issue(now=now)
        assert report.issued == 2 * EPOCHS  # alpha-3 with alpha-1 and gs-1, not alpha-2
        assert desk._db.execute(
            "SELECT COUNT(*) FROM keysets WHERE 'alpha-3' IN (a, b) AND 'alpha-2' IN (a, b)"
        ).fetchone() == (0,)
        bundle = desk.export("alpha-1", site.bundle("alpha-1"), now=now)
        with pytest.raises(PolicyError, match="alpha-2 is revoked"):
            desk.export("alpha-2", site.root / "alpha-2.new", now=now)
        for refused in (
            lambda: desk.pair("alpha-2", "uav-1", now=now),
            lambda: desk.group("other", ["alpha-2", "gs-1"], now=now),
            lambda: desk.revoke("alpha-2", now=now),
        ):
            with pytest.raises(PolicyError):
                refused()
    assert {m.identity for m in bundle.mates} == {"alpha-3", "gs-1"}
    assert {k.peer for k in bundle.keysets} == {"alpha-3", "gs-1"}
    assert bundle.revoked == frozenset({"alpha-2"})
    assert dict(bundle.groups) == {"squad": ("alpha-1", "alpha-3", "gs-1")}
    opened = open_bundle(site.bundle("alpha-1").read_bytes(), site.unlock("alpha-1"))
    assert opened.revoked == frozenset({"alpha-2"})
    assert not (site.root / "alpha-2.new").exists()


# -- mission files ---------------------------------------------------------------------------

PLAN = {
    "node": [
        {"id": "bravo-1", "role": "soldier"},
        {"id": "bravo-2", "role": "soldier"},
        {"id": "drone-7", "role": "uav"},
    ],
    "groups": {"bravo": ["bravo-1", "bravo-2", "gs-1"]},
    "pairs": [["drone-7", "bravo-1"]],
}


def test_apply_enrols_the_plan_and_writes_a_token_per_new_node(site: Site) -> None:
    tokens = site.root / "new-tokens"
    with site.open() as desk:
        created = desk.apply(parse_plan(PLAN), now=_now(), tokens_dir=str(tokens), pin=PIN)
        assert created == ["bravo-1", "bravo-2", "drone-7"]
        assert set(desk.mates_of("bravo-1")) == {"bravo-2", "gs-1", "drone-7"}
        assert desk.mates_of("drone-7") == ["bravo-1"]
        records = {n.identity: n for n in desk.nodes()}
        assert desk.apply(parse_plan(PLAN), now=_now()) == []  # applying again adds nothing
    assert sorted(p.name for p in tokens.iterdir()) == [f"{n}.token" for n in created]
    for node in created:
        info = SoftwareToken(tokens / f"{node}.token").info()
        assert (info.identity, info.token_id) == (node, records[node].token_id)
        assert records[node].personalised
    SoftwareToken(tokens / "drone-7.token").verify_pin(PIN)


@pytest.mark.parametrize(
    ("plan", "error", "reason"),
    [
        ({**PLAN, "groups": {"bravo": ["bravo-1", "ghost"]}}, UnknownNode, "ghost"),
        ({**PLAN, "pairs": [["bravo-1", "bravo-1"]]}, PolicyError, "own dialogue mate"),
        ({**PLAN, "node": [*PLAN["node"], {"id": "gs-1", "role": "uav"}]}, DuplicateNode,
         "already enrolled as ground-station"),
    ],
    ids=["unknown-member", "self-pair", "role-change"],
)  # fmt: skip
def test_a_plan_that_fails_late_leaves_the_desk_and_the_token_folder_as_they_were(
    site: Site, plan: dict[str, object], error: type[Exception], reason: str
) -> None:
    """The nodes are enrolled and their tokens written before the groups fail: all undone."""
    tokens = site.root / "tokens"
    tokens.mkdir()
    before = snapshot(site.root)
    with site.open() as desk, pytest.raises(error, match=reason):
        desk.apply(parse_plan(plan), now=_now(), tokens_dir=str(tokens), pin=PIN)
    assert snapshot(site.root) == before
    with site.open() as desk:
        assert [n.identity for n in desk.nodes()] == sorted(NODES)


def test_two_personalisations_of_one_node_at_once_make_one_token_not_a_clone(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 'already has a token' check is made under the write lock: a second 'desk
    personalise' of the node that commits meanwhile is refused, not copied."""
    with site.open() as desk:
        desk.apply(parse_plan({"node": [{"id": "bravo-1", "role": "soldier"}]}), now=_now())
    with site.open() as desk, site.open() as other:
        begin = desk.store.transaction

        @contextlib.contextmanager
        def racing(**kwargs: bool) -> Iterator[sqlite3.Connection]:
            other.personalise("bravo-1", token_path=site.root / "first.token", pin=PIN, now=_now())
            with begin(**kwargs) as db:
                yield db

        monkeypatch.setattr(desk.store, "transaction", racing)
        with pytest.raises(PolicyError, match="already has a token"):
            desk.personalise("bravo-1", token_path=site.root / "clone.token", pin=PIN, now=_now())
    assert (site.root / "first.token").exists()
    assert not (site.root / "clone.token").exists()


KILLED_WHILE_PERSONALISING = """
import os, signal, sys
from provisioning.desk import Desk
from provisioning.plan import parse_plan
desk_dir, tokens, command, pin = sys.argv[1:]
desk = Desk.open(desk_dir, passphrase=os.environ["PASSPHRASE"])
real_audit = desk._audit
def audit(now, op, **detail):
    if op == "personalise" and detail["node"] == "bravo-2":  # its file written, not committed
        os.kill(os.getpid(), signal.SIGKILL)
    real_audit(now, op, **detail)
desk._audit = audit
nodes = [{"id": "bravo-1", "role": "soldier"}, {"id": "bravo-2", "role": "uav"}]
plan = parse_plan({"node": nodes})
if command == "apply":
    desk.apply(plan, now=1, tokens_dir=tokens, pin=pin)
elif command == "enrol":
    desk.enrol("bravo-2", "uav", token_path=os.path.join(tokens, "bravo-2.token"), pin=pin, now=1)
else:
    desk.personalise("bravo-2", token_path=os.path.join(tokens, "bravo-2.token"), pin=pin, now=1)
"""


@pytest.mark.parametrize("command", ["apply", "enrol", "personalise"])
def test_a_desk_killed_while_it_writes_tokens_finishes_the_job_when_run_again(
    site: Site, command: str
) -> None:
    """Killed (-9) after a token file was written but before its transaction committed, the desk
    leaves a file whose keys it never kept; run again, the same command replaces it."""
    tokens = site.root / "tokens"
    tokens.mkdir()
    plan = parse_plan(
        {"node": [{"id": "bravo-1", "role": "soldier"}, {"id": "bravo-2", "role": "uav"}]}
    )
    if command == "personalise":
        with site.open() as desk:
            desk.apply(plan, now=_now())
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_PERSONALISING, site.desk_dir, tokens, command, PIN],
        env={**os.environ, "PASSPHRASE": PASSPHRASE},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert (tokens / "bravo-2.token").exists()  # left behind, its keys rolled back
    with site.open() as desk:
        if command == "apply":
            desk.apply(plan, now=_now(), tokens_dir=str(tokens), pin=PIN)
        elif command == "enrol":
            desk.enrol("bravo-2", "uav", token_path=tokens / "bravo-2.token", pin=PIN, now=_now())
        else:
            desk.personalise("bravo-2", token_path=tokens / "bravo-2.token", pin=PIN, now=_now())
        records = {n.identity: n for n in desk.nodes()}
    assert (tokens / "bravo-2.token").exists()
    for path in tokens.iterdir():
        info = SoftwareToken(path).info()
        assert info.token_id == records[info.identity].token_id
        assert records[info.identity].personalised
    assert sorted(p.name for p in site.desk_dir.iterdir() if "in-flight" in p.name) == []


def test_enrol_undoes_the_token_file_when_the_store_transaction_fails(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(site.root)
    with site.open() as desk:
        real_audit = desk._audit

        def audit(now: int, op: str, **detail: object) -> None:
            if op == "personalise":
                raise OSError("disk full")
            real_audit(now, op, **detail)

        monkeypatch.setattr(desk, "_audit", audit)
        with pytest.raises(OSError, match="disk full"):
            desk.enrol("bravo-1", "soldier", token_path=site.root / "b.token", pin=PIN, now=_now())
        with pytest.raises(UnknownNode):
            desk.node("bravo-1")
    assert snapshot(site.root) == before


def test_desk_init_checks_the_window_before_writing_anything(tmp_path: Path) -> None:
    now = _now()
    for start, end, epoch, reason in [
        (now - 2 * HOUR, now - HOUR, HOUR, "ends in the past"),
        (now, now + HOUR, 30, "at least 60 s"),
        (now, now + 20_000 * 60, 60, "more than 10000 epochs"),
    ]:
        with pytest.raises(MissionError, match=reason):
            Desk.init(
                tmp_path / "desk",
                passphrase=PASSPHRASE,
                name="x",
                start=start,
                end=end,
                epoch_seconds=epoch,
                now=now,
            )
    assert list(tmp_path.iterdir()) == []


def test_a_desk_made_in_a_folder_others_may_read_is_still_private(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # (whatever the umask)
    now = _now()
    with Desk.init(
        folder,
        passphrase=PASSPHRASE,
        name="x",
        start=now,
        end=now + HOUR,
        epoch_seconds=HOUR,
        now=now,
    ) as desk:
        desk.audit_log()  # the WAL and its index exist now, and take the database's mode
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes.get("desk.sqlite") == 0o600
    assert set(modes.values()) == {0o600}, modes  # was 0o644: sealed keys for everyone to try


def test_the_desk_refuses_a_wrong_passphrase(site: Site) -> None:
    before = snapshot(site.root)
    with pytest.raises(WrongPassphrase):
        Desk.open(site.desk_dir, passphrase=PASSPHRASE + "!")
    assert snapshot(site.root) == before


# -- the audit log, and secrets where they must never be -------------------------------------


def test_the_audit_log_cannot_be_updated_or_deleted(site: Site) -> None:
    path = site.desk_dir / "desk.sqlite"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        before = db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        assert len(before) == 1 + 2 * len(NODES) + 2 + 1 + len(NODES)  # init..export
        for statement in (
            "UPDATE audit SET op = 'nothing'",
            "UPDATE audit SET detail = '{}' WHERE seq = 1",
            "DELETE FROM audit",
            "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)",
        ):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
        assert db.execute("SELECT * FROM audit ORDER BY seq").fetchall() == before
        db.execute("INSERT INTO audit (at, op, detail) VALUES (0, 'note', '{}')")  # appending is
    with site.open() as desk:
        assert desk.audit_log()[-1]["op"] == "note"


def test_no_key_in_the_audit_log_the_bundles_or_the_store(site: Site) -> None:
    now = _now()
    with site.open() as desk:
        old = desk_secrets(desk)
        desk.rekey("alpha-1", site.unlock("alpha-1"), now=now)
        desk.export("alpha-1", site.bundle("alpha-1"), now=now)
        secrets = old + desk_secrets(desk)
        audit = [json.dumps(entry).encode() for entry in desk.audit_log()]
    # 4 slot keys per node, alpha-1's 4 new ones, 16 pair keys, discovery keys and secret
    assert len(set(secrets)) == 4 * len(NODES) + 4 + 4 * EPOCHS + EPOCHS + 1
    bundles = [site.bundle(n).read_bytes() for n in NODES]
    payloads = [base64url_decode(raw.split(b".")[1].decode()) for raw in bundles]
    store = (site.desk_dir / "desk.sqlite").read_bytes()
    assert_no_key_in([*audit, *bundles, *payloads, store], secrets)


def test_a_full_disk_in_a_transaction_is_told_as_a_full_disk(site: Site) -> None:
    """Not as "cannot rollback - no transaction is active", which SQLite's own rollback caused."""
    with Desk.open(site.desk_dir, passphrase=PASSPHRASE) as desk:
        db = desk.store.db
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here on
        with pytest.raises(sqlite3.OperationalError) as caught, desk.store.transaction():
            for i in range(1000):
                db.execute("INSERT INTO meta VALUES (?, ?)", (f"filler-{i}", bytes(4000)))
        assert sqlite_reason(caught.value) == "the disk is full"
        assert not db.in_transaction
        db.execute(f"PRAGMA max_page_count = {2**30}")
        with desk.store.transaction():
            pass


def test_sqlite_errors_about_the_stores_place_are_named(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    sqlite3.connect(path).close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as caught:
        ro.execute("CREATE TABLE t (a)")
    assert sqlite_reason(caught.value) == "it is read-only here"
    with pytest.raises(sqlite3.OperationalError) as caught:
        sqlite3.connect(f"file:{tmp_path / 'no' / 'such.sqlite'}?mode=rw", uri=True)
    assert sqlite_reason(caught.value) is not None and "cannot open" in sqlite_reason(caught.value)
    assert sqlite_reason(sqlite3.DatabaseError("file is not a database")) is None
