"""PostgreSQL specifics: the import, the row lock across workers, ``as serve --postgres``.

The flow tests run on PostgreSQL too (the ``store`` fixture); these test what
only a shared database can get wrong: two workers changing one token's keys at
once must never leave two different "next" generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from mesh.keyset.copies import read_wrapped_kid
from mesh.token import Slot, slot_kid
from provisioning.authserver import desk_import
from provisioning.authserver.client import Backoff, request_keysets
from provisioning.authserver.desk_import import abandon_import, import_desk
from provisioning.authserver.errors import (
    AuthRefused,
    LocalAuthError,
    Refusal,
    RemoteAuthError,
    StoreUnavailable,
)
from provisioning.authserver.meters import (
    MemoryToken,
    factory_keys,
    import_meters,
    meter_identity,
    meter_token,
)
from provisioning.authserver.postgres import PostgresKeyStateStore
from provisioning.authserver.protocol import Authenticated, Granted
from provisioning.authserver.store import SqliteKeyStateStore
from provisioning.errors import PolicyError, WrongPassphrase
from provisioning.store import IMPORTED_META, IMPORTING_META, Store
from tests.authserver.conftest import (
    NOW,
    PASSPHRASE,
    SEED,
    Site,
    as_serve,
    cli_env,
    in_threads,
    make_service,
    request,
    run,
)
from tests.authserver.pgserver import SUPERUSER, PostgresServer

T = TypeVar("T")
WORKERS = 2
CALLERS = 16


def _race(
    stores: list[PostgresKeyStateStore], call: Callable[[PostgresKeyStateStore], T]
) -> list[T]:
    """Run ``call`` CALLERS times at once, spread over the workers' stores (one thread each)."""
    barrier = threading.Barrier(CALLERS)
    locks = [threading.Lock() for _ in stores]  # a worker's connection serves one call at a time

    def one(i: int) -> T:
        barrier.wait()
        with locks[i % len(stores)]:
            return call(stores[i % len(stores)])

    return in_threads(CALLERS, one)


def test_two_workers_racing_one_token_never_fork_its_generations(postgres_dsn: str) -> None:
    # one connection per worker plus a second pair: four connections race on one row
    stores = [PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE) for _ in range(2 * WORKERS)]
    try:
        meter = meter_identity("meter", 1)
        prepared = _race(stores, lambda s: s.prepare_key_change(meter, 1, NOW))
        assert len({p.pending for p in prepared}) == 1  # one pending generation 2, not several
        _race(stores, lambda s: s.commit_key_change(meter, 2, NOW + 1))
        record = stores[0].load(meter)
        assert record is not None and record.generation == 2 and record.keys == prepared[0].pending
        assert record.previous == prepared[0].keys
        changes = stores[0].audit_log("as-key-change")
        assert [(c["generation"], c["outcome"]) for c in changes] == [
            (2, "sent"),
            (2, "committed"),
        ]
        # the same pair's keyset asked from both sides at once: one CK
        issued = _race(
            stores,
            lambda s: s.issue(
                *(("gs-1", "alpha-1") if id(s) % 2 else ("alpha-1", "gs-1")), "test", None, NOW
            ),
        )
        assert len({k.ck_id for k in issued}) == 1
    finally:
        for s in stores:
            s.close()


def test_import_refuses_a_second_import_and_a_wrong_passphrase(
    site: Site, postgres_dsn: str
) -> None:
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(LocalAuthError, match="already holds this desk's mission"),
    ):
        import_desk(desk_store, postgres_dsn, now=NOW, source="again")
    with pytest.raises(WrongPassphrase):
        PostgresKeyStateStore.open(postgres_dsn, "not the passphrase")
    store = PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE)
    try:
        # sealed keys were copied as sealed: they open with the desk's key, bound to their row
        assert store.load("alpha-1") is not None and store.load("nobody") is None
        assert [e["op"] for e in store.audit_log()][:1] == ["init"]
        with pytest.raises(RemoteAuthError):
            store.revoke("nobody", NOW)
        # the audit log is append-only in PostgreSQL too
        with pytest.raises(psycopg.errors.RaiseException), psycopg.connect(postgres_dsn) as conn:
            conn.execute("DELETE FROM audit")
    finally:
        store.close()


