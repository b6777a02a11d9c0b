"""The Authentication Server's key-state store: the desk's store, plus a few columns.

The AS reads and writes the desk's own tables (``provisioning/store.py``), so a
desk hands its mission to an AS by handing over its store. A migration adds
what the AS needs, without changing anything the desk does:

* ``nodes.previous_keys`` / ``previous_generation`` -- the superseded keys, kept
  to recognise a cloned token (``keystate.py``);
* ``nodes.keys_since``, ``last_auth``, ``suspended_at``;
* an index of group members (the dialogue-mate check of one pair).

Every change runs in one transaction that first locks the token's row
(``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL), so two
workers can never fork a token's key generations. :class:`SqlKeyStateStore`
holds the logic once; the SQLite and PostgreSQL stores only say how to connect,
lock and spell placeholders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import Sealer, random_bytes
from mesh.keyset import CommunicationKeyset, wrap_copy
from mesh.keyset.bundle import MAX_MATES, seal_bundle
from mesh.keyset.keyset import CK_ID_SIZE, PAIR_KEY_SIZE
from mesh.keyset.mission import Epoch, Mission
from mesh.token import SLOT_COUNT, SecureElement, Slot, slot_kid
from mesh.token.keychange import KeyChange, build_key_change
from provisioning.authserver.errors import (
    LocalAuthError,
    Refusal,
    RemoteAuthError,
    StoreUnavailable,
)
from provisioning.authserver.keystate import TokenKeys
from provisioning.authserver.messages import MAX_LINK_BUNDLE
from provisioning.bundles import (
    DISCOVERY_SECRET,
    Rows,
    build_bundle,
    mates_of,
    surely_too_many_mates,
)
from provisioning.desk import _rewrap as rewrap_copy
from provisioning.desk import derive_slot_keys
from provisioning.errors import DeskCorrupt
from provisioning.store import (
    IMPORTED_META,
    IMPORTING_META,
    Store,
    audit_entries,
    audit_json,
    open_node_keys,
    open_secret,
    seal_node_keys,
)

__all__ = [
    "AS_SCHEMA_VERSION",
    "CLONE_ALERT",
    "MAX_EPOCHS_AHEAD",
    "IssuedKeyset",
    "KeyStateStore",
    "SqlKeyStateStore",
    "SqliteKeyStateStore",
    "migrate_sqlite",
]

log = logging.getLogger("snrmesh.as")

AS_SCHEMA_VERSION = 1
OPENED_KEYS_CACHE = 4096  # opened slot-key sets per worker (a few hundred bytes each)
CHECKPOINT_EVERY = 256  # commits between the sync thread's WAL checkpoints (SQLite)
PAGE_CACHE_KIB = 65_536  # SQLite page cache per AS worker
MAX_BUNDLE_MINTS = 512  # CKs one bundle request may mint (each one a short transaction)
# a key change rewraps the node's live CK copies in its commit's transaction (~0.4 ms each),
# holding the write lock (SQLite) or the node's row (PostgreSQL): a node with more (a head-end
# paired with a fleet) keeps its keys online, and the AS says so once per worker
MAX_ONLINE_REWRAP = 4096
MAX_EPOCHS_AHEAD = 4  # a node may fetch the CKs of the next few epochs, not the whole mission
MIGRATION = (
    "ALTER TABLE nodes ADD COLUMN previous_keys BLOB",
    "ALTER TABLE nodes ADD COLUMN previous_generation INTEGER",
    "ALTER TABLE nodes ADD COLUMN keys_since INTEGER",
    "ALTER TABLE nodes ADD COLUMN last_auth INTEGER",
    "ALTER TABLE nodes ADD COLUMN suspended_at INTEGER",
    "CREATE INDEX IF NOT EXISTS groups_by_member ON groups (member, name)",
)
_IMPORT_MARKS = "SELECT 1 FROM meta WHERE key IN (?, ?)"
CLONE_ALERT = "as-clone-alert"  # the audit op of a cloned token found (and suspended)
# made at every open if missing (a store migrated before they existed gets them too): what a
# bundle request reads (a node's mates, bundles.MATES_OF) by index, not by a scan; and the
# clone alerts among a year of audit rows (one per keyset issued), by a partial index that
# only they enter
INDEXES = (
    "CREATE INDEX IF NOT EXISTS pairs_by_b ON pairs (b, a)",
    f"CREATE INDEX IF NOT EXISTS audit_alerts ON audit (seq) WHERE op = '{CLONE_ALERT}'",
)


def key_columns(table: str = "") -> str:
    """The nine columns :meth:`SqlKeyStateStore._record` reads, of ``table`` (an alias) if given."""
    t = f"{table}." if table else ""
    return (
        f"{t}token_id, {t}generation, {t}sealed_keys, {t}pending_keys, {t}previous_keys, "
        f"{t}previous_generation, COALESCE({t}keys_since, {t}enrolled_at), {t}suspended_at, "
        f"{t}revoked_at"
    )


def mates_expression(a: str, b: str) -> str:
    """SQL true when ``a`` < ``b`` (placeholders) share a group or form an explicit pair."""
    return (
        f"(EXISTS (SELECT 1 FROM pairs WHERE a = {a} AND b = {b}) OR EXISTS ("
        "SELECT 1 FROM groups g1 JOIN groups g2 ON g1.name = g2.name "
        f"WHERE g1.member = {a} AND g2.member = {b}))"
    )


_NODE = f"SELECT {key_columns()} FROM nodes WHERE identity = ?"
# the requestor's row: locked (the UPDATE takes the row lock on PostgreSQL, the write lock
# on SQLite) and read in one statement, its last_auth stamped -- the request's key-state write
_STAMP_REQUESTOR = f"UPDATE nodes SET last_auth = ? WHERE identity = ? RETURNING {key_columns()}"
# everything else issuance reads, in one statement: the target's row, whether the two are
# dialogue mates (a shared group or an explicit pair), and the pair's CK for the epoch if any
_TARGET = (
    f"SELECT {key_columns('n')}, {mates_expression('?', '?')}, "
    "k.ck_id, k.copy_a, k.copy_b, k.not_before, k.not_after "
    "FROM nodes n LEFT JOIN keysets k ON k.a = ? AND k.b = ? AND k.epoch = ? "
    "WHERE n.identity = ?"
)
_KEYSET = (
    "SELECT ck_id, copy_a, copy_b, not_before, not_after FROM keysets "
    "WHERE a = ? AND b = ? AND epoch = ?"
)


@dataclass(frozen=True, slots=True)
class IssuedKeyset:
    """A CK as the AS hands it out: the requestor's copy and the target's (the ticket)."""

    ck_id: bytes
    peer: str
    epoch: int
    not_before: int
    not_after: int
    own: str
    ticket: str


K = TypeVar("K")
V = TypeVar("V")


def remember(cache: OrderedDict[K, V], key: K, value: V, bound: int) -> None:
    """Put ``key`` last in a bounded cache (most recent last); past ``bound``, the oldest goes."""
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > bound:
        cache.popitem(last=False)


class Sealing:
    """Opening and sealing slot keys the way the desk does, with the desk's sealer.

    Takes the :class:`Sealer` rather than a desk :class:`Store` so that the
    PostgreSQL store, which holds the desk's rows but no SQLite file, seals alike.
    Opened keys are remembered (bounded LRU, keyed by the sealed blob *and* its
    associated data), since a link reads its token's row at HELLO and again when
    it is issued a keyset, and every issuance reads its target's row (a
    head-end's, over and over): the same blob always opens to the same keys.
    """

    __slots__ = ("_opened", "_sealer")

    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer
        self._opened: OrderedDict[tuple[str, bytes, int, bytes], tuple[bytes, ...]] = OrderedDict()

    def open(
        self, identity: str, token_id: bytes, generation: int, blob: bytes
    ) -> tuple[bytes, ...]:
        cache_key = (identity, token_id, generation, bytes(blob))
        keys = self._opened.get(cache_key)
        if keys is not None:
            self._opened.move_to_end(cache_key)
            return keys
        keys = open_node_keys(self._sealer, identity, token_id, generation, blob)
        remember(self._opened, cache_key, keys, OPENED_KEYS_CACHE)
        return keys

    def seal(
        self, identity: str, token_id: bytes, generation: int, keys: tuple[bytes, ...]
    ) -> bytes:
        return seal_node_keys(self._sealer, identity, token_id, generation, keys)

    def open_secret(self, name: str, blob: object) -> bytes:
        """A desk-wide secret (the discovery secret) from its sealed blob."""
        return open_secret(self._sealer, name, blob)


class KeyStateStore(ABC):
    """What the server protocol asks of its store; each call is one short transaction.

    Every call's transaction is durable when it returns, unless the caller chose
    :meth:`group_commits`: then a commit is visible at once but durable only
    after a :meth:`sync` covering it (``commits`` counts the commits made,
    ``synced`` how many of them a sync covered). A server that sends nothing
    before that sync keeps "durable before answered" while one sync (one
    ``fsync``) serves every request that committed meanwhile. A store that
    cannot group keeps both counters at 0: it is always synced.
    """

    mission: Mission
    commits: int = 0
    synced: int = 0

    def group_commits(self) -> bool:
        """Defer durability to :meth:`sync`, if this store can; says whether it does."""
        return False

    def sync(self, upto: int) -> None:
        """Make the first ``upto`` commits durable (all of them, in fact); may block on I/O.

        Called from a thread other than the one making transactions when
        :attr:`sync_in_thread` is true, so it must not touch the connection.
        A store that does not group commits has nothing to do: each was durable.
        """
        self.synced = max(self.synced, upto)

    sync_in_thread = False

    @abstractmethod
    def load(self, identity: str) -> TokenKeys | None:
        """The token's keys and status, or None for an identity never enrolled."""

    @abstractmethod
    def prepare_key_change(self, identity: str, generation: int, now: int) -> TokenKeys:
        """Record pending keys for ``generation + 1`` (or keep those already pending).

        Returns the record without pending keys when the node holds more than
        ``MAX_ONLINE_REWRAP`` live CK copies: the change is not made online.
        """

    @abstractmethod
    def commit_key_change(
        self, identity: str, new_generation: int, now: int, *, reinstate: bool = False
    ) -> None:
        """The token proved the pending keys: they become current (idempotent).

        Refused (:class:`RemoteAuthError`, ``suspended`` or ``revoked``) for a node
        suspended or revoked since the link read its row, unless ``reinstate``.

        ``reinstate``: the operator changed a suspended node's keys (:meth:`reinstate`):
        the suspension is lifted and no superseded key is kept, so the copy that set
        off the clone alert fails like a stranger.
        """

    @abstractmethod
    def suspend(self, identity: str, presented: int, now: int) -> None:
        """A superseded key was proven: suspend the identity and raise an audit alert."""

    @abstractmethod
    def issue(
        self, requestor: str, target: str, purpose: str, epoch: int | None, now: int
    ) -> IssuedKeyset:
        """The pair's CK for the epoch (minted if none), after the dialogue-mate checks."""

    @abstractmethod
    def bundle(self, identity: str, ahead: int, now: int) -> bytes:
        """The node's bundle, sealed for its token's current keys, after minting what it lacks.

        Every dialogue mate gets a CK for the current epoch and the ``ahead`` next ones
        (within the mission). Raises :class:`RemoteAuthError` for a node that may not
        have one (unknown, suspended, revoked, too many mates, too large for a link).
        """

    @abstractmethod
    def close(self) -> None: ...


