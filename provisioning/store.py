"""The desk's SQLite store: schema, transactions, and the passphrase seal.

One file, ``DIR/desk.sqlite``. Secrets (every node's slot keys) are sealed
under a key derived from the desk passphrase (scrypt, :mod:`mesh.crypto.sealing`)
with the row's identity as associated data, so a sealed blob copied onto
another row does not open. CK copies are stored as issued: they are already
encrypted (JWE) under the parties' token keys. The audit table is append-only,
enforced by triggers. Every change runs in one transaction: a failure leaves
the store as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cbor2

from mesh.crypto import InvalidTag, Sealer, SealingParams
from mesh.crypto.primitives import CryptoError
from mesh.errors import sqlite_reason
from mesh.files import create_private
from mesh.timefmt import utc_iso
from provisioning.errors import (
    DeskCorrupt,
    DeskError,
    DeskNotFound,
    PolicyError,
    WrongPassphrase,
)

__all__ = [
    "IMPORTED_META",
    "IMPORTING_META",
    "STORE_NAME",
    "Store",
    "audit_entries",
    "audit_json",
    "marked_database",
    "open_node_keys",
    "open_sealer",
    "open_secret",
    "seal_node_keys",
]

STORE_NAME = "desk.sqlite"
# 'as import-desk' marks the desk's meta: the database a copy went to (before it commits), then
# when it was confirmed; with either mark, token keys may change there, not in this file
IMPORTING_META = "as_importing_into"
IMPORTED_META = "as_imported_at"


def marked_database(mark: object) -> str:
    """The database an ``IMPORTING_META`` mark names ("<database>#<run id>")."""
    text = str(mark)
    return text.rpartition("#")[0] or text


SCHEMA_VERSION = 1
CANARY = b"snrmesh desk canary v1"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE nodes (
    identity     TEXT PRIMARY KEY,
    role         TEXT NOT NULL,
    token_id     BLOB NOT NULL UNIQUE,
    generation   INTEGER NOT NULL,
    sealed_keys  BLOB NOT NULL,
    pending_keys BLOB,
    personalised INTEGER NOT NULL DEFAULT 0,
    enrolled_at  INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE TABLE groups (
    name   TEXT NOT NULL,
    member TEXT NOT NULL REFERENCES nodes(identity),
    PRIMARY KEY (name, member)
);
CREATE TABLE pairs (
    a TEXT NOT NULL REFERENCES nodes(identity),
    b TEXT NOT NULL REFERENCES nodes(identity),
    PRIMARY KEY (a, b),
    CHECK (a < b)
);
CREATE TABLE keysets (
    ck_id      BLOB PRIMARY KEY,
    a          TEXT NOT NULL,
    b          TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    copy_a     TEXT NOT NULL,
    copy_b     TEXT NOT NULL,
    UNIQUE (a, b, epoch)
);
CREATE INDEX keysets_by_b ON keysets (b, epoch);
CREATE TABLE audit (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    op     TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    return db


def open_secret(sealer: Sealer, name: str, blob: object) -> bytes:
    """A desk-wide secret from its sealed blob (associated data: its name)."""
    if not isinstance(blob, bytes):
        raise DeskCorrupt(f"desk secret {name!r} is malformed")
    try:
        return sealer.open(blob, name.encode())
    except InvalidTag:
        raise DeskCorrupt(f"desk secret {name!r} does not open (store tampered?)") from None


def desk_file(directory: str | os.PathLike[str]) -> Path:
    """The desk's store file in ``directory``, or ``DeskNotFound``.

    Commands call it before they ask for the passphrase, so that a mistyped folder
    is named at once instead of after the passphrase has been typed.
    """
    path = Path(directory) / STORE_NAME
    if not path.is_file():
        raise DeskNotFound(f"no desk in {directory} (create one with 'snrmesh desk init')")
    return path


class Store:
    """An open desk store: a SQLite connection plus the passphrase sealer."""

    def __init__(self, db: sqlite3.Connection, sealer: Sealer, path: Path) -> None:
        self.db = db
        self.sealer = sealer
        self.path = path

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        passphrase: str,
        meta: dict[str, bytes | int | str],
        *,
        secrets: dict[str, bytes] | None = None,
    ) -> Store:
        """Create a new store; written under a temporary name and renamed when complete."""
        folder = Path(directory)
        target = folder / STORE_NAME
        if target.exists():
            raise DeskError(f"{folder} already holds a desk; refusing to overwrite it")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, or a parent that cannot hold a folder
            raise DeskError(f"cannot create the desk folder {folder}: {exc.strerror}") from None
        # a name of its own, made anew and private: nothing planted there is written through
        tmp = folder / f".{STORE_NAME}.{os.urandom(8).hex()}.tmp"
        params = SealingParams.generate()
        sealer = Sealer(passphrase, params)
        try:
            made = create_private(tmp)
        except OSError as exc:
            raise DeskError(f"cannot create the desk in {folder}: {exc.strerror}") from None
        if not made:  # 64 random bits taken: something else is writing here
            raise DeskError(f"cannot create the desk in {folder}: {tmp.name} exists")
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.executescript(SCHEMA)
            rows: dict[str, bytes | int | str] = {
                **meta,
                "schema": SCHEMA_VERSION,
                "kdf": cbor2.dumps([params.salt, params.n, params.r, params.p]),
                "canary": sealer.seal(CANARY, b"canary"),
                **{
                    f"sealed:{name}": sealer.seal(value, name.encode())
                    for name, value in (secrets or {}).items()
                },
            }
            db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
            db.close()
            os.replace(tmp, target)
        except BaseException:
            db.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return cls(_connect(target), sealer, target)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], passphrase: str) -> Store:
        path = desk_file(directory)
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
        try:
            meta = dict(
                db.execute("SELECT key, value FROM meta WHERE key IN ('schema','kdf','canary')")
            )
            if meta.get("schema") != SCHEMA_VERSION:
                raise DeskCorrupt(f"desk store {path} has an unknown schema version")
            sealer = open_sealer(passphrase, meta["kdf"], meta["canary"])
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            db.close()
            why = sqlite_reason(exc)
            if why is not None:
                raise DeskError(f"desk store {path}: {why} ({exc})") from None
            raise DeskCorrupt(f"desk store {path} is corrupt: {exc}") from None
        except (KeyError, ValueError, TypeError, CryptoError, cbor2.CBORDecodeError):
            db.close()
            raise DeskCorrupt(f"desk store {path} is corrupt (bad metadata)") from None
        except DeskError:
            db.close()
            raise
        return cls(db, sealer, path)

    def close(self) -> None:
        self.db.close()

    def imported(self) -> str | None:
        """Where 'as import-desk' took this desk's key state, if it did: then it is stale.

        From the moment an import begins: should it crash after its copy
        committed, keys may change there before the desk learns of it.
        """
        done, going = (
            self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            for key in (IMPORTED_META, IMPORTING_META)
        )
        if done is not None:
            return f"this desk was imported into PostgreSQL ({utc_iso(done[0])})"
        if going is not None:
            into = marked_database(going[0])
            return (
                f"an import of this desk into {into} began and is not confirmed (finish it "
                "with the same 'snrmesh as import-desk DIR --postgres DSN': it resumes or "
                "completes; or, if it never committed, 'snrmesh as import-desk DIR --abandon "
                "--postgres DSN')"
            )
        return None

    @contextlib.contextmanager
    def transaction(self, *, imported: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

        Refuses (:class:`PolicyError`) once 'as import-desk' marked the desk --
        checked under the write lock, so no write slips in after the mark --
        but for the import's own marks (``imported=True``): from then on the
        mission's key state and policy live in PostgreSQL, and a change made
        here (a revocation, a pair, a node) would never reach the AS.
        """
        self.db.execute("BEGIN IMMEDIATE")
        if not imported and (where := self.imported()) is not None:
            self.db.execute("ROLLBACK")
            raise PolicyError(
                f"{where}: the mission's keys and policy live there now, and this file "
                "changes nothing the AS sees (revoke with 'snrmesh as revoke NODE --postgres "
                "DSN'; nodes fetch bundles with 'snrmesh as bundle')"
            )
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk): the first error is the one
            # to tell, not "cannot rollback - no transaction is active"
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    def meta(self, key: str) -> bytes | int | str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise DeskCorrupt(f"desk store lacks {key!r}")
        value: bytes | int | str = row[0]
        return value

    def secret(self, name: str) -> bytes:
        """A desk-wide secret sealed at creation (e.g. the discovery master key)."""
        return open_secret(self.sealer, name, self.meta(f"sealed:{name}"))

    def seal_keys(
        self, identity: str, token_id: bytes, generation: int, keys: tuple[bytes, ...]
    ) -> bytes:
        return seal_node_keys(self.sealer, identity, token_id, generation, keys)

    def open_keys(
        self, identity: str, token_id: bytes, generation: int, blob: bytes
    ) -> tuple[bytes, ...]:
        return open_node_keys(self.sealer, identity, token_id, generation, blob)


