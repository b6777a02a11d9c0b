"""``snrmesh as import-desk``: a desk's mission into PostgreSQL, once, crash-safe.

The desk (a SQLite file) and PostgreSQL cannot commit together, yet from the
import on the mission's key state must live in exactly one of them: a token
whose keys change in one while the other still serves or exports it would
fork. So the desk is marked first (:data:`~provisioning.store.IMPORTING_META`,
naming the target database) and confirmed after
(:data:`~provisioning.store.IMPORTED_META`); every desk write refuses once
either mark is there (``Store.transaction``), a run holds an advisory lock on
its database while it copies, and a re-run or ``--abandon`` resolves whatever
a crash left (docs/authentication-server.md, "Getting the mission into
PostgreSQL").
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from mesh.crypto import random_bytes
from mesh.timefmt import utc_iso
from provisioning.authserver.errors import LocalAuthError, StoreUnavailable
from provisioning.authserver.postgres import SCHEMA, TABLES, connect, first_line
from provisioning.authserver.store import AS_SCHEMA_VERSION
from provisioning.bundles import DISCOVERY_SECRET
from provisioning.errors import DeskCorrupt
from provisioning.store import (
    IMPORTED_META,
    IMPORTING_META,
    Store,
    audit_json,
    marked_database,
)

__all__ = ["abandon_import", "import_desk"]

T = TypeVar("T")
PROGRESS_EVERY = 10_000  # rows between two progress reports of the copy
# what 'as serve' takes of each table, given by '--grant ROLE': the audit log can only grow
# (the triggers do not bind a table's owner, who may disable them: the AS must not own it)
AS_GRANTS = (
    ("SELECT", "mission"),
    ("SELECT", "groups"),
    ("SELECT", "pairs"),
    ("SELECT, UPDATE", "nodes"),  # UPDATE: key changes, revocations, and the FOR UPDATE locks
    ("SELECT, INSERT, UPDATE", "keysets"),
    ("SELECT, INSERT", "audit"),
)
_UNKNOWN = b"?"  # what a database holds when it cannot say (mission ids are 16 bytes)


def import_desk(
    store: Store,
    dsn: str,
    *,
    now: int,
    source: str,
    grant: str | None = None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, int]:
    """Copy a desk's mission into an empty PostgreSQL database, in one transaction.

    Refuses a database that already holds a mission: importing twice would fork
    the key state (the AS changes keys in PostgreSQL, not in the desk's file).
    Rows are streamed (``COPY``) from one snapshot of the desk, so a million
    meters need no more memory than a few. Returns the rows copied per table
    (``resumed``: 1 when it only confirmed an import whose copy had committed).
    ``on_progress(done, total)`` follows the rows as they are copied. ``grant``: a
    role given what serving takes (:data:`AS_GRANTS`), for ``as serve`` to run under.

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
    with contextlib.closing(connect(dsn)) as conn:
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
                counts = _copy_mission(
                    conn, store, meta, now=now, source=source, on_progress=on_progress
                )
                if grant is not None:
                    _grant(conn, grant)
                if _desk_mark(store.db, IMPORTING_META) != run:  # '--abandon --force' meanwhile
                    raise LocalAuthError(
                        "the desk's import mark was cleared while the copy ran: nothing was "
                        "committed in PostgreSQL; run the import again"
                    )
                committing = True  # past the body: only the COMMIT can fail now
        except (psycopg.Error, sqlite3.Error, LocalAuthError, DeskCorrupt) as exc:
            if committing:  # the COMMIT's outcome is unknown: the safe side keeps the mark
                held = _UNKNOWN
            else:
                try:
                    held = _held_mission(conn)
                except psycopg.Error:
                    held = _UNKNOWN  # cannot tell: the safe side keeps the mark
            if held in (mission_id, _UNKNOWN):
                raise StoreUnavailable(
                    f"the import into {into} is not confirmed ({first_line(exc)}): run the "
                    "same command again, which finishes it"
                ) from None
            _unmark(store, run)  # nothing of ours committed there
            if isinstance(exc, sqlite3.Error):
                raise DeskCorrupt(f"cannot read the desk store: {exc}") from None
            if isinstance(exc, LocalAuthError | DeskCorrupt):
                raise
            raise StoreUnavailable(f"import into PostgreSQL failed: {first_line(exc)}") from None
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
    into = marked_database(started)
    with contextlib.ExitStack() as stack:
        if dsn is not None:
            conn = stack.enter_context(contextlib.closing(connect(dsn)))
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
            going = None if started is None else marked_database(started)
            # even when this database holds the mission (a desk restored from a backup and
            # imported again): the marked import may have committed too, so it is settled first
            if going is not None and not _same_database(going, into):
                raise LocalAuthError(
                    f"an import of this desk into {going} is running or was interrupted: once "
                    "it is not running, run it again against that database (it resumes), or "
                    "abandon it ('--abandon'); "
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
    on_progress: Callable[[int, int], None] = lambda done, total: None,
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
        total = sum(
            desk_db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table, _ in TABLES
        )
        done = 0
        on_progress(done, total)
        for table, columns in TABLES:
            have = {r[1] for r in desk_db.execute(f"PRAGMA table_info({table})")}
            select = ", ".join(c if c in have else "NULL" for c in columns)
            n = 0
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in desk_db.execute(f"SELECT {select} FROM {table}"):
                    copy.write_row(row)
                    n += 1
                    if n % PROGRESS_EVERY == 0:
                        on_progress(done + n, total)
            counts[table] = n
            done += n
            on_progress(done, total)
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


def _grant(conn: psycopg.Connection[Any], role: str) -> None:
    """Give ``role`` what serving takes of the tables just made, and nothing more."""
    who = sql.Identifier(role)
    for privileges, table in AS_GRANTS:
        conn.execute(
            sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privileges), sql.Identifier(table), who)
        )
    conn.execute(
        sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(sql.Identifier("audit_seq_seq"), who)
    )


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
        raise StoreUnavailable(f"PostgreSQL: {first_line(exc)}") from None


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