def test_cli_import_then_two_workers_serve_one_token_racing(
    site: Site, postgres: PostgresServer, tmp_path: Path
) -> None:
    cli = [sys.executable, "-m", "mesh.cli", "as"]
    dsn = postgres.create_database("as_cli")
    done = subprocess.run(
        [*cli, "import-desk", str(site.desk_dir), "--postgres", dsn, "--json"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["nodes"] == 24
    both = subprocess.run(
        [*cli, "serve", "--store", str(site.desk_dir), "--postgres", dsn],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert both.returncode == 1 and "not both" in both.stderr
    with as_serve(
        "--postgres",
        dsn,
        "--workers",
        str(WORKERS),
        "--key-lifetime",
        "0",
        "--identity-rate",
        "100",
        "--json",
    ) as server:
        host, port = server.address.rsplit(":", 1)
        # copies of one meter's token all racing through both workers: key change at every link
        tokens = [meter_token(SEED, meter_identity("meter", 9)) for _ in range(CALLERS)]

        async def one(token: MemoryToken) -> Authenticated | None:
            try:
                outcome = await request_keysets(
                    host,
                    int(port),
                    token,
                    [request("gs-1")],
                    backoff=Backoff(attempts=4, base=0.05),
                )
            except AuthRefused:  # a copy still at generation 1 after the commit: a "clone"
                return None
            return outcome.authenticated

        async def race() -> list[Authenticated | None]:
            return list(await asyncio.gather(*(one(t) for t in tokens)))

        authenticated = asyncio.run(race())
    assert server.returncode == 0, server.err
    won = [t for t, a in zip(tokens, authenticated, strict=True) if a is not None]
    assert won
    # a copy whose keyset request was rate-limited comes back on a new link and, with a key
    # change at every link, may take the token one generation further: legitimate. What must
    # never happen is a fork: two key sets for one generation
    by_generation: dict[int, set[bytes]] = {}
    for t in won:
        by_generation.setdefault(t.info().generation(Slot.AUTH), set()).add(
            t.derive(Slot.AUTH, b"probe")
        )
    assert all(len(keys) == 1 for keys in by_generation.values()), by_generation
    with contextlib.closing(PostgresKeyStateStore.open(dsn, PASSPHRASE)) as store:
        record = store.load(meter_identity("meter", 9))
        changes = [
            (c["generation"], c["outcome"])
            for c in store.audit_log("as-key-change")
            if c["node"] == meter_identity("meter", 9)
        ]
    assert record is not None and record.keys[Slot.AUTH]
    assert max(by_generation) == record.generation >= 2
    assert changes[:2] == [(2, "sent"), (2, "committed")]
    for generation in range(2, record.generation + 1):  # each generation committed once
        assert changes.count((generation, "committed")) == 1, changes


def _between_read_and_write(store: PostgresKeyStateStore, meanwhile: Callable[[], None]) -> None:
    """Run ``meanwhile`` (another worker's change) once, after issuance read, before it writes."""
    mint = store._new_keyset
    done: list[bool] = []

    def minting(*args: Any) -> Any:
        if not done:  # once: the fallback mints again, holding the target's row lock
            done.append(True)
            meanwhile()
        return mint(*args)

    store._new_keyset = minting  # type: ignore[method-assign]


def test_issuance_sees_a_revocation_made_after_its_read(postgres_dsn: str) -> None:
    """The two-statement issuance re-checks under its row locks, then falls back and refuses."""
    store, other = (PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE) for _ in range(2))
    try:
        _between_read_and_write(store, lambda: other.revoke("gs-1", NOW))
        with pytest.raises(RemoteAuthError) as refused:
            store.issue("alpha-1", "gs-1", "test", None, NOW)
        assert refused.value.refusal is Refusal.POLICY
        assert not store.audit_log("as-keyset")
        with contextlib.closing(psycopg.connect(postgres_dsn)) as conn:
            assert conn.execute("SELECT count(*) FROM keysets").fetchone() == (0,)
    finally:
        store.close()
        other.close()


def test_issuance_never_wraps_for_a_key_the_target_just_replaced(postgres_dsn: str) -> None:
    """A key change of the target between the read and the write: the ticket uses the new key."""
    store, other = (PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE) for _ in range(2))
    try:

        def change_gs_keys() -> None:
            other.prepare_key_change("gs-1", 1, NOW)
            other.commit_key_change("gs-1", 2, NOW)

        _between_read_and_write(store, change_gs_keys)
        issued = store.issue("alpha-1", "gs-1", "test", None, NOW)
        gs = store.load("gs-1")
        assert gs is not None and gs.generation == 2
        assert read_wrapped_kid(issued.ticket) == slot_kid(gs.token_id, Slot.WRAP, 2)
        assert [a["outcome"] for a in store.audit_log("as-keyset")] == ["minted"]
    finally:
        store.close()
        other.close()


def _reads(store: PostgresKeyStateStore) -> list[int]:
    """Count the store's reading statements from now on (one item each)."""
    counted: list[int] = []
    reading = store.reading

    def counting() -> Any:
        counted.append(1)
        return reading()

    store.reading = counting  # type: ignore[method-assign]
    return counted


def test_a_new_keyset_from_records_the_worker_opened_is_one_statement(postgres_dsn: str) -> None:
    """The link's HELLO loaded the requestor, an earlier issuance the target: no read."""
    with contextlib.closing(PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE)) as store:
        store.issue("alpha-1", "gs-1", "test", None, NOW)  # reads gs-1: remembered
        assert store.load("alpha-2") is not None  # as at a HELLO
        reads = _reads(store)
        issued = store.issue("alpha-2", "gs-1", "test", None, NOW)
        assert reads == []
        gs = store.load("gs-1")
        assert gs is not None
        assert read_wrapped_kid(issued.ticket) == slot_kid(gs.token_id, Slot.WRAP, 1)
        assert [a["outcome"] for a in store.audit_log("as-keyset")] == ["minted", "minted"]