def open_sealer(passphrase: str, kdf: object, canary: object) -> Sealer:
    """The desk's sealer from its stored scrypt parameters, checked against the canary.

    Apart from :class:`Store` so that a store holding the desk's rows elsewhere
    (the Authentication Server's PostgreSQL copy) opens them with the same key.
    Raises :class:`WrongPassphrase`, or ``KeyError``/``ValueError``/``TypeError``/
    ``CryptoError``/``CBORDecodeError`` on malformed metadata.
    """
    if not isinstance(kdf, bytes) or not isinstance(canary, bytes):
        raise TypeError("desk kdf and canary must be bytes")
    salt, n, r, p = cbor2.loads(kdf)
    sealer = Sealer(passphrase, SealingParams(salt=salt, n=n, r=r, p=p))
    try:
        sealer.open(canary, b"canary")
    except InvalidTag:
        raise WrongPassphrase("wrong desk passphrase") from None
    return sealer


_AUDIT_JSON = json.JSONEncoder(sort_keys=True)  # made once; json.dumps makes one per call


def audit_json(detail: dict[str, Any]) -> str:
    """An audit row's ``detail`` column: JSON with sorted keys, written alike by every writer.

    The desk, the fleet import and the AS (once per keyset issued) share it.
    """
    return _AUDIT_JSON.encode(detail)


