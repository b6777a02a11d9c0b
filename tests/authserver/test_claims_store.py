"""Security claims of docs/authentication-server.md about the AS's store, each backed by a test.

Each test's docstring names the claim it backs (section and wording of the doc).
Tests of the store's shared logic run on SQLite and PostgreSQL (the ``store``
fixture of ``conftest.py``); PostgreSQL-only claims use ``postgres_dsn`` and
skip, with the reason, where no private PostgreSQL server can run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from mesh.keyset import open_copy
from provisioning.authserver import meters as meters_module
from provisioning.authserver import protocol
from provisioning.authserver import store as store_module
from provisioning.authserver.client import Backoff, request_keysets
from provisioning.authserver.errors import (
    AuthServerError,
    LocalAuthError,
    Refusal,
    RemoteAuthError,
    StoreUnavailable,
)
from provisioning.authserver.keystate import TokenKeys
from provisioning.authserver.meters import factory_keys, meter_identity, meter_token
from provisioning.authserver.postgres import MAX_DSN_LENGTH, PostgresKeyStateStore
from provisioning.authserver.protocol import UNAVAILABLE_RETRY, Authenticated, Granted, Refused
from provisioning.authserver.server import AuthServer
from provisioning.authserver.store import (
    CLONE_ALERT,
    MAX_EPOCHS_AHEAD,
    Sealing,
    SqliteKeyStateStore,
    SqlKeyStateStore,
)
from provisioning.errors import DeskCorrupt
from tests.authserver.conftest import (
    NOW,
    PASSPHRASE,
    SEED,
    Site,
    in_threads,
    make_service,
    request,
    run,
)
from tests.authserver.pgserver import PostgresServer

T = TypeVar("T")
DAY = 86400
_copies = itertools.count()


# -- helpers ----------------------------------------------------------------------------------


def _raw_audit(store: SqlKeyStateStore) -> str:
    """Every column of every audit row, as the table holds them (not as audit_log parses)."""
    with store.reading() as cur:
        cur.execute("SELECT seq, at, op, detail FROM audit ORDER BY seq")
        rows = cur.fetchall()
    assert rows
    return "\n".join(f"{seq} {at} {op} {detail}" for seq, at, op, detail in rows)


def _encodings(secret: bytes) -> list[str]:
    """How a secret could be spelt in JSON text: hex, base64url and base64, padded or not."""
    url = base64.urlsafe_b64encode(secret).decode()
    std = base64.b64encode(secret).decode()
    return [secret.hex(), url, url.rstrip("="), std, std.rstrip("=")]


def _token_keys(record: TokenKeys) -> list[bytes]:
    """Every slot key the store holds for a token: current, pending and previous."""
    keys = list(record.keys)
    for extra in (record.pending, record.previous):
        if extra is not None:
            keys.extend(extra)
    return keys


def _identities(store: SqlKeyStateStore) -> list[str]:
    with store.reading() as cur:
        cur.execute("SELECT identity FROM nodes ORDER BY identity")
        return [r[0] for r in cur.fetchall()]


def _keyset_count(store: SqlKeyStateStore) -> int:
    with store.reading() as cur:
        cur.execute("SELECT count(*) FROM keysets")
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def _last_auth(store: SqlKeyStateStore, identity: str) -> Any:
    with store.reading() as cur:
        cur.execute(store._q("SELECT last_auth FROM nodes WHERE identity = ?"), (identity,))
        row = cur.fetchone()
    assert row is not None
    return row[0]


def _copy_store(
    request: pytest.FixtureRequest, kind: str, site: Site, tmp_path: Path
) -> SqlKeyStateStore:
    """An independent copy of the site's store: the desk directory, or a database clone."""
    if kind == "sqlite":
        copy = tmp_path / f"desk-copy-{next(_copies)}"
        shutil.copytree(site.desk_dir, copy)
        return SqliteKeyStateStore.open(copy, PASSPHRASE)
    postgres: PostgresServer = request.getfixturevalue("postgres")
    template: str = request.getfixturevalue("postgres_template")
    dsn = postgres.create_database(f"as_claims_copy_{next(_copies)}", template=template)
    return PostgresKeyStateStore.open(dsn, PASSPHRASE)