@pytest.mark.parametrize("change", ["key-change", "revocation", "existing-ck"])
def test_the_one_statement_issuance_sees_what_moved_since_its_records(
    postgres_dsn: str, change: str
) -> None:
    """Another worker changes the remembered target's keys, revokes it, or mints the pair's CK:
    the write's re-checks fail and issuance reads again, as if it had no records."""
    store, other = (PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE) for _ in range(2))
    try:
        store.issue("alpha-1", "gs-1", "test", None, NOW)  # gs-1's generation 1 remembered
        assert store.load("alpha-2") is not None
        if change == "key-change":
            other.prepare_key_change("gs-1", 1, NOW)
            other.commit_key_change("gs-1", 2, NOW)
        elif change == "revocation":
            other.revoke("gs-1", NOW)
        else:
            theirs = other.issue("alpha-2", "gs-1", "test", None, NOW)
        reads = _reads(store)
        if change == "revocation":
            with pytest.raises(RemoteAuthError) as refused:
                store.issue("alpha-2", "gs-1", "test", None, NOW)
            assert refused.value.refusal is Refusal.POLICY
            assert len(store.audit_log("as-keyset")) == 1
            return
        issued = store.issue("alpha-2", "gs-1", "test", None, NOW)
        assert reads  # it read again
        gs = store.load("gs-1")
        assert gs is not None
        assert read_wrapped_kid(issued.ticket) == slot_kid(gs.token_id, Slot.WRAP, gs.generation)
        if change == "existing-ck":
            assert issued.ck_id == theirs.ck_id
            assert [a["outcome"] for a in store.audit_log("as-keyset")][-1] == "existing"
    finally:
        store.close()
        other.close()


def test_after_an_import_the_desk_refuses_to_export_or_rekey(
    site: Site, postgres: PostgresServer, tmp_path: Path
) -> None:
    """Token keys change in PostgreSQL from the import on: the desk's file would not match."""

    dsn = postgres.create_database("as_marks_the_desk")
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        import_desk(desk_store, dsn, now=NOW, source="site")
    with site.open() as desk:
        with pytest.raises(PolicyError, match="as bundle"):
            desk.export("alpha-1", tmp_path / "b", now=NOW)
        with pytest.raises(PolicyError, match="as bundle"):
            desk.rekey("alpha-1", site.token("alpha-1"), now=NOW)
    assert not (tmp_path / "b").exists()
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(LocalAuthError, match="imported into PostgreSQL already"),
    ):
        import_desk(desk_store, postgres.create_database("as_second"), now=NOW, source="again")


def test_after_an_import_the_desk_changes_nothing_the_as_would_not_see(
    site: Site, postgres: PostgresServer, tmp_path: Path
) -> None:
    """A revocation (or a pair, a group, a node) written to the desk's file would never reach
    the AS: the operator would believe a node revoked that the AS still serves."""
    dsn = postgres.create_database("as_desk_is_stale")
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        import_desk(desk_store, dsn, now=NOW, source="site")
    with site.open() as desk:
        before = desk.audit_log()
        changes: list[Callable[[], object]] = [
            lambda: desk.revoke("alpha-1", now=NOW),
            lambda: desk.pair("alpha-1", "alpha-2", now=NOW),
            lambda: desk.group("late", ["alpha-1", "gs-1"], now=NOW),
            lambda: desk.issue(now=NOW),
            lambda: desk.enrol(
                "late-1", "soldier", token_path=tmp_path / "late.token", pin="1234", now=NOW
            ),
        ]
        for change in changes:
            with pytest.raises(PolicyError, match="as revoke NODE --postgres"):
                change()
        assert desk.audit_log() == before and not desk.node("alpha-1").revoked
    assert not (tmp_path / "late.token").exists()
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(PolicyError, match="as revoke NODE --postgres"),
    ):
        import_meters(desk_store, seed=SEED, count=3, now=NOW, prefix="late-meter")
    # the AS, where it matters, still revokes
    with contextlib.closing(PostgresKeyStateStore.open(dsn, PASSPHRASE)) as store:
        assert store.revoke("alpha-1", NOW)