MAX_AUDIT_TIME = 2**40  # seconds: a time past that is no writer's (and no strftime's)


def audit_entries(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """Audit rows ``(seq, at, op, detail)``, newest first as read, as entries oldest first.

    One parser for the desk's and the AS's audit readers: a row that is not what
    the writers write (a tampered store) is :class:`DeskCorrupt`, not a traceback.
    """
    entries = []
    for seq, at, op, detail in rows:
        try:
            parsed = json.loads(detail)
        except (TypeError, ValueError, RecursionError):
            parsed = None
        if (
            not isinstance(parsed, dict)
            or type(at) is not int
            or not 0 <= at < MAX_AUDIT_TIME
            or not isinstance(op, str)
        ):
            raise DeskCorrupt(f"audit entry #{seq} is corrupt (store tampered?)")
        entries.append({**parsed, "seq": seq, "at": at, "op": op})  # the columns win
    entries.reverse()
    return entries


def seal_node_keys(
    sealer: Sealer, identity: str, token_id: bytes, generation: int, keys: tuple[bytes, ...]
) -> bytes:
    """A node's slot keys sealed under the desk key, bound to its row and generation."""
    return sealer.seal(cbor2.dumps(list(keys)), _keys_aad(identity, token_id, generation))


def open_node_keys(
    sealer: Sealer, identity: str, token_id: bytes, generation: int, blob: bytes
) -> tuple[bytes, ...]:
    try:
        keys = cbor2.loads(sealer.open(bytes(blob), _keys_aad(identity, token_id, generation)))
    except (InvalidTag, cbor2.CBORDecodeError):
        raise DeskCorrupt(f"sealed keys of {identity} do not open (store tampered?)") from None
    if not isinstance(keys, list) or not all(isinstance(k, bytes) for k in keys):
        raise DeskCorrupt(f"sealed keys of {identity} are malformed")
    return tuple(keys)


def _keys_aad(identity: str, token_id: bytes, generation: int) -> bytes:
    return cbor2.dumps(["snrmesh desk node keys", identity, token_id, generation])