# -- 1. keyset policy -------------------------------------------------------------------------


def test_a_suspended_target_is_refused_as_policy(store: SqlKeyStateStore) -> None:
    """Doc 'Keyset request': the AS refuses (policy) a target that is ... suspended."""
    assert store.issue("alpha-1", "gs-1", "test", None, NOW).peer == "gs-1"  # mates, served
    store.suspend("gs-1", 1, NOW)
    with pytest.raises(RemoteAuthError) as refused:
        store.issue("alpha-1", "gs-1", "test", 1, NOW)  # a new CK would have to be minted
    assert refused.value.refusal is Refusal.POLICY
    with pytest.raises(RemoteAuthError) as refused:
        store.issue("alpha-1", "gs-1", "test", None, NOW)  # nor the CK it already holds
    assert refused.value.refusal is Refusal.POLICY
    assert [a["epoch"] for a in store.audit_log("as-keyset")] == [0]


def test_epochs_current_to_current_plus_four_only(site: Site, store: SqlKeyStateStore) -> None:
    """Doc 'Keyset request': epochs outside [current, current + 4] are refused (policy)."""
    assert MAX_EPOCHS_AHEAD == 4
    now = store.mission.start + 3 * DAY + 100  # current epoch 3
    granted = store.issue("alpha-1", "gs-1", "test", 3 + 4, now)
    assert granted.epoch == 7
    assert granted.not_before == store.mission.start + 7 * DAY
    assert granted.not_after == store.mission.start + 8 * DAY  # exactly that epoch
    ck = open_copy(site.token("alpha-1"), granted.own)
    assert (ck.not_before, ck.not_after) == (granted.not_before, granted.not_after)
    for epoch in (3 + 5, 2, 0):  # current + 5, and epochs already past
        with pytest.raises(RemoteAuthError) as refused:
            store.issue("alpha-1", "gs-1", "test", epoch, now)
        assert refused.value.refusal is Refusal.POLICY, epoch
    assert [a["epoch"] for a in store.audit_log("as-keyset")] == [7]


def test_an_epoch_past_the_missions_end_is_refused(store: SqlKeyStateStore) -> None:
    """Doc 'Keyset request': epochs ... past the mission's end are refused (policy)."""
    m = store.mission
    last = (m.end - m.start - 1) // m.epoch_seconds  # the last epoch that starts before the end
    now = m.start + (last - 3) * m.epoch_seconds + 10  # current + 3 is the last epoch
    assert store.issue("alpha-1", "gs-1", "test", last, now).epoch == last
    with pytest.raises(RemoteAuthError, match="mission's end") as refused:
        store.issue("alpha-1", "gs-1", "test", last + 1, now)  # current + 4, but after the end
    assert refused.value.refusal is Refusal.POLICY
    with pytest.raises(RemoteAuthError) as refused:  # no current epoch at all after the end
        store.issue("alpha-1", "gs-1", "test", None, m.end)
    assert refused.value.refusal is Refusal.POLICY


def test_a_keyset_never_passes_its_epochs_end_nor_the_missions(
    site: Site, store: SqlKeyStateStore
) -> None:
    """Doc 'Keyset request': window = exactly that epoch, so it never passes the epoch's end."""
    m = store.mission
    last = (m.end - m.start - 1) // m.epoch_seconds
    # the site's mission ends 60 s into its last epoch: that epoch is cut short
    assert m.start + (last + 1) * m.epoch_seconds > m.end
    now = m.start + (last - 4) * m.epoch_seconds + 10
    alpha = site.token("alpha-1")
    for epoch in range(last - 4, last + 1):
        issued = store.issue("alpha-1", "gs-1", "test", epoch, now)
        epoch_start = m.start + epoch * m.epoch_seconds
        epoch_end = epoch_start + m.epoch_seconds
        assert issued.not_before == epoch_start
        assert issued.not_after == min(epoch_end, m.end), epoch
        ck = open_copy(alpha, issued.own)  # the CK itself, not only what the AS says of it
        assert (ck.not_before, ck.not_after) == (epoch_start, min(epoch_end, m.end))
    assert issued.not_after == m.end < epoch_end


