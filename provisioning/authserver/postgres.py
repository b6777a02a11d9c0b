"""PostgreSQL as the Authentication Server's store: several workers (or hosts) on one database.

The desk stays a SQLite file on an offline machine; ``snrmesh as import-desk``
copies its mission, nodes, groups, pairs, keysets and audit log into an empty
PostgreSQL database once (:func:`import_desk`). From then on the database is
the mission's key state: the AS changes token keys there, so the desk's file
no longer knows the current generations (revocation: ``snrmesh as revoke``).

Sealed slot keys are copied as they are: they stay sealed under the desk
passphrase's scrypt key (the parameters and canary travel in ``mission``), so
a database dump alone opens nothing. The store logic is
:class:`SqlKeyStateStore`'s; this module only connects, spells placeholders
``%s`` and locks a token's row with ``SELECT ... FOR UPDATE`` inside each
transaction, which serialises every change of one token across workers.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import cbor2
import psycopg

from mesh.crypto import random_bytes
from mesh.crypto.primitives import CryptoError
from mesh.keyset import KeysetError
from mesh.keyset.mission import Mission
from mesh.timefmt import utc_iso
from provisioning.authserver.errors import (
    LocalAuthError,
    Refusal,
    RemoteAuthError,
    StoreUnavailable,
)
from provisioning.authserver.store import (
    AS_SCHEMA_VERSION,
    IssuedKeyset,
    Sealing,
    SqlKeyStateStore,
    key_columns,
    mates_expression,
)
from provisioning.bundles import DISCOVERY_SECRET
from provisioning.errors import DeskCorrupt
from provisioning.store import IMPORTED_META, IMPORTING_META, Store, audit_json, open_sealer

__all__ = ["MAX_DSN_LENGTH", "SCHEMA", "PostgresKeyStateStore", "abandon_import", "import_desk"]

MAX_DSN_LENGTH = 1024
T = TypeVar("T")
_UNKNOWN = b"?"  # what a database holds when it cannot say (mission ids are 16 bytes)
CONNECT_TIMEOUT = 10  # seconds; a database that does not answer is "unavailable", not a hang
SCHEMA = """
CREATE TABLE mission (
    singleton      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    as_schema      INTEGER NOT NULL,
    mission_id     BYTEA NOT NULL,
    name           TEXT NOT NULL,
    start_at       BIGINT NOT NULL,
    end_at         BIGINT NOT NULL,
    epoch_seconds  BIGINT NOT NULL,
    kdf            BYTEA NOT NULL,
    canary         BYTEA NOT NULL,
    discovery      BYTEA NOT NULL  -- the desk's sealed discovery secret, for AS bundles
);
CREATE TABLE nodes (
    identity            TEXT PRIMARY KEY,
    role                TEXT NOT NULL,
    token_id            BYTEA NOT NULL UNIQUE,
    generation          BIGINT NOT NULL,
    sealed_keys         BYTEA NOT NULL,
    pending_keys        BYTEA,
    personalised        BIGINT NOT NULL DEFAULT 0,
    enrolled_at         BIGINT NOT NULL,
    revoked_at          BIGINT,
    previous_keys       BYTEA,
    previous_generation BIGINT,
    keys_since          BIGINT,
    last_auth           BIGINT,
    suspended_at        BIGINT
);
CREATE TABLE groups (
    name   TEXT NOT NULL,
    member TEXT NOT NULL REFERENCES nodes(identity),
    PRIMARY KEY (name, member)
);
CREATE INDEX groups_by_member ON groups (member, name);
CREATE TABLE pairs (
    a TEXT NOT NULL REFERENCES nodes(identity),
    b TEXT NOT NULL REFERENCES nodes(identity),
    PRIMARY KEY (a, b),
    CHECK (a < b)
);
CREATE TABLE keysets (
    ck_id      BYTEA PRIMARY KEY,
    a          TEXT NOT NULL,
    b          TEXT NOT NULL,
    epoch      BIGINT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after  BIGINT NOT NULL,
    copy_a     TEXT NOT NULL,
    copy_b     TEXT NOT NULL,
    UNIQUE (a, b, epoch)
);
CREATE INDEX keysets_by_b ON keysets (b, epoch);
CREATE INDEX pairs_by_b ON pairs (b, a);
CREATE TABLE audit (
    seq    BIGSERIAL PRIMARY KEY,
    at     BIGINT NOT NULL,
    op     TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_alerts ON audit (seq) WHERE op = 'as-clone-alert';
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
"""
# the desk's tables in copy order (foreign keys), with the PostgreSQL columns of each
TABLES = (
    (
        "nodes",
        (
            "identity",
            "role",
            "token_id",
            "generation",
            "sealed_keys",
            "pending_keys",
            "personalised",
            "enrolled_at",
            "revoked_at",
            "previous_keys",
            "previous_generation",
            "keys_since",
            "last_auth",
            "suspended_at",
        ),
    ),
    ("groups", ("name", "member")),
    ("pairs", ("a", "b")),
    ("keysets", ("ck_id", "a", "b", "epoch", "not_before", "not_after", "copy_a", "copy_b")),
    ("audit", ("seq", "at", "op", "detail")),
)


# Issuance in two statements, each its own transaction (the connection is in autocommit):
# one reads everything the decision needs, the CK is minted in Python, one writes it all.
_ISSUE_READ = (
    f"SELECT {key_columns('r')}, {key_columns('t')}, {mates_expression('%(a)s', '%(b)s')}, "
    "k.ck_id, k.copy_a, k.copy_b, k.not_before, k.not_after "
    "FROM nodes r LEFT JOIN nodes t ON t.identity = %(target)s "
    "LEFT JOIN keysets k ON k.a = %(a)s AND k.b = %(b)s AND k.epoch = %(epoch)s "
    "WHERE r.identity = %(requestor)s"
)
# The write re-checks, under the row locks its statement takes, what the read decided on:
# both generations (the copies are wrapped under those WRAP keys) and neither node
# suspended or revoked. The target's row is share-locked, so a key change of the target
# (which rewraps its copies holding that row FOR UPDATE) cannot commit in between. If
# anything moved, or another worker's CK for the pair won, it writes nothing but maybe
# ``last_auth`` and says so, and the caller issues again the long way.
_ISSUE_WRITE = """
WITH peer AS (
    SELECT 1 FROM nodes
    WHERE identity = %(target)s AND generation = %(target_generation)s
      AND suspended_at IS NULL AND revoked_at IS NULL
    FOR KEY SHARE
), me AS (
    UPDATE nodes SET last_auth = %(now)s
    WHERE identity = %(requestor)s AND generation = %(generation)s
      AND suspended_at IS NULL AND revoked_at IS NULL AND EXISTS (SELECT 1 FROM peer)
    RETURNING 1
), minted AS (
    INSERT INTO keysets (ck_id, a, b, epoch, not_before, not_after, copy_a, copy_b)
    SELECT %(ck_id)s, %(a)s, %(b)s, %(epoch)s, %(not_before)s, %(not_after)s,
           %(copy_a)s, %(copy_b)s
    WHERE %(mint)s AND EXISTS (SELECT 1 FROM me)
    ON CONFLICT (a, b, epoch) DO NOTHING
    RETURNING 1
), logged AS (
    INSERT INTO audit (at, op, detail)
    SELECT %(now)s, 'as-keyset', %(detail)s
    WHERE EXISTS (SELECT 1 FROM me) AND (NOT %(mint)s OR EXISTS (SELECT 1 FROM minted))
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM logged)
"""


def _connect(dsn: str) -> psycopg.Connection[Any]:
    if len(dsn) > MAX_DSN_LENGTH:
        raise LocalAuthError(f"the PostgreSQL DSN is longer than {MAX_DSN_LENGTH} characters")
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot connect to PostgreSQL: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def import_desk(store: Store, dsn: str, *, now: int, source: str) -> dict[str, int]:
    """Copy a desk's mission into an empty PostgreSQL database, in one transaction.

    Refuses a database that already holds a mission: importing twice would fork
    the key state (the AS changes keys in PostgreSQL, not in the desk's file).
    Rows are streamed (``COPY``) from one snapshot of the desk, so a million
    meters need no more memory than a few. Returns the rows copied per table
    (``resumed``: 1 when it only confirmed an import whose copy had committed).

    Crash-safe: the desk is marked with the database it goes to
    (:data:`IMPORTING_META`, checked and set in one write transaction of the
    desk, so two runs cannot both claim it) *before* the copy can commit, and
    marked imported (:data:`IMPORTED_META`) after. Whatever point a crash stops
    at, the desk refuses to export, rekey or serve (an AS already serving it
    refuses every write from the mark on), and only the same database may be
    imported into again: this call then copies again (the copy had not
    committed) or only confirms it (it had). :func:`abandon_import` clears a
    mark whose database holds no copy.
    """
    meta = _mission_meta(store)  # the desk's part read first: a desk that cannot say marks nothing
    mission_id = meta[0]
    with contextlib.closing(_connect(dsn)) as conn:
        # held until the desk is marked imported: an --abandon (or a second run) against this
        # database while this run copies is refused, not allowed to clear a live run's mark
        _lock_import(conn, mission_id)
        into = _database_name(conn)
        held = _read(conn, _held_mission)
        run = f"{into}#{random_bytes(6).hex()}"  # this run's mark: a failure clears only its own
        claim = _claim(store, into, run, held=held, mission_id=mission_id, now=now)
        if claim == "confirmed":
            return {**_read(conn, _imported_counts), "resumed": 1}
        committing = False
        try:
            with conn.transaction():
                counts = _copy_mission(conn, store, meta, now=now, source=source)
                committing = True  # past the body: only the COMMIT can fail now
        except (psycopg.Error, sqlite3.Error, LocalAuthError, DeskCorrupt) as exc:
            held = None if not committing else _UNKNOWN
            if held is None:
                try:
                    held = _held_mission(conn)
                except psycopg.Error:
                    held = _UNKNOWN  # cannot tell: the safe side keeps the mark
            if held in (mission_id, _UNKNOWN):
                raise StoreUnavailable(
                    f"the import into {into} is not confirmed ({_first_line(exc)}): run the "
                    "same command again, which finishes it"
                ) from None
            _unmark(store, run)  # nothing of ours committed there
            if isinstance(exc, sqlite3.Error):
                raise DeskCorrupt(f"cannot read the desk store: {exc}") from None
            if isinstance(exc, LocalAuthError | DeskCorrupt):
                raise
            raise StoreUnavailable(f"import into PostgreSQL failed: {_first_line(exc)}") from None
        # the desk's file no longer tracks token keys: it refuses every change from now on
        try:
            _mark_desk(store, {IMPORTED_META: now, IMPORTING_META: None})
        except DeskCorrupt as exc:
            raise DeskCorrupt(
                f"the copy into {into} committed, but the desk could not be marked imported "
                f"({exc}): run the same command again, which confirms it"
            ) from None
    return counts


def abandon_import(store: Store, dsn: str | None, *, now: int) -> str:
    """Clear the mark of an import that never committed; returns the database it named.

    With ``dsn``: only once that database is reached (the same database the
    mark names), no import of this desk runs against it, and it holds no copy
    of this mission. Without (``--force``: the database is gone for good): on
    the operator's word, noted in the desk's audit log. Refuses a desk whose
    import was confirmed.
    """
    started = _desk_mark(store.db, IMPORTING_META)
    if _desk_mark(store.db, IMPORTED_META) is not None:
        raise LocalAuthError(
            "this desk's import into PostgreSQL was confirmed: serve that database"
        )
    if started is None:
        raise LocalAuthError("no import of this desk is pending: nothing to abandon")
    into = str(started).rpartition("#")[0] or str(started)
    with contextlib.ExitStack() as stack:
        if dsn is not None:
            conn = stack.enter_context(contextlib.closing(_connect(dsn)))
            mission_id = _mission_meta(store)[0]
            _lock_import(conn, mission_id)  # a run still copying there holds it: refused
            reached = _database_name(conn)
            if not _same_database(reached, into):
                raise LocalAuthError(f"the pending import went to {into}, not {reached}")
            if _read(conn, _held_mission) == mission_id:
                raise LocalAuthError(
                    f"{into} holds this desk's mission (the copy committed): finish the import "
                    "with the same 'snrmesh as import-desk', or drop that database first"
                )
        try:
            with store.transaction(imported=True) as db:
                if _desk_mark(db, IMPORTED_META) is not None:
                    raise LocalAuthError("this desk's import was confirmed meanwhile")
                gone = db.execute(
                    "DELETE FROM meta WHERE key = ? AND value = ?", (IMPORTING_META, started)
                ).rowcount
                if gone != 1:  # another run marked it since: that one is not ours to clear
                    raise LocalAuthError("another import of this desk began meanwhile")
                db.execute(
                    "INSERT INTO audit (at, op, detail) VALUES (?, ?, ?)",
                    (
                        now,
                        "as-import-abandoned",
                        audit_json({"into": into, "checked": dsn is not None}),
                    ),
                )
        except sqlite3.Error as exc:
            raise DeskCorrupt(f"cannot mark the desk store: {exc}") from None
    return into


def _lock_import(conn: psycopg.Connection[Any], mission_id: Any) -> None:
    """Take this mission's import lock on the database, for the connection's life, or refuse."""
    key = int.from_bytes(bytes(mission_id)[:8], "big", signed=True)
    row = _read(conn, lambda c: c.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone())
    if row is None or row[0] is not True:
        raise LocalAuthError(
            "an import of this desk into that database is running: wait for it to finish"
        )


_NAME = re.compile(
    r"PostgreSQL (?P<at>\S*)/(?P<db>\S*)(?: schema (?P<schema>\S+))?"
    r"(?: system (?P<system>\d+))?"
)


def _same_database(a: str, b: str) -> bool:
    """Whether two of :func:`_database_name`'s names are one database.

    By the cluster's system identifier, database and schema where both names
    carry one (a failover or a new address keeps them); else by the whole name.
    """
    ma, mb = _NAME.fullmatch(a), _NAME.fullmatch(b)
    if ma and mb and ma["system"] and mb["system"]:
        return (ma["system"], ma["db"], ma["schema"]) == (mb["system"], mb["db"], mb["schema"])
    return a == b


def _mission_meta(store: Store) -> tuple[Any, ...]:
    """What the ``mission`` row takes from the desk: id, name, times, kdf, canary, discovery."""
    return tuple(
        store.meta(k)
        for k in (
            "mission_id",
            "name",
            "start",
            "end",
            "epoch_seconds",
            "kdf",
            "canary",
            f"sealed:{DISCOVERY_SECRET}",
        )
    )


def _claim(
    store: Store, into: str, run: str, *, held: bytes | None, mission_id: Any, now: int
) -> str:
    """Check and set the desk's import mark in one write transaction: ``copy`` or ``confirmed``.

    ``held``: the mission the database holds (None: none). Raises, with the
    desk marked as the database's content requires, when no copy may start.
    """
    refusal: LocalAuthError | None = None
    try:
        with store.transaction(imported=True) as db:
            if _desk_mark(db, IMPORTED_META) is not None:  # a second database: a second key state
                done = _desk_mark(db, IMPORTED_META)
                raise LocalAuthError(
                    f"this desk was imported into PostgreSQL already ({utc_iso(int(done))}); "
                    "serve that database"
                )
            started = _desk_mark(db, IMPORTING_META)
            going = None if started is None else str(started).rpartition("#")[0]
            if going is not None and held != mission_id and not _same_database(going, into):
                raise LocalAuthError(
                    f"an import of this desk into {going} began and did not finish: run it "
                    "again against that database (it resumes), or abandon it ('--abandon'); "
                    "another database would fork the key state"
                )
            if held == mission_id:  # this desk's mission is there (by any name): mark the desk
                _set_marks(db, {IMPORTED_META: now, IMPORTING_META: None})
                if going is not None:
                    return "confirmed"  # the copy committed, the mark did not
                refusal = LocalAuthError(
                    f"{into} already holds this desk's mission (imported from a copy of this "
                    "desk?): the desk is marked imported now; serve that database"
                )
            elif held is not None:  # another mission: nothing of this desk committed there
                _set_marks(db, {IMPORTING_META: None})
                refusal = LocalAuthError(
                    "this PostgreSQL database already holds a mission; "
                    "import a desk into an empty database"
                )
            else:
                _set_marks(db, {IMPORTING_META: run})  # before anything can commit there
    except sqlite3.Error as exc:
        raise DeskCorrupt(f"cannot mark the desk store: {exc}") from None
    if refusal is not None:
        raise refusal
    return "copy"


def _copy_mission(
    conn: psycopg.Connection[Any],
    store: Store,
    meta: tuple[Any, ...],
    *,
    now: int,
    source: str,
) -> dict[str, int]:
    """The body of the import's transaction: schema, mission row, tables, the audit row.

    The desk is read in one read transaction: one snapshot, whatever commits
    meanwhile (nothing that changes keys can, once the desk is marked).
    """
    desk_db = store.db
    present = conn.execute("SELECT to_regclass('mission')").fetchone()
    if present is not None and present[0] is not None:  # another import won meanwhile
        raise LocalAuthError(
            "this PostgreSQL database already holds a mission; import a desk into an empty database"
        )
    conn.execute(SCHEMA)
    conn.execute(
        "INSERT INTO mission (mission_id, name, start_at, end_at, epoch_seconds, kdf, canary, "
        "discovery, as_schema) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (*meta, AS_SCHEMA_VERSION),
    )
    counts: dict[str, int] = {}
    cur = conn.cursor()
    desk_db.execute("BEGIN")  # deferred: a read snapshot from its first SELECT on
    try:
        for table, columns in TABLES:
            have = {r[1] for r in desk_db.execute(f"PRAGMA table_info({table})")}
            select = ", ".join(c if c in have else "NULL" for c in columns)
            n = 0
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in desk_db.execute(f"SELECT {select} FROM {table}"):
                    copy.write_row(row)
                    n += 1
            counts[table] = n
    finally:
        desk_db.execute("ROLLBACK")  # it only read
    conn.execute(
        "SELECT setval(pg_get_serial_sequence('audit', 'seq'), MAX(seq)) "
        "FROM audit HAVING MAX(seq) IS NOT NULL"
    )
    conn.execute(
        "INSERT INTO audit (at, op, detail) VALUES (%s, %s, %s)",
        (now, "as-import", audit_json({"source": source, **counts})),
    )
    return counts


def _database_name(conn: psycopg.Connection[Any]) -> str:
    """Which database a connection reached, as the desk's mark names it (never a password).

    Host, port and name alone can name another server (a tunnel, a rebuilt
    host): the cluster's system identifier goes in where the role may read
    it, and the schema that ``mission`` resolves to (``search_path``).
    """
    info = conn.info
    name = f"PostgreSQL {info.host}:{info.port}/{info.dbname}"
    row = _read(conn, lambda c: c.execute("SELECT current_schema()").fetchone())
    if row is not None and row[0] is not None:
        name += f" schema {row[0]}"
    try:
        system = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    except psycopg.Error:  # not granted to this role: host, port and name must do
        system = None
    if system is not None and system[0] is not None:
        name += f" system {system[0]}"
    return name


def _held_mission(conn: psycopg.Connection[Any]) -> bytes | None:
    """The mission id a database holds, or None for a database with no mission table."""
    present = conn.execute("SELECT to_regclass('mission')").fetchone()
    if present is None or present[0] is None:
        return None
    row = conn.execute("SELECT mission_id FROM mission").fetchone()
    return b"" if row is None else bytes(row[0])


def _imported_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The rows the committed import copied, from its ``as-import`` audit row."""
    row = conn.execute(
        "SELECT detail FROM audit WHERE op = 'as-import' ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    try:
        detail = json.loads(row[0]) if row is not None else {}
    except ValueError:
        detail = {}
    return {table: detail[table] for table, _ in TABLES if type(detail.get(table)) is int}


def _read(conn: psycopg.Connection[Any], query: Callable[[psycopg.Connection[Any]], T]) -> T:
    """``query(conn)``; a database that cannot answer is ``unavailable``."""
    try:
        return query(conn)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"PostgreSQL: {_first_line(exc)}") from None


def _desk_mark(desk_db: sqlite3.Connection, key: str) -> Any:
    row = desk_db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def _set_marks(db: sqlite3.Connection, marks: dict[str, Any]) -> None:
    """Set (or, for None, remove) import marks, inside the caller's transaction."""
    for key, value in marks.items():
        if value is None:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def _mark_desk(store: Store, marks: dict[str, Any]) -> None:
    """:func:`_set_marks` in one durable transaction of its own."""
    try:
        with store.transaction(imported=True) as db:
            _set_marks(db, marks)
    except sqlite3.Error as exc:
        raise DeskCorrupt(f"cannot mark the desk store: {exc}") from None


def _unmark(store: Store, run: str) -> None:
    """Remove this run's pending mark, and only it (another run may have marked since)."""
    try:
        with store.transaction(imported=True) as db:
            db.execute("DELETE FROM meta WHERE key = ? AND value = ?", (IMPORTING_META, run))
    except sqlite3.Error as exc:
        raise DeskCorrupt(f"cannot mark the desk store: {exc}") from None


class PostgresKeyStateStore(SqlKeyStateStore):
    """A PostgreSQL database (made by :func:`import_desk`) as the AS store, one connection each.

    A broken connection (database restarted) is replaced at the next
    transaction; the request that saw it fails as ``unavailable`` and the client
    retries.

    Group commits: the session's transactions commit with ``synchronous_commit
    = off`` (visible at once, flushed by PostgreSQL's WAL writer later), and
    :meth:`sync` is one statement that commits *synchronously* after writing
    a transactional ``pg_logical_emit_message`` -- a WAL record, so its commit
    waits until the WAL is flushed up to it, which covers every commit before
    it. No table, no superuser: the function is executable by any role. It
    runs in the server's sync thread on a connection of its own (with the
    default ``synchronous_commit = on``), so the worker's loop goes on serving
    while PostgreSQL flushes.
    """

    placeholder = "%s"
    sync_in_thread = True
    lock = " FOR UPDATE"
    target_lock = " FOR KEY SHARE OF n"

    def __init__(
        self,
        dsn: str,
        conn: psycopg.Connection[Any],
        sealing: Sealing,
        mission: Mission,
        discovery: bytes,
    ) -> None:
        super().__init__(sealing, mission)
        self._discovery = discovery  # sealed; opened when a bundle needs it
        self._dsn = dsn
        self._conn = conn
        self._sync_conn: psycopg.Connection[Any] | None = None  # the sync thread's
        self._grouped = False

    def group_commits(self) -> bool:
        self._grouped = True
        self._conn.execute("SET synchronous_commit = off")
        return True

    def sync(self, upto: int) -> None:
        if self.synced >= upto:
            return
        try:
            conn = self._sync_conn
            if conn is None or conn.closed or conn.broken:
                conn = self._sync_conn = _connect(self._dsn)
                conn.execute("SET synchronous_commit = on")
            conn.execute("SELECT pg_logical_emit_message(true, 'snrmesh-as-sync', '')")
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL sync: {_first_line(exc)}") from None
        self.synced = max(self.synced, upto)

    @classmethod
    def open(cls, dsn: str, passphrase: str) -> PostgresKeyStateStore:
        conn = _connect(dsn)
        try:
            row = conn.execute(
                "SELECT as_schema, mission_id, name, start_at, end_at, epoch_seconds, kdf, "
                "canary, discovery FROM mission"
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            conn.close()
            raise LocalAuthError(
                "this PostgreSQL database holds no mission (run 'snrmesh as import-desk')"
            ) from None
        except psycopg.errors.UndefinedColumn:
            conn.close()
            raise LocalAuthError(
                "this PostgreSQL database was imported by an older snrmesh (its mission has no "
                "discovery secret): import the desk again into an empty database"
            ) from None
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"PostgreSQL: {_first_line(exc)}") from None
        try:
            if row is None or row[0] != AS_SCHEMA_VERSION:
                raise DeskCorrupt("the PostgreSQL store's mission record is missing or unknown")
            sealer = open_sealer(passphrase, bytes(row[6]), bytes(row[7]))
            mission = Mission(bytes(row[1]), row[2], row[3], row[4], row[5])
        except (
            KeysetError,
            KeyError,
            ValueError,
            TypeError,
            CryptoError,
            cbor2.CBORDecodeError,
        ) as exc:
            conn.close()
            raise DeskCorrupt(f"the PostgreSQL store's mission record is corrupt: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return cls(dsn, conn, Sealing(sealer), mission, bytes(row[8]))

    def _discovery_secret(self) -> bytes:
        return self.sealing.open_secret(DISCOVERY_SECRET, self._discovery)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn.closed or self._conn.broken:
            self._conn = _connect(self._dsn)
            if self._grouped:
                self._conn.execute("SET synchronous_commit = off")
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """BEGIN ... COMMIT around the block (the connection is otherwise in autocommit)."""
        try:
            conn = self._connection()
            with conn.transaction():
                yield conn.cursor()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL: {_first_line(exc)}") from None
        # even one that changed nothing: what it read may be another worker's commit,
        # not yet flushed, so whatever it answers waits for a sync too
        self.commits += 1

    def issue(
        self, requestor: str, target: str, purpose: str, epoch: int | None, now: int
    ) -> IssuedKeyset:
        """Two round trips, no BEGIN or COMMIT: one read, one write statement.

        Each round trip costs the AS and PostgreSQL more CPU than the statement
        it carries, and the transaction of the shared implementation takes
        six. Should the write find that something moved since the read, the
        shared implementation issues under its row locks instead.
        """
        window = self._window(requestor, target, epoch, now)
        a, b = sorted((requestor, target))
        params: dict[str, Any] = {
            "requestor": requestor,
            "target": target,
            "a": a,
            "b": b,
            "epoch": window.index,
        }
        with self.reading() as cur:
            row = cur.execute(_ISSUE_READ, params).fetchone()
        if row is None:
            raise RemoteAuthError(Refusal.UNKNOWN, requestor)
        me = self._requestor(requestor, row[:9])
        self._check_target(target, row[9:19])
        minted = row[19] is None
        if minted:
            found = self._new_keyset(me, self._record(target, row[9:18]), window, a, b)
        else:
            found = row[19:24]
        params.update(
            now=now,
            generation=me.generation,
            target_generation=row[10],
            mint=minted,
            ck_id=found[0],
            not_before=found[3],
            not_after=found[4],
            copy_a=found[1],
            copy_b=found[2],
            detail=audit_json(self._keyset_detail(me, target, purpose, found, window, minted)),
        )
        with self._statement(writes=True) as cur:
            written = cur.execute(_ISSUE_WRITE, params).fetchone() == (True,)
        if not written:
            return super().issue(requestor, target, purpose, epoch, now)
        return self._issued(requestor, target, window, found)

    def enrol_meters(
        self,
        *,
        seed: bytes,
        count: int,
        now: int,
        prefix: str = "meter",
        first: int = 1,
        head_end: str | None = None,
        on_progress: Callable[[int], None] = lambda done: None,
    ) -> int:
        """``desk import-meters`` for a database the desk no longer changes: one transaction.

        After ``as import-desk`` the desk refuses every change, so a growing fleet
        is enrolled here: the meters' rows (keys sealed under the desk key, as the
        desk seals them) and their pairs with ``head_end`` are streamed (``COPY``),
        with an ``import-meters`` audit row; nothing if any of it fails.
        """
        from provisioning.authserver.meters import (
            check_fleet,
            fleet_detail,
            meter_identity,
            meter_rows,
        )

        check_fleet(count, prefix, first)
        rows = meter_rows(self.sealing.seal, seed, prefix, first, count, now)
        try:
            conn = self._connection()
            with conn.transaction():
                if head_end is not None and (
                    conn.execute(
                        "SELECT 1 FROM nodes WHERE identity = %s AND revoked_at IS NULL "
                        "AND suspended_at IS NULL",
                        (head_end,),
                    ).fetchone()
                    is None
                ):
                    raise LocalAuthError(f"head-end {head_end} is not an enrolled, active node")
                cur = conn.cursor()
                done = 0
                with cur.copy(
                    "COPY nodes (identity, role, token_id, generation, sealed_keys, "
                    "personalised, enrolled_at) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
                        done += 1
                        if done % 10_000 == 0 or done == count:
                            on_progress(done)
                if head_end is not None:
                    with cur.copy("COPY pairs (a, b) FROM STDIN") as copy:
                        for index in range(first, first + count):
                            copy.write_row(sorted((meter_identity(prefix, index), head_end)))
                conn.execute(
                    "INSERT INTO audit (at, op, detail) VALUES (%s, %s, %s)",
                    (
                        now,
                        "import-meters",
                        audit_json(fleet_detail(count, prefix, first, head_end)),
                    ),
                )
        except psycopg.errors.UniqueViolation:
            last = meter_identity(prefix, first + count - 1)
            raise LocalAuthError(
                f"meters {meter_identity(prefix, first)}..{last} overlap nodes already enrolled"
            ) from None
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL: {_first_line(exc)}") from None
        return count

    def reading(self) -> contextlib.AbstractContextManager[psycopg.Cursor[Any]]:
        return self._statement(writes=False)

    @contextlib.contextmanager
    def _statement(self, *, writes: bool) -> Iterator[psycopg.Cursor[Any]]:
        """One statement on its own (autocommit): no BEGIN and COMMIT round trips.

        A statement that ``writes`` counts as a commit, answered only once a
        sync covers it, like a transaction.
        """
        try:
            yield self._connection().cursor()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL: {_first_line(exc)}") from None
        if writes:
            self.commits += 1

    def close(self) -> None:
        if self._sync_conn is not None:
            self._sync_conn.close()
        self._conn.close()