def _refuses_until_confirmed(site: Site, tmp_path: Path) -> None:
    """A desk whose import is not confirmed: no export, no rekey, no AS on its file."""
    with site.open() as desk:
        with pytest.raises(PolicyError, match="not confirmed"):
            desk.export("alpha-1", tmp_path / "b", now=NOW)
        with pytest.raises(PolicyError, match="not confirmed"):
            desk.rekey("alpha-1", site.token("alpha-1"), now=NOW)
    with pytest.raises(LocalAuthError, match="not confirmed"):
        SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)


def _imports(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM audit WHERE op = 'as-import'").fetchone()
    return int(row[0]) if row else 0


def test_an_import_stopped_after_its_copy_committed_is_finished_by_running_it_again(
    site: Site, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash window between PostgreSQL's commit and the desk's mark: no fork either way."""
    dsn = postgres.create_database("as_stopped_after_commit")
    _crash_import(site, dsn, monkeypatch, committed=True)
    assert _imports(dsn) == 1  # the database holds the mission, the desk does not know it
    _refuses_until_confirmed(site, tmp_path)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        # another database would be a second key state
        with pytest.raises(LocalAuthError, match="is running or was interrupted"):
            import_desk(desk_store, postgres.create_database("as_other"), now=NOW, source="x")
        counts = import_desk(desk_store, dsn, now=NOW, source="site")
    assert counts["resumed"] == 1 and counts["nodes"] == 24
    assert _imports(dsn) == 1  # finished, not copied twice
    with site.open() as desk, pytest.raises(PolicyError, match="imported into PostgreSQL"):
        desk.export("alpha-1", tmp_path / "b", now=NOW)
    with pytest.raises(LocalAuthError, match="imported into PostgreSQL"):
        SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)


def test_an_import_stopped_before_its_copy_committed_copies_again(
    site: Site, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = postgres.create_database("as_stopped_before_commit")
    real = desk_import._copy_mission

    def crash_inside_the_copy(*args: Any, **kwargs: Any) -> dict[str, int]:
        real(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies before COMMIT: PostgreSQL rolls back

    monkeypatch.setattr(desk_import, "_copy_mission", crash_inside_the_copy)
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(KeyboardInterrupt),
    ):
        import_desk(desk_store, dsn, now=NOW, source="site")
    monkeypatch.undo()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('mission')").fetchone() == (None,)
    _refuses_until_confirmed(site, tmp_path)  # the desk cannot tell how far it went
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        counts = import_desk(desk_store, dsn, now=NOW, source="site")
    assert "resumed" not in counts and counts["nodes"] == 24 and _imports(dsn) == 1
    store = PostgresKeyStateStore.open(dsn, PASSPHRASE)
    try:
        assert store.load("alpha-1") is not None
    finally:
        store.close()


def test_an_import_the_database_refused_leaves_the_desk_as_it_was(
    site: Site, postgres: PostgresServer, tmp_path: Path
) -> None:
    """A failure PostgreSQL reports inside the copy: nothing committed, so no mark stays."""
    dsn = postgres.create_database("as_refusing")
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE groups (x INTEGER)")  # the schema's CREATE TABLE fails
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(StoreUnavailable, match="import into PostgreSQL failed"),
    ):
        import_desk(desk_store, dsn, now=NOW, source="site")
    with site.open() as desk:
        assert desk.imported() is None
        desk.export("alpha-1", tmp_path / "b", now=NOW)
    SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE).close()


def test_a_second_run_meanwhile_into_another_database_is_refused(
    site: Site, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark is checked and set in one write transaction: two runs cannot both claim it."""
    first, second = (postgres.create_database(n) for n in ("as_first_run", "as_second_run"))
    real = desk_import._copy_mission
    refused: list[str] = []

    def meanwhile(*args: Any, **kwargs: Any) -> dict[str, int]:
        with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as other:
            with pytest.raises(LocalAuthError, match="is running or was interrupted") as exc:
                import_desk(other, second, now=NOW, source="other run")
            refused.append(str(exc.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(desk_import, "_copy_mission", meanwhile)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        assert import_desk(desk_store, first, now=NOW, source="site")["nodes"] == 24
    assert refused and _imports(first) == 1
    with psycopg.connect(second) as conn:
        assert conn.execute("SELECT to_regclass('mission')").fetchone() == (None,)


def test_a_failed_run_clears_only_its_own_mark(
    site: Site, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = postgres.create_database("as_own_mark")

    def another_run_marks_then_we_fail(conn: Any, store: Store, *args: Any, **kw: Any) -> Any:
        with store.transaction(
            imported=True
        ) as db:  # a run against the same database claimed it meanwhile
            db.execute("UPDATE meta SET value = value || 'x' WHERE key = ?", (IMPORTING_META,))
        conn.execute("SELECT no_such_function()")  # PostgreSQL fails ours: nothing committed

    monkeypatch.setattr(desk_import, "_copy_mission", another_run_marks_then_we_fail)
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(StoreUnavailable, match="import into PostgreSQL failed"),
    ):
        import_desk(desk_store, dsn, now=NOW, source="site")
    _refuses_until_confirmed(site, tmp_path)  # the other run's mark stays


def test_a_database_holding_this_desks_mission_marks_an_unmarked_desk(
    site: Site, postgres: PostgresServer, tmp_path: Path
) -> None:
    """A desk restored from a backup taken before its import: it must learn it was imported."""
    dsn = postgres.create_database("as_restored_desk")
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        import_desk(desk_store, dsn, now=NOW, source="site")
        with desk_store.transaction(imported=True) as db:  # the restore: no marks
            db.execute("DELETE FROM meta WHERE key IN (?, ?)", (IMPORTED_META, IMPORTING_META))
        with pytest.raises(LocalAuthError, match="already holds this desk's mission"):
            import_desk(desk_store, dsn, now=NOW, source="again")
    with site.open() as desk, pytest.raises(PolicyError, match="imported into PostgreSQL"):
        desk.export("alpha-1", tmp_path / "b", now=NOW)
    assert _imports(dsn) == 1


def test_an_as_serving_the_desk_refuses_every_write_once_an_import_marks_it(
    site: Site, postgres: PostgresServer
) -> None:
    """An AS already running on the desk's file when the import starts: no key change there."""
    serving = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        serving.issue("alpha-1", "gs-1", "chat", None, NOW)  # it serves
        with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
            import_desk(
                desk_store, postgres.create_database("as_while_serving"), now=NOW, source="s"
            )
        before = serving.load("alpha-1")
        assert before is not None
        with pytest.raises(StoreUnavailable, match="imported into PostgreSQL"):
            serving.prepare_key_change("alpha-1", before.generation, NOW)
        with pytest.raises(StoreUnavailable, match="imported into PostgreSQL"):
            serving.issue("alpha-1", "gs-1", "chat", None, NOW)
        after = serving.load("alpha-1")
        assert after is not None and after.pending is None  # nothing written
    finally:
        serving.close()


def test_a_pending_import_is_abandoned_only_where_no_copy_committed(
    site: Site, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed, empty = (postgres.create_database(n) for n in ("as_abandon_full", "as_abandon_x"))
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(LocalAuthError, match="nothing to abandon"),
    ):
        abandon_import(desk_store, committed, now=NOW)
    _crash_import(site, committed, monkeypatch, committed=True)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        with pytest.raises(LocalAuthError, match="holds this desk's mission"):
            abandon_import(desk_store, committed, now=NOW)  # the copy is there: no
        with pytest.raises(LocalAuthError, match="went to"):
            abandon_import(desk_store, empty, now=NOW)  # not the database the mark names
    _refuses_until_confirmed(site, tmp_path)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        into = abandon_import(desk_store, None, now=NOW)  # --force: that database is gone
        assert "as_abandon_full" in into
    with site.open() as desk:
        assert desk.audit_log()[-1]["op"] == "as-import-abandoned"
        desk.export("alpha-1", tmp_path / "b", now=NOW)


def _crash_at_the_final_mark(store: Store, marks: dict[str, Any]) -> None:
    if IMPORTED_META in marks:
        raise KeyboardInterrupt  # the process dies here: the copy has committed
    raise AssertionError("only the final mark goes through _mark_desk")


def test_no_abandon_nor_second_run_while_an_import_copies_into_that_database(
    site: Site, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run still copying (slow, or hung and believed dead) holds the database's import lock:
    clearing its mark would let the desk change while its copy commits."""
    dsn = postgres.create_database("as_live_run")
    real = desk_import._copy_mission
    refused: list[str] = []

    def meanwhile(*args: Any, **kwargs: Any) -> dict[str, int]:
        with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as other:
            for attempt in (
                lambda: abandon_import(other, dsn, now=NOW),
                lambda: import_desk(other, dsn, now=NOW, source="second run"),
            ):
                with pytest.raises(LocalAuthError, match="is running") as exc:
                    attempt()
                refused.append(str(exc.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(desk_import, "_copy_mission", meanwhile)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        assert import_desk(desk_store, dsn, now=NOW, source="site")["nodes"] == 24
    assert len(refused) == 2 and _imports(dsn) == 1
    with site.open() as desk:
        assert desk.imported() is not None and "imported into PostgreSQL" in desk.imported()


def test_the_marked_database_is_recognised_under_another_address(
    site: Site, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover or a new address keeps the cluster's system identifier, database and schema."""
    dsn = postgres.create_database("as_moved")
    _crash_import(site, dsn, monkeypatch, committed=True)
    _move_mark(site)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        # the copy committed there: the re-run under the new address confirms it
        assert import_desk(desk_store, dsn, now=NOW, source="site")["resumed"] == 1
    assert _imports(dsn) == 1
    with site.open() as desk, pytest.raises(PolicyError, match="imported into PostgreSQL"):
        desk.export("alpha-1", tmp_path / "b", now=NOW)


def test_an_import_is_abandoned_under_the_databases_new_address(
    site: Site, postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = postgres.create_database("as_moved_empty")
    _crash_import(site, dsn, monkeypatch, committed=False)
    _move_mark(site)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        assert "192.0.2.7" in abandon_import(desk_store, dsn, now=NOW)
    with site.open() as desk:
        assert desk.imported() is None
        desk.export("alpha-1", tmp_path / "b", now=NOW)


def test_meters_enrolled_into_postgres_after_the_import_are_served(
    site: Site, postgres_dsn: str, tmp_path: Path
) -> None:
    """The desk refuses changes after the import, so a growing fleet is enrolled in PostgreSQL."""
    store = PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE)
    try:
        assert store.enrol_meters(seed=SEED, count=5, now=NOW, first=7001, head_end="gs-1") == 5
        token = meter_token(SEED, meter_identity("meter", 7003))
        events = run(make_service(store, key_lifetime=1e9), token, [request("gs-1")])
        (granted,) = [e for e in events if isinstance(e, Granted)]
        assert granted.grant.peer == "gs-1"
        # the same meters again, or a head-end that is not there: refused, nothing written
        rows = _count(postgres_dsn, "SELECT count(*) FROM nodes")
        with pytest.raises(LocalAuthError, match="overlap nodes already enrolled"):
            store.enrol_meters(seed=SEED, count=10, now=NOW, first=6999, head_end="gs-1")
        with pytest.raises(LocalAuthError, match="not an enrolled, active node"):
            store.enrol_meters(seed=SEED, count=2, now=NOW, first=8000, head_end="nobody")
        assert _count(postgres_dsn, "SELECT count(*) FROM nodes") == rows
        assert [e["count"] for e in store.audit_log("import-meters")][-1:] == [5]
    finally:
        store.close()
    seed_file = tmp_path / "batch.seed"
    done = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "as", "import-meters", "--postgres", postgres_dsn,
         "--count", "3", "--first", "9001", "--factory-seed", str(seed_file),
         "--head-end", "gs-1", "--json"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] == 3 and seed_file.stat().st_size == 32
    assert _count(postgres_dsn, "SELECT count(*) FROM pairs WHERE a = 'gs-1'") >= 3


def test_a_new_seed_outlives_a_fleet_import_whose_commit_may_have_happened(
    postgres_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A new seed is removed again only when nothing was enrolled with it.

    The connection can break while PostgreSQL commits: the client sees a failure
    (``unavailable``) though the meters are enrolled. The seed is then the only way
    to derive the keys the manufacturer must write into them; removing it left an
    enrolled fleet no meter can ever join, and whose numbers a new seed cannot take.
    """
    from mesh.cli.main import main

    real = PostgresKeyStateStore.enrol_meters

    def committed_then_lost(self: PostgresKeyStateStore, **kwargs: Any) -> int:
        real(self, **kwargs)
        raise StoreUnavailable("PostgreSQL: server closed the connection unexpectedly")

    monkeypatch.setattr(PostgresKeyStateStore, "enrol_meters", committed_then_lost)
    monkeypatch.setenv("SNRMESH_DESK_PASSPHRASE", PASSPHRASE)
    seed_file = tmp_path / "lost.seed"
    args = ["as", "import-meters", "--postgres", postgres_dsn, "--count", "3", "--first"]
    assert main([*args, "9101", "--factory-seed", str(seed_file)]) == 1
    assert "server closed the connection" in capsys.readouterr().err
    assert _count(postgres_dsn, "SELECT count(*) FROM nodes WHERE identity LIKE 'meter-00091%'")
    token_id, _ = factory_keys(seed_file.read_bytes(), meter_identity("meter", 9101))
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute("SELECT identity FROM nodes WHERE token_id = %s", (token_id,))
        assert row.fetchone() == (meter_identity("meter", 9101),)
    # refused before anything was written: the new seed goes again
    refused = tmp_path / "refused.seed"
    assert main([*args, "9101", "--factory-seed", str(refused)]) == 1
    assert "overlap" in capsys.readouterr().err and not refused.exists()


def test_the_role_an_import_grants_serves_but_cannot_rewrite_the_audit_log(
    site: Site, postgres: PostgresServer
) -> None:
    """Doc 'Deployment': the audit log is append-only, also against the AS's own role.

    The triggers bind no table owner (``ALTER TABLE audit DISABLE TRIGGER``), and the
    import's role owns every table: an AS serving under that role could rewrite its log.
    ``--grant ROLE`` gives another role what serving takes, and nothing more.
    """
    fresh = postgres.create_database("as_granted")
    with contextlib.closing(psycopg.connect(fresh, autocommit=True)) as owner:
        owner.execute("CREATE ROLE as_worker LOGIN")
    done = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "as", "import-desk", str(site.desk_dir),
         "--postgres", fresh, "--grant", "as_worker", "--json"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    worker = fresh.replace(f"user={SUPERUSER}", "user=as_worker")
    store = PostgresKeyStateStore.open(worker, PASSPHRASE)
    try:
        store.group_commits()
        token = meter_token(SEED, meter_identity("meter", 3))
        events = run(make_service(store, key_lifetime=0), token, [request("gs-1")])
        assert any(isinstance(e, Granted) for e in events), events
        assert store.revoke("alpha-1", NOW)
        store.sync(store.commits)
    finally:
        store.close()
    with contextlib.closing(psycopg.connect(worker, autocommit=True)) as conn:
        before = conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        assert {"as-key-change", "revoke"} <= {row[2] for row in before}
        for statement in (
            "ALTER TABLE audit DISABLE TRIGGER audit_no_change",
            "DROP TRIGGER audit_no_change ON audit",
            "UPDATE audit SET detail = '{}'",
            "DELETE FROM audit",
            "TRUNCATE audit",
            "INSERT INTO nodes (identity, role, token_id, generation, sealed_keys, "
            "enrolled_at) VALUES ('x', 'x', '\\x00', 1, '\\x00', 0)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute("SELECT * FROM audit ORDER BY seq").fetchall() == before


def _count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def _crash_import(
    site: Site, dsn: str, monkeypatch: pytest.MonkeyPatch, *, committed: bool
) -> None:
    """An import that dies after its copy committed (before the final mark), or before."""

    def crash_inside_the_copy(*args: Any, **kwargs: Any) -> dict[str, int]:
        raise KeyboardInterrupt  # before COMMIT: PostgreSQL rolls back

    with monkeypatch.context() as patched:
        if committed:
            patched.setattr(desk_import, "_mark_desk", _crash_at_the_final_mark)
        else:
            patched.setattr(desk_import, "_copy_mission", crash_inside_the_copy)
        with (
            contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
            pytest.raises(KeyboardInterrupt),
        ):
            import_desk(desk_store, dsn, now=NOW, source="site")


def _move_mark(site: Site) -> None:
    """Rewrite the pending mark as if its database now answered at another address."""
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        desk_store.transaction(imported=True) as db,
    ):
        (mark,) = db.execute("SELECT value FROM meta WHERE key = ?", (IMPORTING_META,)).fetchone()
        assert " system " in mark  # the test server's role may read it
        moved = "PostgreSQL 192.0.2.7:6543/" + mark.rsplit("/", 1)[1]
        db.execute("UPDATE meta SET value = ? WHERE key = ?", (moved, IMPORTING_META))


def test_a_run_meanwhile_into_a_database_holding_the_mission_does_not_confirm_another_run(
    site: Site, postgres: PostgresServer, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: while a run's mark names a database, only that database may be imported into.

    ``postgres_dsn`` holds this desk's mission (as when the desk was restored from a
    backup) while a run into an empty database copies. A run against ``postgres_dsn``
    meanwhile used to "confirm" the pending import it did not make; it is refused, and
    the run in progress finishes into its own database.
    """
    fresh = postgres.create_database("as_import_meanwhile")
    real = desk_import._copy_mission
    meanwhile: list[str] = []

    def copy(*args: Any, **kwargs: Any) -> dict[str, int]:
        with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as other:
            try:
                import_desk(other, postgres_dsn, now=NOW, source="other")
            except LocalAuthError as exc:
                meanwhile.append(str(exc))
        return real(*args, **kwargs)

    monkeypatch.setattr(desk_import, "_copy_mission", copy)
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        counts = import_desk(desk_store, fresh, now=NOW, source="site")
        assert desk_store.imported() is not None
    assert "resumed" not in counts and counts["nodes"] > 0
    assert len(meanwhile) == 1 and "is running or was interrupted" in meanwhile[0]


def test_a_mark_cleared_while_the_copy_runs_commits_nothing(
    site: Site, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: the copy commits only while its own run's mark is on the desk.

    ``--abandon --force`` (no database to check) can clear the mark of a live run;
    that run then rolls its copy back instead of committing a second key state.
    """
    fresh = postgres.create_database("as_import_forced")
    real = desk_import._copy_mission

    def copy(*args: Any, **kwargs: Any) -> dict[str, int]:
        with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as other:
            abandon_import(other, None, now=NOW)
        return real(*args, **kwargs)

    monkeypatch.setattr(desk_import, "_copy_mission", copy)
    with (
        contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store,
        pytest.raises(LocalAuthError, match="cleared while the copy ran"),
    ):
        import_desk(desk_store, fresh, now=NOW, source="site")
    with contextlib.closing(psycopg.connect(fresh)) as conn:
        assert conn.execute("SELECT to_regclass('mission')").fetchone() == (None,)
    with site.open() as desk:  # not frozen: the desk is the key state again
        desk.export("alpha-1", site.root / "alpha-1.again.bundle", now=NOW)


def test_desk_and_postgres_fleet_enrolment_refuse_the_same_head_ends(
    site: Site, postgres_dsn: str
) -> None:
    """Doc 'Deployment': ``as import-meters --postgres`` enrols "the same rows" as the desk's.

    The PostgreSQL path refuses a suspended head-end ("not an enrolled, active node");
    the desk's accepts it (it checks ``revoked_at`` only) and pairs the whole fleet
    with a node the AS refuses every keyset for.
    """
    outcomes = {}
    sqlite_store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        sqlite_store.suspend("gs-1", 0, NOW)  # a clone of the head-end's token was seen
        try:
            import_meters(
                sqlite_store.store, seed=bytes(32), count=3, now=NOW, first=900, head_end="gs-1"
            )
            outcomes["sqlite"] = "enrolled"
        except LocalAuthError as exc:
            outcomes["sqlite"] = str(exc)
    finally:
        sqlite_store.close()
    pg = PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE)
    try:
        pg.suspend("gs-1", 0, NOW)
        try:
            pg.enrol_meters(seed=bytes(32), count=3, now=NOW, first=900, head_end="gs-1")
            outcomes["postgres"] = "enrolled"
        except LocalAuthError as exc:
            outcomes["postgres"] = str(exc)
    finally:
        pg.close()
    assert outcomes["sqlite"] == outcomes["postgres"], outcomes


def test_neither_store_pairs_a_fleet_with_a_meter_as_its_head_end(
    site: Site, postgres_dsn: str
) -> None:
    """A meter talks to its energy provider's head-end, never to another meter: a fleet
    whose --head-end names a meter is refused, before any row is written, on both stores."""
    meter = meter_identity("meter", 1)  # enrolled by the site
    sqlite_store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        with pytest.raises(LocalAuthError, match="nor a meter"):
            import_meters(
                sqlite_store.store, seed=bytes(32), count=3, now=NOW, first=900, head_end=meter
            )
        assert sqlite_store.load(meter_identity("meter", 900)) is None
    finally:
        sqlite_store.close()
    pg = PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE)
    try:
        assert pg.load(meter) is not None  # (enrolled there too: refused for being a meter)
        with pytest.raises(LocalAuthError, match="nor a meter"):
            pg.enrol_meters(seed=bytes(32), count=3, now=NOW, first=900, head_end=meter)
        assert pg.load(meter_identity("meter", 900)) is None
    finally:
        pg.close()


def test_the_import_reports_its_progress_row_by_row(
    site: Site, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``as import-desk`` on a terminal shows a bar: ``on_progress`` runs up to every row."""
    monkeypatch.setattr(desk_import, "PROGRESS_EVERY", 7)
    fresh = postgres.create_database("as_import_progress")
    ticks: list[tuple[int, int]] = []
    with contextlib.closing(Store.open(site.desk_dir, PASSPHRASE)) as desk_store:
        counts = import_desk(
            desk_store, fresh, now=NOW, source="site", on_progress=lambda d, t: ticks.append((d, t))
        )
    total = sum(counts[table] for table, _ in desk_import.TABLES)
    assert ticks[0] == (0, total) and ticks[-1] == (total, total)
    assert len(ticks) > len(desk_import.TABLES) + 1  # within tables too, not only between
    assert [d for d, _ in ticks] == sorted(d for d, _ in ticks)