# -- 2. the audit log holds no key material ---------------------------------------------------


def test_the_audit_table_never_holds_key_material(site: Site, store: SqlKeyStateStore) -> None:
    """Doc 'Keyset request': the as-keyset audit row names node, token, ... never key material."""
    service = make_service(store)  # key lifetime 0: a key change at every authentication
    alpha, gs = site.token("alpha-1"), site.token("gs-1")
    meter = meter_token(SEED, meter_identity("meter", 1))
    grants = []
    for token, target in ((alpha, "gs-1"), (meter, "gs-1"), (gs, "alpha-1")):
        events = run(service, token, [request(target), request(target, epoch=1)])
        assert isinstance(events[0], Authenticated) and events[0].key_changed
        grants += [(token, e.grant) for e in events if isinstance(e, Granted)]
    assert len(grants) == 6
    store.prepare_key_change("alpha-1", 2, NOW)  # alpha-1 holds current, pending and previous
    secrets: list[bytes] = []
    records = {identity: store.load(identity) for identity in _identities(store)}
    for record in records.values():
        assert record is not None
        secrets += _token_keys(record)
    full = records["alpha-1"]
    assert full is not None and full.pending is not None and full.previous is not None
    copies: list[str] = []
    for token, grant in grants:
        secrets.append(open_copy(token, grant.own).pair_key)  # the requestor's copy
        copies += [grant.own, grant.ticket]
    with store.reading() as cur:
        cur.execute("SELECT copy_a, copy_b FROM keysets")
        copies += [c for row in cur.fetchall() for c in row]
    text = _raw_audit(store)
    # the probe sees what the audit does hold: ids of tokens and CKs
    assert full.token_id.hex() in text and grants[0][1].ck_id.hex() in text
    folded = text.lower()
    leaked = [  # described, never spelt out: a failure must not print the keys it found
        f"key {n} as encoding {e}"
        for n, secret in enumerate(secrets)
        for e, spelling in enumerate(_encodings(secret))
        if spelling in text or spelling.lower() in folded
    ]
    leaked += [
        f"copy {n} part {p}"
        for n, copy in enumerate(copies)
        for p, part in enumerate([copy, *copy.split(".")])
        if len(part) >= 16 and part in text
    ]
    assert not leaked, f"key material in the audit table: {leaked}"


# -- 3. new keys come from OS randomness ------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_two_copies_of_a_store_prepare_different_keys(
    request: pytest.FixtureRequest, kind: str, site: Site, tmp_path: Path
) -> None:
    """Doc 'Key state': new keys = HKDF(OS randomness ‖ server nonce); the seed cannot predict."""
    first = _copy_store(request, kind, site, tmp_path)
    second = _copy_store(request, kind, site, tmp_path)
    try:
        for identity in ("alpha-1", meter_identity("meter", 3)):
            a = first.prepare_key_change(identity, 1, NOW)
            b = second.prepare_key_change(identity, 1, NOW)  # same row, same state, same now
            assert a.keys == b.keys  # the copies started alike
            assert a.pending is not None and b.pending is not None
            assert all(x != y for x, y in zip(a.pending, b.pending, strict=True)), identity
            assert len(set(a.pending) | set(b.pending) | set(a.keys)) == 12
        # a meter's keys after the change owe nothing to the factory seed
        meter = meter_identity("meter", 3)
        _, factory = factory_keys(SEED, meter)
        record = first.load(meter)
        assert record is not None and record.keys == factory and record.pending is not None
        assert not set(record.pending) & set(factory)
    finally:
        first.close()
        second.close()


# -- 4. SQLite: concurrent key changes never fork ---------------------------------------------