class SqlKeyStateStore(KeyStateStore):
    """The store logic over a DB-API connection; subclasses supply transactions."""

    placeholder = "?"
    lock = ""  # appended to the SELECT of a token's row
    # appended to issuance's read of the target's row: a key change of the target (which
    # rewraps its copies under the row lock) must not commit between that read and the
    # issuance's commit, or the new copy would stay under the target's old WRAP key.
    # SQLite's one writer at a time already rules it out.
    target_lock = ""

    def __init__(self, sealing: Sealing, mission: Mission) -> None:
        self.sealing = sealing
        self.mission = mission
        self._deferred: set[str] = set()  # nodes whose due key change was not made (logged)

    @abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A context whose value has ``execute(sql, params)``; commits on success."""

    def reading(self) -> contextlib.AbstractContextManager[Any]:
        """A transaction that only reads; a store may take no write lock for it."""
        return self.transaction()

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _row(self, cur: Any, sql: str, params: Sequence[Any]) -> Any:
        cur.execute(self._q(sql), params)
        return cur.fetchone()

    def _exec(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> None:
        cur.execute(self._q(sql), params)

    def _audit(self, cur: Any, now: int, op: str, **detail: Any) -> None:
        self._exec(
            cur,
            "INSERT INTO audit (at, op, detail) VALUES (?, ?, ?)",
            (now, op, audit_json(detail)),
        )

    def _record(self, identity: str, row: Any) -> TokenKeys:
        token_id, gen, sealed, pending, previous, prev_gen, since, suspended, revoked = row
        token_id = bytes(token_id)
        s = self.sealing
        return TokenKeys(
            identity=identity,
            token_id=token_id,
            generation=gen,
            keys=s.open(identity, token_id, gen, sealed),
            pending=None if pending is None else s.open(identity, token_id, gen + 1, pending),
            previous=(
                None
                if previous is None or prev_gen != gen - 1
                else s.open(identity, token_id, prev_gen, previous)
            ),
            keys_since=since,
            suspended=suspended is not None or revoked is not None,
            revoked=revoked is not None,
        )

    def _locked(self, cur: Any, identity: str) -> TokenKeys:
        row = self._row(cur, _NODE + self.lock, (identity,))
        if row is None:
            raise RemoteAuthError(Refusal.UNKNOWN, identity)
        return self._record(identity, row)

    # -- KeyStateStore -----------------------------------------------------------------------

    def load(self, identity: str) -> TokenKeys | None:
        with self.reading() as cur:
            row = self._row(cur, _NODE, (identity,))
        return None if row is None else self._record(identity, row)

    def prepare_key_change(self, identity: str, generation: int, now: int) -> TokenKeys:
        with self.transaction() as cur:
            record = self._locked(cur, identity)
            if record.generation != generation:
                raise RemoteAuthError(Refusal.AUTH_FAILED, "key generation moved meanwhile")
            if record.pending is not None:
                return record
            live = self._live_copies(cur, identity, now)
            if live > MAX_ONLINE_REWRAP:
                if identity not in self._deferred:  # once per worker: it authenticates again
                    self._deferred.add(identity)
                    log.warning(
                        "keys of %s are due but not changed online: it holds more than %d live "
                        "CK copies, which a key change rewraps under one lock",
                        identity,
                        MAX_ONLINE_REWRAP,
                    )
                return record  # no pending keys: the link goes on under the current ones
            new = self._new_pending(cur, record, now)
            self._audit(
                cur,
                now,
                "as-key-change",
                node=identity,
                token=record.token_id.hex(),
                generation=generation + 1,
                outcome="sent",
            )
        return TokenKeys(
            identity,
            record.token_id,
            generation,
            record.keys,
            new,
            record.previous,
            record.keys_since,
            record.suspended,
            record.revoked,
        )

    def commit_key_change(
        self, identity: str, new_generation: int, now: int, *, reinstate: bool = False
    ) -> None:
        with self.transaction() as cur:
            record = self._locked(cur, identity)
            if record.suspended and not reinstate:  # since the link's HELLO read the row
                raise RemoteAuthError(record.barred, identity)
            if record.generation == new_generation:
                return  # another worker committed it
            if record.generation != new_generation - 1 or record.pending is None:
                raise RemoteAuthError(Refusal.AUTH_FAILED, "no such pending key change")
            old_wrap = jwk.JWK(kty="oct", k=base64url_encode(record.keys[Slot.WRAP]))
            new_wrap = jwk.JWK(kty="oct", k=base64url_encode(record.pending[Slot.WRAP]))
            new_kid = slot_kid(record.token_id, Slot.WRAP, new_generation)
            rewrapped = 0
            first_live = self._first_live_epoch(now)  # older CKs are never served again
            for column, party in (("copy_a", "a"), ("copy_b", "b")):
                cur.execute(
                    self._q(
                        f"SELECT ck_id, {column} FROM keysets WHERE {party} = ? AND epoch >= ?"
                    ),
                    (identity, first_live),
                )
                for ck_id, copy in cur.fetchall():
                    self._exec(
                        cur,
                        f"UPDATE keysets SET {column} = ? WHERE ck_id = ?",
                        (rewrap_copy(copy, old_wrap, new_wrap, new_kid), ck_id),
                    )
                    rewrapped += 1
            s = self.sealing
            self._exec(
                cur,
                "UPDATE nodes SET generation = ?, sealed_keys = ?, pending_keys = NULL, "
                "previous_keys = ?, previous_generation = ?, keys_since = ?"
                + (", suspended_at = NULL" if reinstate else "")
                + " WHERE identity = ?",
                (
                    new_generation,
                    s.seal(identity, record.token_id, new_generation, record.pending),
                    None
                    if reinstate
                    else s.seal(identity, record.token_id, record.generation, record.keys),
                    None if reinstate else record.generation,
                    now,
                    identity,
                ),
            )
            self._audit(
                cur,
                now,
                "as-key-change",
                node=identity,
                token=record.token_id.hex(),
                generation=new_generation,
                outcome="reinstated" if reinstate else "committed",
                rewrapped=rewrapped,
            )

    def reinstate(self, identity: str, token: SecureElement, now: int) -> int:
        """Lift a clone suspension by changing the trusted token's keys; the new generation.

        The AS's counterpart of ``desk rekey`` for a node suspended by a clone alert,
        for the store the desk can no longer change (PostgreSQL after ``as
        import-desk``). ``token``, its PIN verified, is the copy the operator trusts:
        at the AS's generation, or one behind when a copy took the last key change
        first (the AS kept that key). Two phases, as online: fresh pending keys
        (never ones the AS sent, which a copy may hold), the token's key change, then
        the commit; run again after a crash, it resumes.
        """
        info = token.info()
        held = info.generation(Slot.KEY_CHANGE)
        with self.transaction() as cur:
            record = self._locked(cur, identity)
            if info.token_id != record.token_id or info.identity != identity:
                raise LocalAuthError(f"that token belongs to {info.identity}, not {identity}")
            suspended, revoked, previous = self._row(
                cur,
                "SELECT suspended_at, revoked_at, previous_generation FROM nodes "
                "WHERE identity = ?",
                (identity,),
            )
            if revoked is not None:
                raise LocalAuthError(f"{identity} is revoked")
            if suspended is None:
                raise LocalAuthError(
                    f"{identity} is not suspended: the AS changes its keys at its next "
                    "authentication when they are due"
                )
            generation = record.generation
            resume = held == generation + 1 and record.pending is not None
            if not resume:
                if held == generation:
                    signer = record.keys
                elif held == generation - 1 and previous == held and record.previous is not None:
                    signer = record.previous  # the token a copy overtook
                else:
                    raise LocalAuthError(
                        f"token of {identity} is at key generation {held}, the AS holds "
                        f"{generation}: not a token of this node's recent keys"
                    )
                new = self._new_pending(cur, record, now)
                self._audit(
                    cur,
                    now,
                    "as-reinstate",
                    node=identity,
                    token=record.token_id.hex(),
                    generation=generation + 1,
                    token_generation=held,
                )
        if not resume:
            token.key_change(
                build_key_change(
                    KeyChange(record.token_id, (generation + 1,) * SLOT_COUNT, new),
                    kid=slot_kid(record.token_id, Slot.KEY_CHANGE, held),
                    current_key=signer[Slot.KEY_CHANGE],
                )
            )
        self.commit_key_change(identity, generation + 1, now, reinstate=True)
        return generation + 1

    def _new_pending(self, cur: Any, record: TokenKeys, now: int) -> tuple[bytes, ...]:
        """Record fresh keys for ``record.generation + 1`` as pending, in ``cur``'s transaction.

        Fresh OS randomness mixed (HKDF) with server-side nonces: neither alone decides.
        """
        new = derive_slot_keys(record.token_id, random_bytes(32) + now.to_bytes(8, "big"))
        sealed = self.sealing.seal(record.identity, record.token_id, record.generation + 1, new)
        self._exec(
            cur, "UPDATE nodes SET pending_keys = ? WHERE identity = ?", (sealed, record.identity)
        )
        return new

    def _first_live_epoch(self, now: int) -> int:
        """The first epoch whose CKs may still be served (past the last one: none are)."""
        m = self.mission
        return 0 if now < m.start else int((now - m.start) // m.epoch_seconds)

    def _live_copies(self, cur: Any, identity: str, now: int) -> int:
        """How many copies a key change of ``identity`` would rewrap, counted up to the bound."""
        first_live, bound = self._first_live_epoch(now), MAX_ONLINE_REWRAP + 1
        total = 0
        for party in ("a", "b"):
            (n,) = self._row(
                cur,
                f"SELECT COUNT(*) FROM (SELECT 1 FROM keysets WHERE {party} = ? AND epoch >= ? "
                "LIMIT ?) AS live",
                (identity, first_live, bound),
            )
            total += n
        return int(total)

    def suspend(self, identity: str, presented: int, now: int) -> None:
        with self.transaction() as cur:
            record = self._locked(cur, identity)
            self._exec(
                cur,
                "UPDATE nodes SET suspended_at = COALESCE(suspended_at, ?) WHERE identity = ?",
                (now, identity),
            )
            self._audit(
                cur,
                now,
                CLONE_ALERT,
                node=identity,
                token=record.token_id.hex(),
                presented_generation=presented,
                current_generation=record.generation,
                outcome="suspended",
            )
        # the operator's alarm, besides the audit row ('snrmesh as audit --alerts'); names only
        log.warning(
            "CLONE ALERT: %s (token %s) proved superseded generation %d (current %d): "
            "suspended until its trusted token's keys are changed ('snrmesh as reinstate')",
            identity,
            record.token_id.hex(),
            presented,
            record.generation,
        )

    def revoke(self, identity: str, now: int) -> bool:
        """No further keysets for ``identity`` (what ``desk revoke`` does to the desk's file).

        For a store the desk cannot reach (PostgreSQL after ``as import-desk``).
        Whether it was revoked now (False: it was already; nothing is written).
        """
        with self.transaction() as cur:
            record = self._locked(cur, identity)
            row = self._row(cur, "SELECT revoked_at FROM nodes WHERE identity = ?", (identity,))
            if row[0] is not None:
                return False
            self._exec(cur, "UPDATE nodes SET revoked_at = ? WHERE identity = ?", (now, identity))
            self._audit(cur, now, "revoke", node=identity, token=record.token_id.hex())
        return True

    def audit_log(self, op: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit rows in order (optionally one ``op``; the last ``limit`` of them).

        As the desk's ``audit_log`` shows them. ``limit`` bounds what a store
        with millions of issuances hands an operator.
        """
        where = "" if op is None else " WHERE op = ?"  # alerts: by the partial index
        tail = "" if limit is None else " LIMIT ?"
        params = (() if op is None else (op,)) + (() if limit is None else (limit,))
        with self.reading() as cur:
            self._exec(
                cur, f"SELECT seq, at, op, detail FROM audit{where} ORDER BY seq DESC{tail}", params
            )
            rows = cur.fetchall()
        return audit_entries(rows)

    def _epoch(self, epoch: int | None, now: int) -> Epoch:
        """The epoch asked (None: the current one; before the mission, its first: the
        preparatory phase is when nodes fetch their keysets), within the window."""
        m = self.mission
        current = m.epoch_at(now)
        if current is None:
            if now >= m.end:
                raise RemoteAuthError(Refusal.POLICY, "the mission is over")
            current = Epoch(0, m.start, min(m.start + m.epoch_seconds, m.end))
        if epoch is None:
            return current
        if not current.index <= epoch <= current.index + MAX_EPOCHS_AHEAD:
            raise RemoteAuthError(Refusal.POLICY, f"epoch {epoch} not available")
        start = m.start + epoch * m.epoch_seconds
        if start >= m.end:
            raise RemoteAuthError(Refusal.POLICY, "epoch after the mission's end")
        return Epoch(epoch, start, min(start + m.epoch_seconds, m.end))

    def issue(
        self, requestor: str, target: str, purpose: str, epoch: int | None, now: int
    ) -> IssuedKeyset:
        window = self._window(requestor, target, epoch, now)
        a, b = sorted((requestor, target))
        with self.transaction() as cur:
            mine = self._row(cur, _STAMP_REQUESTOR, (now, requestor))
            me = self._requestor(requestor, mine)
            row = self._row(
                cur, _TARGET + self.target_lock, (a, b, a, b, a, b, window.index, target)
            )
            self._check_target(target, row)
            minted = row[10] is None
            if minted:
                found = self._mint(cur, me, self._record(target, row[:9]), window, a, b)
            else:
                found = row[10:]
            self._audit(
                cur,
                now,
                "as-keyset",
                **self._keyset_detail(me, target, purpose, found, window, minted),
            )
        return self._issued(requestor, target, window, found)

    def bundle(self, identity: str, ahead: int, now: int) -> bytes:
        me = self.load(identity)
        if me is None:
            raise RemoteAuthError(Refusal.UNKNOWN, identity)
        if me.suspended:
            raise RemoteAuthError(me.barred, identity)
        current = self._epoch(None, now).index
        last = min(current + min(ahead, MAX_EPOCHS_AHEAD), self.mission.epoch_count - 1)
        with self.reading() as cur:
            rows = self._rows(cur)
            if surely_too_many_mates(rows, identity, MAX_MATES):
                raise RemoteAuthError(Refusal.POLICY, "too many dialogue mates for a bundle")
            mates = mates_of(rows, identity, MAX_MATES + 1, suspended=True)
            have = {
                (a if b == identity else b, epoch)
                for a, b, epoch in rows(
                    "SELECT a, b, epoch FROM keysets WHERE a = ? AND epoch BETWEEN ? AND ? "
                    "UNION ALL SELECT a, b, epoch FROM keysets WHERE b = ? "
                    "AND epoch BETWEEN ? AND ?",
                    (identity, current, last, identity, current, last),
                )
            }
        missing = [(m, e) for m in mates for e in range(current, last + 1) if (m, e) not in have]
        if len(mates) > MAX_MATES or len(missing) > MAX_BUNDLE_MINTS:
            # each CK is a transaction on the worker's loop: a node this large is the desk's job
            raise RemoteAuthError(Refusal.POLICY, "too many keysets to mint for one bundle")
        for mate, epoch in missing:
            try:
                self.issue(identity, mate, "bundle", epoch, now)
            except RemoteAuthError as exc:
                if exc.refusal is not Refusal.POLICY:  # a mate suspended meanwhile: left out
                    raise
        # built outside any write lock (a year of epochs wraps 366 discovery keys), then
        # checked under the requestor's row lock: a key change committed meanwhile (by another
        # worker) would have rewrapped the copies this bundle read, so it is built again
        for _ in range(2):
            me = self.load(identity)
            if me is None:
                raise RemoteAuthError(Refusal.UNKNOWN, identity)
            if me.suspended:
                raise RemoteAuthError(me.barred, identity)
            with self.reading() as cur:
                rows = self._rows(cur)
                ((role,),) = rows("SELECT role FROM nodes WHERE identity = ?", (identity,))
                try:
                    bundle = build_bundle(
                        rows,
                        mission=self.mission,
                        identity=identity,
                        role=role,
                        token_id=me.token_id,
                        wrap_kid=slot_kid(me.token_id, Slot.WRAP, me.generation),
                        wrap_key=me.keys[Slot.WRAP],
                        discovery_secret=self._discovery_secret(),
                        now=now,
                        suspended=True,
                    )
                except ValueError:  # mates added meanwhile (the desk edits a SQLite store)
                    raise RemoteAuthError(Refusal.POLICY, "too many dialogue mates") from None
            sealed = seal_bundle(
                bundle,
                kid=slot_kid(me.token_id, Slot.MAC, me.generation),
                mac_key=me.keys[Slot.MAC],
            )
            if len(sealed) > MAX_LINK_BUNDLE:
                raise RemoteAuthError(Refusal.POLICY, "bundle too large for a link")
            with self.transaction() as cur:
                now_keys = self._locked(cur, identity)
                if now_keys.suspended:
                    raise RemoteAuthError(now_keys.barred, identity)
                if now_keys.generation != me.generation:
                    continue  # rebuilt under the new keys
                self._audit(
                    cur,
                    now,
                    "as-bundle",
                    node=identity,
                    token=me.token_id.hex(),
                    generation=me.generation,
                    mates=len(bundle.mates),
                    keysets=len(bundle.keysets),
                    minted=len(missing),
                    epochs=[current, last],
                )
            return sealed
        raise RemoteAuthError(Refusal.UNAVAILABLE, "the token's keys keep changing")

    def _rows(self, cur: Any) -> Rows:
        """``rows(sql, params)`` on ``cur``, with this store's placeholders."""

        def rows(sql: str, params: Sequence[Any]) -> list[Any]:
            cur.execute(self._q(sql), params)
            return list(cur.fetchall())

        return rows

    @abstractmethod
    def _discovery_secret(self) -> bytes:
        """The desk's discovery secret (the epochs' discovery keys are derived from it)."""

    # -- the steps of an issuance, shared with stores that sequence them otherwise ------------

    def _window(self, requestor: str, target: str, epoch: int | None, now: int) -> Epoch:
        if requestor == target:
            raise RemoteAuthError(Refusal.POLICY, "a node is not its own dialogue mate")
        return self._epoch(epoch, now)

    def _requestor(self, requestor: str, row: Any) -> TokenKeys:
        if row is None:
            raise RemoteAuthError(Refusal.UNKNOWN, requestor)
        me = self._record(requestor, row)
        if me.suspended:
            raise RemoteAuthError(me.barred, requestor)
        return me

    @staticmethod
    def _check_target(target: str, row: Any) -> None:
        """``row``: the target's key columns (None: unknown), then whether they are mates."""
        if row is None or row[0] is None or row[7] is not None or row[8] is not None:
            raise RemoteAuthError(Refusal.POLICY, f"{target} is unknown, revoked or suspended")
        if not row[9]:
            raise RemoteAuthError(Refusal.POLICY, f"{target} is not a dialogue mate")

    @staticmethod
    def _keyset_detail(
        me: TokenKeys, target: str, purpose: str, found: Any, window: Epoch, minted: bool
    ) -> dict[str, Any]:
        """The ``as-keyset`` audit row: who, for whom, which CK -- never key material."""
        return {
            "node": me.identity,
            "token": me.token_id.hex(),
            "target": target,
            "purpose": purpose,
            "ck": bytes(found[0]).hex(),
            "epoch": window.index,
            "outcome": "minted" if minted else "existing",
        }

    @staticmethod
    def _issued(requestor: str, target: str, window: Epoch, found: Any) -> IssuedKeyset:
        ck_id, copy_a, copy_b, not_before, not_after = found
        mine = requestor < target  # the requestor is party a
        return IssuedKeyset(
            ck_id=bytes(ck_id),
            peer=target,
            epoch=window.index,
            not_before=not_before,
            not_after=not_after,
            own=copy_a if mine else copy_b,
            ticket=copy_b if mine else copy_a,
        )

    def _new_keyset(
        self, me: TokenKeys, other: TokenKeys, window: Epoch, a: str, b: str
    ) -> tuple[bytes, str, str, int, int]:
        """A fresh CK for the pair and epoch, as (ck_id, copy_a, copy_b, not_before, not_after)."""
        ck = CommunicationKeyset(
            ck_id=random_bytes(CK_ID_SIZE),
            pair_key=random_bytes(PAIR_KEY_SIZE),
            mission_id=self.mission.mission_id,
            party_a=a,
            party_b=b,
            not_before=window.start,
            not_after=window.end,
        )
        copies = {}
        for party in (me, other):
            copies[party.identity] = wrap_copy(
                ck,
                holder=party.identity,
                kid=slot_kid(party.token_id, Slot.WRAP, party.generation),
                wrap_key=party.keys[Slot.WRAP],
            )
        return (ck.ck_id, copies[a], copies[b], window.start, window.end)

    def _mint(
        self, cur: Any, me: TokenKeys, other: TokenKeys, window: Epoch, a: str, b: str
    ) -> tuple[bytes, str, str, int, int]:
        new = self._new_keyset(me, other, window, a, b)
        ck_id, copy_a, copy_b, not_before, not_after = new
        self._exec(
            cur,
            "INSERT INTO keysets (ck_id, a, b, epoch, not_before, not_after, copy_a, copy_b) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (a, b, epoch) DO NOTHING",
            (ck_id, a, b, window.index, not_before, not_after, copy_a, copy_b),
        )
        if cur.rowcount == 1:  # ours; else another worker's CK for the pair won: read it
            return new
        found: tuple[bytes, str, str, int, int] = self._row(cur, _KEYSET, (a, b, window.index))
        return found


def migrate_sqlite(db: sqlite3.Connection) -> None:
    """Add the AS's columns and index to a desk store, once (idempotent, race-free)."""

    def migrated() -> bool:
        done = db.execute("SELECT value FROM meta WHERE key = 'as_schema'").fetchone()
        if done is not None and done[0] != AS_SCHEMA_VERSION:
            raise DeskCorrupt("the store's Authentication Server schema version is unknown")
        return done is not None

    if migrated():
        _indexes(db)
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if migrated():  # another connection migrated between our check and our lock
            db.execute("ROLLBACK")
            return
        columns = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
        for statement in MIGRATION:
            name = statement.split()[5] if statement.startswith("ALTER") else None
            if name is None or name not in columns:
                db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('as_schema', ?)", (AS_SCHEMA_VERSION,))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    _indexes(db)


def _indexes(db: sqlite3.Connection) -> None:
    have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    for statement in INDEXES:
        if statement.split()[5] not in have:  # CREATE INDEX IF NOT EXISTS <name>
            db.execute(statement)


class SqliteKeyStateStore(SqlKeyStateStore):
    """The desk's SQLite file as the AS store (one connection per worker process).

    Group commits: with ``synchronous = NORMAL`` a WAL-mode commit writes its
    frames to the ``-wal`` file without an ``fsync`` (a checkpoint still syncs
    the WAL before copying it, and the database after), so :meth:`sync` is one
    ``fsync`` of the WAL file, through a descriptor of its own -- which also
    lets it run in another thread. It covers every frame written before it,
    this worker's and any other's.

    Checkpoints move too: SQLite's automatic checkpoint runs inside the commit
    that crosses 1,000 WAL pages, copying them into the database and syncing
    both files while the worker's loop waits (a fifth of an issuance's time at a
    million meters). With group commits the worker's connection turns that off
    and :meth:`sync`, in its thread, runs a ``PASSIVE`` checkpoint on a
    connection of its own every :data:`CHECKPOINT_EVERY` commits: it never
    blocks a writer, and whatever it cannot copy yet waits for the next one.
    """

    sync_in_thread = True

    def __init__(self, store: Store, mission: Mission) -> None:
        super().__init__(Sealing(store.sealer), mission)
        self.store = store
        self._wal = f"{store.path}-wal"
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointed = 0  # commits covered by the last checkpoint
        store.db.execute("PRAGMA busy_timeout = 10000")
        # the interior pages of a million-meter store's B-trees alone (~5 MiB) pass SQLite's
        # default 2 MiB cache, and each issuance descends half a dozen of them
        store.db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        migrate_sqlite(store.db)

    def group_commits(self) -> bool:
        self.store.db.execute("PRAGMA synchronous = NORMAL")
        self.store.db.execute("PRAGMA wal_autocheckpoint = 0")  # sync() checkpoints instead
        return True

    def _checkpoint(self, upto: int) -> None:
        """A PASSIVE checkpoint, from the sync thread, on a connection of its own."""
        if upto - self._checkpointed < CHECKPOINT_EVERY:
            return
        self._checkpointed = upto
        try:
            if self._checkpointer is None:
                # used by one sync at a time (GroupCommit), from whichever executor thread
                self._checkpointer = sqlite3.connect(
                    f"file:{self.store.path}?mode=rw",
                    uri=True,
                    check_same_thread=False,
                    isolation_level=None,
                )
                self._checkpointer.execute("PRAGMA synchronous = NORMAL")
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the commits are durable already: only log it
            log.warning("AS store checkpoint failed: %s", exc)

    def sync(self, upto: int) -> None:
        if self.synced >= upto:
            return
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            fd = -1  # no WAL: every commit so far was checkpointed (and synced) already
        except OSError as exc:
            raise StoreUnavailable(f"store sync failed: {exc}") from None
        if fd >= 0:
            try:
                os.fsync(fd)
            except OSError as exc:
                raise StoreUnavailable(f"store sync failed: {exc}") from None
            finally:
                os.close(fd)
        self.synced = max(self.synced, upto)
        self._checkpoint(upto)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], passphrase: str) -> SqliteKeyStateStore:
        from provisioning.desk import Desk  # the desk parses and checks the mission record

        store = Store.open(directory, passphrase)
        try:
            desk = Desk(store)
            where = desk.imported()
        except BaseException:
            store.close()
            raise
        if where is not None:  # two AS stores would fork every token's key state
            store.close()
            raise LocalAuthError(f"{where}: use that database (--postgres DSN), not this file")
        return cls(desk.store, desk.mission)

    def _discovery_secret(self) -> bytes:
        return self.store.secret(DISCOVERY_SECRET)

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Cursor]:
        """A cursor in autocommit mode: each statement is its own read transaction.

        The callers run one statement (a HELLO's key lookup), so this is the
        deferred transaction they need -- no write lock, never waiting for
        another worker's write -- without a BEGIN and COMMIT of its own.
        """
        try:
            yield self.store.db.cursor()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store failed: {exc}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        db = self.store.db
        try:
            db.execute("BEGIN IMMEDIATE")
            # 'as import-desk' may mark the desk while this worker serves it: from the mark on,
            # the key state lives in PostgreSQL, and a key change here would fork it
            marked = db.execute(_IMPORT_MARKS, (IMPORTED_META, IMPORTING_META)).fetchone()
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreUnavailable(f"store busy: {exc}") from None
        if marked is not None:
            db.execute("ROLLBACK")
            raise StoreUnavailable("this desk was imported into PostgreSQL: serve that database")
        cur = db.cursor()
        try:
            yield cur
            db.execute("COMMIT")
            # even one that changed nothing: what it read (another worker's commit,
            # maybe not yet synced) may be acted on, so it waits for a sync too
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreUnavailable(f"store failed: {exc}") from None
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.store.close()  # the last connection to close checkpoints what is left
