"""PostgreSQL as the Authentication Server's store: several workers (or hosts) on one database.

The desk stays a SQLite file on an offline machine; ``snrmesh as import-desk``
copies its mission, nodes, groups, pairs, keysets and audit log into an empty
PostgreSQL database once (``desk_import.py``). From then on the database is
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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import psycopg

from mesh.crypto.primitives import CryptoError
from mesh.keyset import KeysetError
from mesh.keyset.mission import Mission
from provisioning.authserver.errors import (
    LocalAuthError,
    Refusal,
    RemoteAuthError,
    StoreUnavailable,
)
from provisioning.authserver.keystate import TokenKeys
from provisioning.authserver.store import (
    AS_SCHEMA_VERSION,
    IssuedKeyset,
    Sealing,
    SqlKeyStateStore,
    key_columns,
    mates_expression,
    remember,
)
from provisioning.bundles import DISCOVERY_SECRET
from provisioning.errors import DeskCorrupt
from provisioning.store import audit_json, open_sealer

__all__ = ["MAX_DSN_LENGTH", "SCHEMA", "TABLES", "PostgresKeyStateStore", "connect", "first_line"]

MAX_DSN_LENGTH = 1024
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
# The write also holds the pair to the dialogue-mate policy, so that it may run without the
# read (``issue``'s one-statement path, on records this worker opened before).
_ISSUE_WRITE = f"""
WITH peer AS (
    SELECT 1 FROM nodes
    WHERE identity = %(target)s AND generation = %(target_generation)s
      AND suspended_at IS NULL AND revoked_at IS NULL
      AND {mates_expression("%(a)s", "%(b)s")}
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
MAX_REMEMBERED = 4096  # opened records a worker keeps for issuance's one-statement path


def connect(dsn: str) -> psycopg.Connection[Any]:
    if len(dsn) > MAX_DSN_LENGTH:
        raise LocalAuthError(f"the PostgreSQL DSN is longer than {MAX_DSN_LENGTH} characters")
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot connect to PostgreSQL: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        # records opened for a link (its HELLO's load) and for issuance (targets): issuance
        # mints from them and writes in one statement, which re-checks all they decided on
        self._loaded: OrderedDict[str, TokenKeys] = OrderedDict()
        self._targets: OrderedDict[str, TokenKeys] = OrderedDict()

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
                conn = self._sync_conn = connect(self._dsn)
                conn.execute("SET synchronous_commit = on")
            conn.execute("SELECT pg_logical_emit_message(true, 'snrmesh-as-sync', '')")
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL sync: {first_line(exc)}") from None
        self.synced = max(self.synced, upto)

    @classmethod
    def open(cls, dsn: str, passphrase: str) -> PostgresKeyStateStore:
        conn = connect(dsn)
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
            raise StoreUnavailable(f"PostgreSQL: {first_line(exc)}") from None
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
            self._conn = connect(self._dsn)
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
            raise StoreUnavailable(f"PostgreSQL: {first_line(exc)}") from None
        # even one that changed nothing: what it read may be another worker's commit,
        # not yet flushed, so whatever it answers waits for a sync too
        self.commits += 1

    def load(self, identity: str) -> TokenKeys | None:
        record = super().load(identity)
        if record is not None:  # the link's HELLO: its requests are issued from this record
            remember(self._loaded, identity, record, MAX_REMEMBERED)
        return record

    def issue(
        self, requestor: str, target: str, purpose: str, epoch: int | None, now: int
    ) -> IssuedKeyset:
        """One round trip in the common case, two else, no BEGIN or COMMIT.

        Each round trip costs the AS and PostgreSQL more CPU than the statement
        it carries, and the transaction of the shared implementation takes six.
        A new CK for a requestor whose record this worker opened at the link's
        HELLO, with a target whose record it opened before (a fleet's head-end),
        is minted from those records and written in one statement, which
        re-checks under its row locks everything they decided: both
        generations (the copies' WRAP keys), neither node suspended or revoked,
        the two dialogue mates, no CK for the pair and epoch yet. If any of it
        does not hold, or a record is missing, one statement reads it all and
        a second writes; should that write find that something moved since the
        read, the shared implementation issues under its row locks instead.
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
        me, other = self._loaded.pop(requestor, None), self._targets.get(target)
        if me is not None and other is not None and not (me.suspended or other.suspended):
            found = self._new_keyset(me, other, window, a, b)
            detail = self._keyset_detail(me, target, purpose, found, window, True)
            if self._write(params, now, me, other.generation, found, True, detail):
                return self._issued(requestor, target, window, found)
            self._targets.pop(target, None)  # something moved: read it all again
        with self.reading() as cur:
            row = cur.execute(_ISSUE_READ, params).fetchone()
        if row is None:
            raise RemoteAuthError(Refusal.UNKNOWN, requestor)
        me = self._requestor(requestor, row[:9])
        self._check_target(target, row[9:19])
        minted = row[19] is None
        if minted:
            other = self._record(target, row[9:18])
            remember(self._targets, target, other, MAX_REMEMBERED)
            found = self._new_keyset(me, other, window, a, b)
        else:
            found = row[19:24]
        detail = self._keyset_detail(me, target, purpose, found, window, minted)
        if not self._write(params, now, me, row[10], found, minted, detail):
            return super().issue(requestor, target, purpose, epoch, now)
        return self._issued(requestor, target, window, found)

    def _write(
        self,
        params: dict[str, Any],
        now: int,
        me: TokenKeys,
        target_generation: int,
        found: Any,
        mint: bool,
        detail: dict[str, Any],
    ) -> bool:
        """Issuance's one write (``_ISSUE_WRITE``); False if something it re-checks moved."""
        params.update(
            now=now,
            generation=me.generation,
            target_generation=target_generation,
            mint=mint,
            ck_id=found[0],
            not_before=found[3],
            not_after=found[4],
            copy_a=found[1],
            copy_b=found[2],
            detail=audit_json(detail),
        )
        with self._statement(writes=True) as cur:
            written: bool = cur.execute(_ISSUE_WRITE, params).fetchone() == (True,)
        return written

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
            METER_ROLE,
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
                        "AND suspended_at IS NULL AND role <> %s",
                        (head_end, METER_ROLE),
                    ).fetchone()
                    is None
                ):
                    raise LocalAuthError(
                        f"head-end {head_end} is not an enrolled, active node (nor a meter)"
                    )
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
            raise StoreUnavailable(f"PostgreSQL: {first_line(exc)}") from None
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
            raise StoreUnavailable(f"PostgreSQL: {first_line(exc)}") from None
        if writes:
            self.commits += 1

    def close(self) -> None:
        if self._sync_conn is not None:
            self._sync_conn.close()
        self._conn.close()