SQLITE_WORKERS = 6
ROUNDS = 4


def _sqlite_race(directory: Path, call: Callable[[SqliteKeyStateStore, int], T]) -> list[T]:
    """``call`` at once in SQLITE_WORKERS threads, each on a connection of its own."""
    opened = threading.Barrier(SQLITE_WORKERS)

    def one(i: int) -> T:
        try:
            store = SqliteKeyStateStore.open(directory, PASSPHRASE)  # its own connection
        except BaseException:
            opened.abort()
            raise
        try:
            opened.wait()
            return call(store, i)
        finally:
            store.close()

    return in_threads(SQLITE_WORKERS, one)


def test_sqlite_workers_racing_one_token_never_fork_its_generations(site: Site) -> None:
    """Doc 'Deployment': SQLite key-state changes run under BEGIN IMMEDIATE: no fork."""
    meter = meter_identity("meter", 1)
    # migrated once before the workers start, as 'as serve' does before it forks
    SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE).close()
    prepared = _sqlite_race(site.desk_dir, lambda s, i: s.prepare_key_change(meter, 1, NOW))
    assert len({p.pending for p in prepared}) == 1  # one pending generation 2, not several
    _sqlite_race(site.desk_dir, lambda s, i: s.commit_key_change(meter, 2, NOW + 1))
    with contextlib.closing(SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)) as store:
        record = store.load(meter)
        assert record is not None and record.generation == 2
        assert record.keys == prepared[0].pending and record.previous == prepared[0].keys
        changes = [(c["generation"], c["outcome"]) for c in store.audit_log("as-key-change")]
        assert changes == [(2, "sent"), (2, "committed")]

    def rounds(s: SqliteKeyStateStore, i: int) -> list[tuple[int, tuple[bytes, ...]]]:
        """Each worker changes the token's keys again and again, from what it last read."""
        seen = []
        for _ in range(ROUNDS):
            current = s.load(meter)
            assert current is not None
            try:
                change = s.prepare_key_change(meter, current.generation, NOW + 2)
                assert change.pending is not None
                s.commit_key_change(meter, current.generation + 1, NOW + 2)
            except RemoteAuthError as exc:  # another worker moved the generation meanwhile
                assert exc.refusal is Refusal.AUTH_FAILED
                continue
            seen.append((current.generation + 1, change.pending))
        return seen

    seen = [pair for worker in _sqlite_race(site.desk_dir, rounds) for pair in worker]
    with contextlib.closing(SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)) as store:
        record = store.load(meter)
        changes = [(c["generation"], c["outcome"]) for c in store.audit_log("as-key-change")]
    assert record is not None
    final = record.generation
    assert final > 2
    # one linear history: each generation sent once, then committed once, in order
    expected = [(g, outcome) for g in range(2, final + 1) for outcome in ("sent", "committed")]
    assert changes == expected
    # every worker that committed generation g saw the same keys for it: no second "next"
    by_generation: dict[int, set[tuple[bytes, ...]]] = {}
    for generation, keys in seen:
        by_generation.setdefault(generation, set()).add(keys)
    assert all(len(keys) == 1 for keys in by_generation.values())
    assert by_generation[final] == {record.keys}
    assert record.previous is not None and by_generation.get(final - 1, {record.previous}) == {
        record.previous
    }


# -- 5. PostgreSQL: the audit log is append-only ----------------------------------------------


def test_postgres_audit_log_refuses_update_and_truncate(postgres_dsn: str) -> None:
    """Doc 'Deployment': the audit log is append-only there too (triggers on UPDATE, TRUNCATE)."""
    with contextlib.closing(psycopg.connect(postgres_dsn, autocommit=True)) as conn:
        before = conn.execute("SELECT seq, at, op, detail FROM audit ORDER BY seq").fetchall()
        assert before
        for statement in (
            "UPDATE audit SET detail = '{}'",
            "UPDATE audit SET op = 'forged' WHERE seq = (SELECT max(seq) FROM audit)",
            "TRUNCATE audit",
            "TRUNCATE audit RESTART IDENTITY CASCADE",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
        after = conn.execute("SELECT seq, at, op, detail FROM audit ORDER BY seq").fetchall()
    assert after == before


# -- 6. sealed keys are bound to identity, token id and generation ----------------------------


def test_sealed_keys_open_only_under_their_identity_token_and_generation(
    store: SqlKeyStateStore,
) -> None:
    """Doc 'Secrets in the database': sealed keys' associated data = identity, token id, gen."""
    alpha, gs = store.load("alpha-1"), store.load("gs-1")
    assert alpha is not None and gs is not None
    with store.reading() as cur:
        cur.execute(store._q("SELECT sealed_keys FROM nodes WHERE identity = ?"), ("alpha-1",))
        row = cur.fetchone()
    assert row is not None
    stored = bytes(row[0])
    for sealing in (store.sealing, Sealing(store.sealing._sealer)):  # the cached one, and fresh
        assert sealing.open("alpha-1", alpha.token_id, 1, stored) == alpha.keys
        for identity, token_id, generation in (
            ("gs-1", alpha.token_id, 1),  # another identity
            ("alpha-1", gs.token_id, 1),  # another token id
            ("gs-1", gs.token_id, 1),  # another node's row altogether
            ("alpha-1", alpha.token_id, 2),  # another generation
        ):
            with pytest.raises(DeskCorrupt):
                sealing.open(identity, token_id, generation, stored)


def test_a_sealed_blob_moved_to_another_row_does_not_open(store: SqlKeyStateStore) -> None:
    """Doc 'Secrets in the database': a row's sealed keys are bound to that row's identity."""
    gs = store.load("gs-1")
    assert gs is not None
    with store.transaction() as cur:  # someone with write access to the database only
        store._exec(
            cur,
            "UPDATE nodes SET sealed_keys = (SELECT sealed_keys FROM nodes WHERE identity = ?) "
            "WHERE identity = ?",
            ("alpha-1", "alpha-2"),
        )
    store.sealing._opened.clear()
    with pytest.raises(DeskCorrupt):
        store.load("alpha-2")
    with pytest.raises(DeskCorrupt):
        store.issue("gs-1", "alpha-2", "test", None, NOW)
    assert store.load("gs-1") is not None


# -- 7. PostgreSQL: the two-statement issuance re-checks the requestor ------------------------


def _between_read_and_write(
    store: PostgresKeyStateStore, meanwhile: Callable[[], None]
) -> list[bool]:
    """Run ``meanwhile`` once, after the issuance's read, before its write; says if it ran."""
    mint = store._new_keyset
    done: list[bool] = []

    def minting(*args: Any) -> Any:
        if not done:
            done.append(True)
            meanwhile()
        return mint(*args)

    store._new_keyset = minting  # type: ignore[method-assign,assignment]
    return done


@pytest.mark.parametrize(
    ("node", "change", "refusal"),
    [
        ("alpha-1", "suspend", Refusal.SUSPENDED),
        ("alpha-1", "revoke", Refusal.REVOKED),
        ("gs-1", "suspend", Refusal.POLICY),
    ],
)
def test_postgres_issuance_refuses_a_node_suspended_or_revoked_after_its_read(
    postgres_dsn: str, node: str, change: str, refusal: Refusal
) -> None:
    """Doc 'Keyset request': the write re-checks neither node suspended or revoked."""
    store, other = (PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE) for _ in range(2))
    try:
        before = _last_auth(store, "alpha-1")

        def meanwhile() -> None:
            if change == "suspend":
                other.suspend(node, 1, NOW)
            else:
                other.revoke(node, NOW)

        ran = _between_read_and_write(store, meanwhile)
        with pytest.raises(RemoteAuthError) as refused:
            store.issue("alpha-1", "gs-1", "test", None, NOW)
        assert ran == [True]
        assert refused.value.refusal is refusal
        assert not store.audit_log("as-keyset")
        assert _keyset_count(store) == 0
        assert _last_auth(store, "alpha-1") == before  # the stamp, the CK, the audit, or nothing
    finally:
        store.close()
        other.close()


# -- 8. failures ------------------------------------------------------------------------------


def _failing_at(store: SqlKeyStateStore, failing: str) -> SqlKeyStateStore:
    """The store, wrapped so that its method ``failing`` raises the store's error instead."""

    def fail(*args: Any) -> Any:
        raise StoreUnavailable(f"{failing}: the database cannot be reached")

    setattr(store, failing, fail)  # on this instance only: every other call is the real one
    return store


def _unavailable(events: list[Any]) -> list[Refused]:
    return [e for e in events if isinstance(e, Refused) and e.refusal is Refusal.UNAVAILABLE]


@pytest.mark.parametrize(
    "failing",
    [
        "load",
        "prepare_key_change",
        "commit_key_change",
        "issue",
    ],
)
def test_a_failing_store_makes_requests_fail_as_unavailable(
    site: Site, store: SqlKeyStateStore, failing: str
) -> None:
    """Doc 'Failures': a store that fails makes requests fail as unavailable, retry-after 5."""
    assert UNAVAILABLE_RETRY == 5.0
    service = make_service(_failing_at(store, failing))  # key lifetime 0: every step runs
    events = run(service, site.token("alpha-1"), [request("gs-1")])
    delattr(store, failing)  # the store itself is fine again
    refused = _unavailable(events)
    assert len(refused) == 1, events
    assert refused[0].retry_after == UNAVAILABLE_RETRY
    assert not any(isinstance(e, Granted) for e in events)
    assert service.counters["unavailable"] == 1
    # once the store answers again, so does the AS
    again = run(make_service(store), site.token("alpha-1"), [request("gs-1")])
    assert any(isinstance(e, Granted) for e in again), again


def test_a_database_that_cannot_be_reached_answers_unavailable(
    site: Site, postgres_dsn: str, tmp_path: Path
) -> None:
    """Doc 'Failures': a database that cannot be reached makes requests fail as unavailable."""
    store = PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE)
    try:
        store._conn.close()
        store._dsn = f"host={tmp_path / 'no-server-here'} dbname=as connect_timeout=2"
        events = run(make_service(store), site.token("alpha-1"), [request("gs-1")])
        assert events == [Refused(Refusal.UNAVAILABLE, UNAVAILABLE_RETRY)]
    finally:
        store.close()


def test_a_sqlite_store_that_fails_answers_unavailable(site: Site) -> None:
    """Doc 'Failures': a store that fails makes requests fail as unavailable (SQLite)."""
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        store.store.db.close()  # any sqlite3 error from here on
        with pytest.raises(StoreUnavailable):
            store.issue("alpha-1", "gs-1", "test", None, NOW)
        events = run(make_service(store), site.token("alpha-1"), [request("gs-1")])
        assert events == [Refused(Refusal.UNAVAILABLE, UNAVAILABLE_RETRY)]
    finally:
        store.close()


def test_a_dsn_over_1024_characters_is_refused_clearly(postgres_dsn: str) -> None:
    """Doc 'Failures': a DSN is at most 1,024 characters."""
    assert MAX_DSN_LENGTH == 1024
    padded = postgres_dsn + " " * (MAX_DSN_LENGTH - len(postgres_dsn))  # libpq ignores blanks
    assert len(padded) == MAX_DSN_LENGTH
    PostgresKeyStateStore.open(padded, PASSPHRASE).close()  # 1,024: accepted
    with pytest.raises(LocalAuthError, match="DSN is longer than 1024 characters"):
        PostgresKeyStateStore.open(padded + " ", PASSPHRASE)
    with pytest.raises(LocalAuthError, match="DSN is longer than 1024 characters"):
        PostgresKeyStateStore.open("host=/nowhere dbname=" + "x" * 2000, PASSPHRASE)


def test_a_broken_postgres_connection_is_replaced_at_the_next_request(
    site: Site, postgres_dsn: str
) -> None:
    """Doc 'Failures': a broken connection is replaced at the next request."""
    store = PostgresKeyStateStore.open(postgres_dsn, PASSPHRASE)
    try:
        service = make_service(store, key_lifetime=1e9)
        alpha = site.token("alpha-1")
        assert any(isinstance(e, Granted) for e in run(service, alpha, [request("gs-1")]))
        backend = store._conn.info.backend_pid
        with contextlib.closing(psycopg.connect(postgres_dsn, autocommit=True)) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (backend,)).fetchone() == (
                True,
            )
        # the request that finds the connection broken fails as unavailable ...
        events = run(service, alpha, [request("gs-1", epoch=1)])
        assert events == [Refused(Refusal.UNAVAILABLE, UNAVAILABLE_RETRY)]
        # ... and the next one runs on a new connection
        events = run(service, alpha, [request("gs-1", epoch=1)])
        assert any(isinstance(e, Granted) for e in events), events
        assert store._conn.info.backend_pid != backend
    finally:
        store.close()


def test_two_first_opens_of_a_desk_as_an_as_store_migrate_it_once(site: Site) -> None:
    """The AS migration re-checks under its lock: a racing first open migrated it meanwhile."""
    import sqlite3

    from provisioning.authserver.store import migrate_sqlite

    path = site.desk_dir / "desk.sqlite"
    first = sqlite3.connect(path, isolation_level=None)
    second = sqlite3.connect(path, isolation_level=None)

    class RacedAtTheLock:
        """``first``, except that ``second`` migrates right before ``first`` takes the lock."""

        def execute(self, sql: str, *params: Any) -> Any:
            if sql == "BEGIN IMMEDIATE":
                migrate_sqlite(second)
            return first.execute(sql, *params)

    migrate_sqlite(RacedAtTheLock())  # type: ignore[arg-type]
    (count,) = first.execute("SELECT COUNT(*) FROM meta WHERE key = 'as_schema'").fetchone()
    assert count == 1
    first.close()
    second.close()


def test_clone_alerts_are_read_by_index_not_by_a_scan_of_the_audit_log(
    store: SqlKeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operations: 'as audit --alerts' reads a partial index that only clone alerts enter.

    The audit log grows by a row per keyset issued (a year of a million meters: hundreds of
    millions of rows); the alerts an operator looks for in an incident are a handful.
    """
    store.suspend("alpha-1", 1, NOW)
    statements: list[tuple[str, Any]] = []
    real = store._exec

    def traced(cur: Any, sql: str, params: Any = ()) -> None:
        statements.append((store._q(sql), params))
        real(cur, sql, params)

    monkeypatch.setattr(store, "_exec", traced)
    (alert,) = store.audit_log(CLONE_ALERT, 10)
    assert alert["op"] == CLONE_ALERT and alert["node"] == "alpha-1"
    ((sql, params),) = statements
    if isinstance(store, PostgresKeyStateStore):
        with psycopg.connect(store._dsn, autocommit=True) as conn:
            conn.execute("SET enable_seqscan = off")  # a tiny table: make the plan show the index
            plan = " ".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))
        assert "audit_alerts" in plan, plan
    else:
        plan = " ".join(r[-1] for r in store.store.db.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "audit_alerts" in plan and "SCAN audit" not in plan.replace(
            "SCAN audit USING INDEX", ""
        ), plan


def _copies_of(store: SqlKeyStateStore, node: str, first_epoch: int) -> int:
    with store.reading() as cur:
        cur.execute(
            store._q("SELECT COUNT(*) FROM keysets WHERE (a = ? OR b = ?) AND epoch >= ?"),
            (node, node, first_epoch),
        )
        return int(cur.fetchone()[0])


def test_a_node_with_more_live_copies_than_the_bound_keeps_its_keys_online(
    site: Site, store: SqlKeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: a key change rewraps under one lock, so above MAX_ONLINE_REWRAP it is not made.

    A head-end paired with a fleet would otherwise hold the write lock (or its row)
    for minutes. The link goes on under the current keys.
    """
    monkeypatch.setattr(store_module, "MAX_ONLINE_REWRAP", 2)
    service = make_service(store)  # keys due at every authentication
    for n in (1, 2, 3):  # three meters' CKs with the head-end
        events = run(service, meter_token(SEED, meter_identity("meter", n)), [request("gs-1")])
        assert any(isinstance(e, Granted) for e in events), events
    assert _copies_of(store, "gs-1", 0) > 2
    head_end = site.token("gs-1")
    events = run(service, head_end, [request("alpha-2")])
    assert isinstance(events[0], Authenticated) and events[0].generation == 1
    assert any(isinstance(e, Granted) for e in events), events
    record = store.load("gs-1")
    assert record is not None and record.generation == 1 and record.pending is None
    assert service.counters["key_change_deferred"] == 1


def test_a_key_change_rewraps_only_the_copies_still_served(
    site: Site, store: SqlKeyStateStore
) -> None:
    """Claim: CKs of past epochs are never served again, so a key change leaves them."""
    service = make_service(store)  # keys due at every authentication
    meter = meter_token(SEED, meter_identity("meter", 5))
    run(service, meter, [request("gs-1")])  # epoch 0
    run(service, meter, [request("gs-1")], now=NOW + DAY)  # epoch 1
    live = _copies_of(store, "gs-1", 1)
    assert _copies_of(store, "gs-1", 0) > live > 0
    events = run(service, site.token("gs-1"), [], now=NOW + DAY)
    assert isinstance(events[0], Authenticated) and events[0].generation == 2
    (changed,) = [
        e
        for e in store.audit_log("as-key-change")
        if e["node"] == "gs-1" and e["outcome"] == "committed"
    ]
    assert changed["rewrapped"] == live


def test_a_failing_store_is_told_to_the_operator_and_to_the_client(
    site: Site,
    store: SqlKeyStateStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Doc 'Failures': the worker warns, once per 10 s; the client says what it was answered."""
    monkeypatch.setattr(protocol, "UNAVAILABLE_RETRY", 0.05)
    service = make_service(_failing_at(store, "load"))

    async def main() -> None:
        server = AuthServer(service)
        host, port = await server.start("127.0.0.1", 0)
        try:
            with pytest.raises(AuthServerError, match=r"after 3 attempts \(last: unavailable"):
                await request_keysets(
                    host,
                    port,
                    site.token("alpha-1"),
                    [request("gs-1")],
                    backoff=Backoff(attempts=3, base=0.01),
                )
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, logger="snrmesh.as"):
        asyncio.run(main())
    assert service.counters["unavailable"] == 3
    warned = [r.getMessage() for r in caplog.records if "store unavailable" in r.getMessage()]
    assert len(warned) == 1 and "the database cannot be reached" in warned[0]


# -- 9. fleets: enrolment holds one chunk in memory, on both stores ---------------------------


def test_enrolling_ten_times_the_meters_takes_no_more_memory(
    store: SqlKeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Doc 'Fleets': rows are generated and written in chunks, "memory holds one chunk".

    Peak Python memory while enrolling 10 x N meters stays that of N (chunks of 100
    here): a list of the fleet's rows (or pairs) would make it ten times larger.
    """
    import tracemalloc

    monkeypatch.setattr(meters_module, "IMPORT_CHUNK", 100)

    def enrol(count: int, first: int) -> None:
        if isinstance(store, PostgresKeyStateStore):
            store.enrol_meters(seed=SEED, count=count, now=NOW, first=first, head_end="gs-1")
        else:
            assert isinstance(store, SqliteKeyStateStore)
            meters_module.import_meters(
                store.store, seed=SEED, count=count, now=NOW, first=first, head_end="gs-1"
            )

    enrol(50, 100_000)  # warm: statement caches, imports
    peaks = []
    for count, first in ((400, 200_000), (4000, 300_000)):
        tracemalloc.start()
        try:
            enrol(count, first)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 2 * peaks[0] + 64 * 1024, peaks
