"""The provisioning desk: missions, nodes, dialogue mates, keysets and bundles.

Everything a node needs in the field is prepared here before the mission (the
seed's SAS in its preparatory phase). Every operation takes ``now`` (POSIX
seconds) from the caller, runs in one store transaction and appends to the
audit log (never a secret). Operations that write a token file do so inside
the transaction and undo it if the transaction fails, so a failed command
leaves every file as it was; killed before it could undo them, it leaves a
locked record of them beside the store, and the next command that writes
tokens removes those its rollback orphaned (``_tokens_in_flight``). A card
(``--token pcsc:READER``) is personalised and closed as the transaction's last
step: a failure before that leaves it open, to be personalised again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import hkdf_sha256, random_bytes
from mesh.files import FileTooLarge, read_bounded, sync_folder, write_atomic
from mesh.keyset import KeysetError, check_identity, decrypt_copy, read_copy_header, wrap_copy
from mesh.keyset.bundle import Bundle, seal_bundle
from mesh.keyset.copies import DiscoveryKey, read_wrapped_kid
from mesh.keyset.keyset import MISSION_ID_SIZE, CommunicationKeyset
from mesh.keyset.mission import Epoch, Mission
from mesh.timefmt import utc_iso as _ts
from mesh.token import (
    KEY_SIZE,
    SLOT_COUNT,
    TOKEN_ID_SIZE,
    SecureElement,
    Slot,
    TokenError,
    slot_kid,
)
from mesh.token.keychange import KeyChange, build_key_change
from mesh.token.open import is_card, personalise_token
from mesh.token.software import SoftwareToken, check_pin
from provisioning.bundles import (
    DISCOVERY_SECRET,
    PERMITTED_PAIRS,
    build_bundle,
    discovery_key,
    mates_of,
)
from provisioning.errors import (
    DeskCorrupt,
    DeskError,
    DuplicateNode,
    MissionError,
    PolicyError,
    UnknownNode,
)
from provisioning.issuance import CkJob, WrapTarget, mint_keysets
from provisioning.plan import MissionPlan, check_role
from provisioning.store import Store, audit_entries, audit_json

__all__ = ["Desk", "IssueReport", "NodeRecord", "derive_slot_keys"]

SLOT_KEY_INFO = b"snrmesh token slot keys v1"
MAX_SEED_SIZE = 4096
FIRST_GENERATION = 1
# beside desk.sqlite while a command writes token files: CBOR {absolute path: token id}
TOKENS_IN_FLIGHT = ".tokens-in-flight."
MAX_IN_FLIGHT_SIZE = 16 * 1024 * 1024


def derive_slot_keys(token_id: bytes, seed: bytes | None) -> tuple[bytes, ...]:
    """Fresh slot keys: OS randomness mixed by HKDF with an optional external seed (ESAC 4).

    The external seed can only add entropy: with an empty or known seed the keys
    are still as strong as ``os.urandom``.
    """
    if seed is not None and len(seed) > MAX_SEED_SIZE:
        raise DeskError(f"external seed larger than {MAX_SEED_SIZE} bytes")
    okm = hkdf_sha256(
        random_bytes(32) + (seed or b""),
        salt=token_id,
        info=SLOT_KEY_INFO,
        length=KEY_SIZE * SLOT_COUNT,
    )
    return tuple(okm[i * KEY_SIZE : (i + 1) * KEY_SIZE] for i in range(SLOT_COUNT))


@dataclass(frozen=True, slots=True)
class NodeRecord:
    identity: str
    role: str
    token_id: bytes
    generation: int
    personalised: bool
    revoked: bool


@dataclass(frozen=True, slots=True)
class IssueReport:
    pairs: int
    epochs: int
    issued: int
    skipped_existing: int


class Desk:
    """An open desk. Use :meth:`init` or :meth:`open`, then :meth:`close`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        db = store.db
        try:
            self.mission = Mission(
                mission_id=bytes(store.meta("mission_id")),  # type: ignore[arg-type]
                name=str(store.meta("name")),
                start=int(store.meta("start")),
                end=int(store.meta("end")),
                epoch_seconds=int(store.meta("epoch_seconds")),
            )
        except (KeysetError, TypeError, ValueError) as exc:
            raise DeskCorrupt(f"desk mission record is corrupt: {exc}") from None
        self._db = db

    # -- lifecycle --------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        passphrase: str,
        name: str,
        start: int,
        end: int,
        epoch_seconds: int,
        now: int,
    ) -> Desk:
        try:  # before any file is made: the desk prints and audits these dates
            _ts(start), _ts(end)
        except (ValueError, OverflowError, OSError):
            raise MissionError("the mission window must end before the year 10000") from None
        if end <= now:
            raise MissionError(f"the mission window ends in the past ({_ts(end)})")
        try:
            mission = Mission(random_bytes(MISSION_ID_SIZE), name, start, end, epoch_seconds)
        except KeysetError as exc:
            raise MissionError(str(exc)) from None
        store = Store.create(
            directory,
            passphrase,
            {
                "mission_id": mission.mission_id,
                "name": mission.name,
                "start": mission.start,
                "end": mission.end,
                "epoch_seconds": mission.epoch_seconds,
            },
            secrets={DISCOVERY_SECRET: random_bytes(32)},
        )
        desk = cls(store)
        with store.transaction():
            desk._audit(
                now,
                "init",
                mission=name,
                mission_id=mission.mission_id.hex(),
                start=_ts(start),
                end=_ts(end),
                epochs=mission.epoch_count,
            )
        return desk

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, passphrase: str) -> Desk:
        return cls(Store.open(directory, passphrase))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Desk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------------

    def _audit(self, now: int, op: str, **detail: Any) -> None:
        self._db.execute(
            "INSERT INTO audit (at, op, detail) VALUES (?, ?, ?)",
            (now, op, audit_json(detail)),
        )

    def node(self, identity: str) -> NodeRecord:
        row = self._db.execute(
            "SELECT identity, role, token_id, generation, personalised, revoked_at "
            "FROM nodes WHERE identity = ?",
            (identity,),
        ).fetchone()
        if row is None:
            raise UnknownNode(f"unknown node {identity!r} (enrol it first)")
        return NodeRecord(row[0], row[1], row[2], row[3], bool(row[4]), row[5] is not None)

    def nodes(self) -> list[NodeRecord]:
        return [
            NodeRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5] is not None)
            for r in self._db.execute(
                "SELECT identity, role, token_id, generation, personalised, revoked_at "
                "FROM nodes ORDER BY identity"
            )
        ]

    def _active(self, identity: str) -> NodeRecord:
        node = self.node(identity)
        if node.revoked:
            raise PolicyError(f"node {identity} is revoked")
        return node

    def _keys(self, identity: str, *, pending: bool = False) -> tuple[bytes, ...]:
        row = self._db.execute(
            "SELECT token_id, generation, sealed_keys, pending_keys FROM nodes WHERE identity = ?",
            (identity,),
        ).fetchone()
        if row is None:
            raise UnknownNode(f"unknown node {identity!r}")
        token_id, generation, sealed, pending_blob = row
        if pending:
            return self.store.open_keys(identity, token_id, generation + 1, pending_blob)
        return self.store.open_keys(identity, token_id, generation, sealed)

    # -- enrolment --------------------------------------------------------------------------------

    def _insert_node(
        self, identity: str, role: str, now: int, seed: bytes | None, token_id: bytes
    ) -> tuple[bytes, tuple[bytes, ...]]:
        try:
            check_identity(identity)
        except KeysetError as exc:
            raise MissionError(str(exc)) from None
        check_role(role)
        if self._db.execute("SELECT 1 FROM nodes WHERE identity = ?", (identity,)).fetchone():
            raise DuplicateNode(f"node {identity} is already enrolled")
        keys = derive_slot_keys(token_id, seed)
        self._db.execute(
            "INSERT INTO nodes (identity, role, token_id, generation, sealed_keys, enrolled_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                identity,
                role,
                token_id,
                FIRST_GENERATION,
                self.store.seal_keys(identity, token_id, FIRST_GENERATION, keys),
                now,
            ),
        )
        self._audit(
            now,
            "enrol",
            node=identity,
            role=role,
            token=token_id.hex(),
            external_seed=seed is not None,
        )
        return token_id, keys

    def _personalise(
        self,
        identity: str,
        role: str,
        token_id: bytes,
        keys: tuple[bytes, ...],
        generation: int,
        token_path: str | os.PathLike[str],
        pin: str,
        written: list[str],
        now: int,
    ) -> None:
        spec = os.fspath(token_path)
        try:
            personalise_token(
                spec,
                pin=pin,
                token_id=token_id,
                identity=identity,
                role=role,
                keys=keys,
                generations=[generation] * SLOT_COUNT,
            )
        except OSError as exc:
            raise DeskError(
                f"cannot write token file {os.fspath(token_path)}: {exc.strerror}"
            ) from None
        if not is_card(spec):
            written.append(spec)
        self._db.execute("UPDATE nodes SET personalised = 1 WHERE identity = ?", (identity,))
        self._audit(now, "personalise", node=identity, token=token_id.hex())

    def _undo_files(self, written: list[str]) -> None:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @contextlib.contextmanager
    def _tokens_in_flight(self, files: dict[str, bytes]) -> Iterator[None]:
        """While the block writes token files (path: token id), a record of them, held locked.

        Killed (kill -9, a power cut) after a file was written but before its
        transaction committed, a command leaves a token whose keys the desk never
        kept, and run again it would refuse to overwrite that file. The record
        outlives such a death, unlocked: :meth:`_remove_orphan_tokens` then
        removes exactly those files. It is on disk before any token file is.
        """
        files = {os.path.abspath(p): t for p, t in files.items() if not is_card(p)}
        if not files:
            yield
            return
        folder = self.store.path.parent
        name = f"{TOKENS_IN_FLIGHT}{random_bytes(8).hex()}"
        tmp, record = folder / f".tmp{name}", folder / name
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # before the name is seen: a live command's record
            data = cbor2.dumps(files)
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
            os.replace(tmp, record)
            sync_folder(folder)
            yield
        finally:
            for path in (tmp, record):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            os.close(fd)

    def _remove_orphan_tokens(self) -> None:
        """Remove the token files a killed command wrote whose keys its rollback dropped.

        Only the files an unlocked record names that still hold the recorded
        token id, which no node whose token the desk counts as written has.
        """
        for record in self.store.path.parent.glob(f"{TOKENS_IN_FLIGHT}*"):
            try:
                fd = os.open(record, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its command still runs
                try:
                    files = cbor2.loads(read_bounded(record, MAX_IN_FLIGHT_SIZE, what="record"))
                except (OSError, FileTooLarge, cbor2.CBORDecodeError):
                    continue
                for path, token_id in files.items() if isinstance(files, dict) else ():
                    kept = self._db.execute(
                        "SELECT 1 FROM nodes WHERE token_id = ? AND personalised = 1", (token_id,)
                    ).fetchone()
                    with contextlib.suppress(TokenError, OSError, TypeError, ValueError):
                        if kept is None and SoftwareToken(path).info().token_id == token_id:
                            os.unlink(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record)
            finally:
                os.close(fd)

    def enrol(
        self,
        identity: str,
        role: str,
        *,
        token_path: str | os.PathLike[str],
        pin: str,
        now: int,
        seed: bytes | None = None,
    ) -> NodeRecord:
        """Enrol a node and personalise its token: a new file, or a card (``pcsc:READER``)."""
        check_pin(pin)
        self._remove_orphan_tokens()
        if not is_card(os.fspath(token_path)) and os.path.exists(token_path):
            what = "is a folder" if os.path.isdir(token_path) else "already exists"
            raise DeskError(
                f"token file {os.fspath(token_path)} {what}; refusing to overwrite (--token "
                "names the file to create)"
            )
        token_id = random_bytes(TOKEN_ID_SIZE)
        written: list[str] = []
        try:
            with (
                self._tokens_in_flight({os.fspath(token_path): token_id}),
                self.store.transaction(),
            ):
                token_id, keys = self._insert_node(identity, role, now, seed, token_id)
                self._personalise(
                    identity, role, token_id, keys, FIRST_GENERATION, token_path, pin, written, now
                )
        except BaseException:
            self._undo_files(written)
            raise
        return self.node(identity)

    def personalise(
        self, identity: str, *, token_path: str | os.PathLike[str], pin: str, now: int
    ) -> NodeRecord:
        """Write the token of a node enrolled without one (``desk apply`` without ``--tokens``)."""
        check_pin(pin)
        self._remove_orphan_tokens()
        node = self._active(identity)  # an unknown or revoked node is named before the write lock
        written: list[str] = []
        try:
            with (
                self._tokens_in_flight({os.fspath(token_path): node.token_id}),
                self.store.transaction(),
            ):
                node = self._active(identity)  # under the lock: a second personalise waits
                if node.personalised:
                    raise PolicyError(
                        f"node {identity} already has a token; a second one would be a clone "
                        "(use 'desk rekey' to refresh its keys)"
                    )
                self._personalise(
                    identity,
                    node.role,
                    node.token_id,
                    self._keys(identity),
                    node.generation,
                    token_path,
                    pin,
                    written,
                    now,
                )
        except BaseException:
            self._undo_files(written)
            raise
        return self.node(identity)

    # -- dialogue mates ---------------------------------------------------------------------------

    def _group(self, name: str, members: list[str], now: int) -> None:
        try:
            check_identity(name)
        except KeysetError as exc:
            raise PolicyError(f"group name: {exc}") from None
        if not members:
            raise PolicyError(f"group {name} is empty: name at least one node")
        for member in members:
            self._active(member)
        self._db.executemany(
            "INSERT OR IGNORE INTO groups (name, member) VALUES (?, ?)",
            [(name, m) for m in members],
        )
        size = self._db.execute("SELECT COUNT(*) FROM groups WHERE name = ?", (name,)).fetchone()[0]
        if size < 2:
            raise PolicyError(f"group {name} needs at least two members")
        self._audit(now, "group", group=name, added=sorted(set(members)))

    def group(self, name: str, members: list[str], *, now: int) -> None:
        with self.store.transaction():
            self._group(name, members, now)

    def _pair(self, a: str, b: str, now: int) -> None:
        if a == b:
            raise PolicyError(f"a node cannot be its own dialogue mate ({a})")
        self._active(a)
        self._active(b)
        a, b = sorted((a, b))
        self._db.execute("INSERT OR IGNORE INTO pairs (a, b) VALUES (?, ?)", (a, b))
        self._audit(now, "pair", a=a, b=b)

    def pair(self, a: str, b: str, *, now: int) -> None:
        with self.store.transaction():
            self._pair(a, b, now)

    def apply(
        self,
        plan: MissionPlan,
        *,
        now: int,
        tokens_dir: str | None = None,
        pin: str | None = None,
        seed: bytes | None = None,
    ) -> list[str]:
        """Enrol the plan's new nodes, then add its groups and pairs, all in one transaction.

        Nodes already enrolled with the same role are kept (so a mission file
        can be applied again after editing); a role change is refused.
        Returns the identities newly enrolled.
        """
        if tokens_dir is not None:
            if pin is None:
                raise DeskError("writing tokens needs a PIN")
            check_pin(pin)
        created: list[str] = []
        written: list[str] = []
        token_ids = {planned.identity: random_bytes(TOKEN_ID_SIZE) for planned in plan.nodes}
        in_flight = (
            {}
            if tokens_dir is None
            else {
                os.fspath(Path(tokens_dir) / f"{identity}.token"): token_id
                for identity, token_id in token_ids.items()
            }
        )
        if tokens_dir is not None:
            self._remove_orphan_tokens()
        try:
            with self._tokens_in_flight(in_flight), self.store.transaction():
                for planned in plan.nodes:
                    row = self._db.execute(
                        "SELECT role FROM nodes WHERE identity = ?", (planned.identity,)
                    ).fetchone()
                    if row is not None:
                        if row[0] != planned.role:
                            raise DuplicateNode(
                                f"node {planned.identity} is already enrolled "
                                f"as {row[0]}, not {planned.role}"
                            )
                        continue
                    token_id, keys = self._insert_node(
                        planned.identity, planned.role, now, seed, token_ids[planned.identity]
                    )
                    created.append(planned.identity)
                    if tokens_dir is not None and pin is not None:
                        path = Path(tokens_dir) / f"{planned.identity}.token"
                        if path.exists():
                            raise DeskError(
                                f"token file {path} already exists; refusing to overwrite"
                            )
                        try:
                            Path(tokens_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
                        except OSError as exc:
                            raise DeskError(
                                f"cannot create the token folder {tokens_dir}: {exc.strerror}"
                            ) from None
                        self._personalise(
                            planned.identity,
                            planned.role,
                            token_id,
                            keys,
                            FIRST_GENERATION,
                            path,
                            pin,
                            written,
                            now,
                        )
                for name, members in plan.groups:
                    self._group(name, list(members), now)
                for a, b in plan.pairs:
                    self._pair(a, b, now)
        except BaseException:
            self._undo_files(written)
            raise
        return created

    def permitted_pairs(self) -> Iterator[tuple[str, str]]:
        """Every pair allowed to talk (groups and explicit pairs), neither party revoked."""
        yield from self._db.execute(PERMITTED_PAIRS + " ORDER BY a, b")

    def mates_of(self, identity: str) -> list[str]:
        return mates_of(self._db.execute, identity)

    # -- keysets ----------------------------------------------------------------------------------

    def _wrap_target(self, identity: str) -> WrapTarget:
        node = self.node(identity)
        key = self._keys(identity)[Slot.WRAP]
        return WrapTarget(slot_kid(node.token_id, Slot.WRAP, node.generation), key)

    def issue(
        self,
        *,
        now: int,
        workers: int | None = None,
        on_progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> IssueReport:
        """Issue a CK for every permitted pair and every epoch not yet over, once.

        Re-running is cheap and idempotent: pairs and epochs that already have a
        CK are skipped. ``on_progress(done, total)`` reports CKs minted. The
        pairs, the CKs there are and the parties' WRAP keys are read under the
        write lock: a rekey or a revocation that commits meanwhile is seen, not
        overwritten by copies for keys a token no longer holds.
        """
        epochs = [e for e in self.mission.epochs() if e.end > now]
        with self.store.transaction():
            pairs = list(self.permitted_pairs())
            existing: dict[tuple[str, str], set[int]] = {}
            for a, b, epoch in self._db.execute("SELECT a, b, epoch FROM keysets"):
                existing.setdefault((a, b), set()).add(epoch)
            jobs: list[CkJob] = [
                (a, b, e.index, e.start, e.end)
                for a, b in pairs
                for e in epochs
                if e.index not in existing.get((a, b), ())
            ]
            total = len(jobs)
            if total:
                parties = sorted({p for a, b, *_ in jobs for p in (a, b)})
                targets = {p: self._wrap_target(p) for p in parties}
                done = 0

                def tick(n: int) -> None:
                    nonlocal done
                    done += n
                    on_progress(done, total)

                for rows in mint_keysets(
                    jobs,
                    targets,
                    self.mission.mission_id,
                    expected=total,
                    workers=workers,
                    on_chunk=tick,
                ):
                    self._db.executemany(
                        "INSERT INTO keysets VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
                    )
                self._audit(now, "issue", keysets=total, pairs=len(pairs), epochs=len(epochs))
        return IssueReport(
            pairs=len(pairs),
            epochs=len(epochs),
            issued=total,
            skipped_existing=len(pairs) * len(epochs) - total,
        )

    def discovery_key(self, epoch: Epoch) -> DiscoveryKey:
        """The mission's discovery key for ``epoch``: HKDF of the desk's discovery secret."""
        return discovery_key(self.store.secret(DISCOVERY_SECRET), self.mission, epoch)

    def imported(self) -> str | None:
        """Where 'as import-desk' took this desk's key state, if it did (:meth:`Store.imported`)."""
        return self.store.imported()

    def _not_imported(self, what: str) -> None:
        """After 'as import-desk', token keys change in PostgreSQL: this file is stale for them."""
        where = self.imported()
        if where is not None:
            raise PolicyError(
                f"{where}: token keys change there, so {what} from this file would not match "
                "them; use 'snrmesh as bundle'"
            )

    def export(self, identity: str, out: str | os.PathLike[str], *, now: int) -> Bundle:
        """Write ``identity``'s bundle to ``out`` (atomically) and return it."""
        self._not_imported("a bundle")
        node = self._active(identity)
        pending = self._db.execute(
            "SELECT pending_keys FROM nodes WHERE identity = ?", (identity,)
        ).fetchone()[0]
        if pending is not None:  # the token may hold the new keys: this bundle would not open
            raise PolicyError(
                f"a key change of {identity} is unfinished (an interrupted 'desk rekey', or one "
                f"the AS began that the node has not confirmed yet): run 'snrmesh desk rekey' "
                f"for {identity} again (or, for the AS's, let the node reach the AS once), "
                "then export"
            )
        target = self._wrap_target(identity)
        try:
            bundle = build_bundle(
                self._db.execute,
                mission=self.mission,
                identity=identity,
                role=node.role,
                token_id=node.token_id,
                wrap_kid=target.kid,
                wrap_key=target.key,
                discovery_secret=self.store.secret(DISCOVERY_SECRET),
                now=now,
            )
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
        mac_key = self._keys(identity)[Slot.MAC]
        data = seal_bundle(
            bundle, kid=slot_kid(node.token_id, Slot.MAC, node.generation), mac_key=mac_key
        )
        with self.store.transaction():
            try:
                write_atomic(out, data)
            except OSError as exc:
                raise DeskError(f"cannot write bundle {os.fspath(out)}: {exc.strerror}") from None
            self._audit(
                now,
                "export",
                node=identity,
                mates=len(bundle.mates),
                keysets=len(bundle.keysets),
                generation=node.generation,
            )
        return bundle

    # -- key change and revocation ------------------------------------------------------------

    def rekey(
        self, identity: str, token: SecureElement, *, now: int, seed: bytes | None = None
    ) -> NodeRecord:
        """Refresh every key of ``identity``'s token (ESAC 1) and re-wrap its CK copies.

        Two phases so that a crash between the token write and the store write
        cannot strand the token: the new keys are first recorded as *pending*;
        the key change is sent to the token; then the store switches over. Run
        again after a failure, it resumes with the same pending keys. The PIN
        of ``token`` must already be verified. Old bundles stop working (their
        MAC key and wrap key are gone); mates' bundles carry stale tickets for
        this node until they are exported again.
        """
        self._not_imported("a key change")
        node = self._active(identity)
        info = token.info()
        if info.token_id != node.token_id or info.identity != identity:
            raise PolicyError(f"that token belongs to {info.identity}, not {identity}")
        new_generation = node.generation + 1
        pending_row = self._db.execute(
            "SELECT pending_keys FROM nodes WHERE identity = ?", (identity,)
        ).fetchone()[0]
        token_generation = info.generation(Slot.KEY_CHANGE)
        held = None  # the keys the token holds, when they are not the store's current ones
        if identity in self._as_suspended() and token_generation != new_generation:
            # a clone alert: pending keys the AS made may have gone to the copy, so fresh
            # ones; and the token trusted may be the one a copy overtook (it holds K[g-1])
            pending_row = None
            if token_generation == node.generation - 1:
                held = self._previous_keys(identity, token_generation)
        # Only a resumed rekey (pending keys recorded) may find the token one generation ahead.
        if (
            token_generation != node.generation
            and held is None
            and (pending_row is None or token_generation != new_generation)
        ):
            raise TokenError(
                f"token of {identity} is at key generation {token_generation}, "
                f"the desk expected {node.generation} (is this desk an older copy?)"
            )
        if pending_row is None:
            with self.store.transaction():
                new_keys = derive_slot_keys(node.token_id, seed)
                self._db.execute(
                    "UPDATE nodes SET pending_keys = ? WHERE identity = ?",
                    (
                        self.store.seal_keys(identity, node.token_id, new_generation, new_keys),
                        identity,
                    ),
                )
                self._audit(now, "rekey-prepare", node=identity, generation=new_generation)
        new_keys = self._keys(identity, pending=True)
        old_keys = self._keys(identity)
        if token_generation == node.generation or held is not None:
            message = build_key_change(
                KeyChange(node.token_id, (new_generation,) * SLOT_COUNT, new_keys),
                kid=slot_kid(node.token_id, Slot.KEY_CHANGE, token_generation),
                current_key=(held or old_keys)[Slot.KEY_CHANGE],
            )
            token.key_change(message)
        old_wrap = jwk.JWK(kty="oct", k=base64url_encode(old_keys[Slot.WRAP]))
        new_wrap = jwk.JWK(kty="oct", k=base64url_encode(new_keys[Slot.WRAP]))
        new_kid = slot_kid(node.token_id, Slot.WRAP, new_generation)
        old_kid = slot_kid(node.token_id, Slot.WRAP, node.generation)
        # the mark is checked here, under the write lock, rather than by Store.transaction:
        # the token has moved on already, and the refusal says where that leaves it
        with self.store.transaction(imported=True):
            if (where := self.imported()) is not None:  # 'as import-desk' began meanwhile
                raise PolicyError(
                    f"{where} while this key change ran: the token holds generation "
                    f"{new_generation} already, and the copy holds it as pending keys, which "
                    "the AS completes at the token's next authentication; this file stays at "
                    f"{node.generation}"
                )
            rewrapped = 0
            for column in ("copy_a", "copy_b"):
                party = "a" if column == "copy_a" else "b"
                rows = self._db.execute(
                    f"SELECT ck_id, {column} FROM keysets WHERE {party} = ?", (identity,)
                ).fetchall()
                for ck_id, copy in rows:
                    # an AS key change leaves past epochs' copies under the keys before it:
                    # never served again, and no key here opens them
                    if read_wrapped_kid(copy) != old_kid:
                        continue
                    self._db.execute(
                        f"UPDATE keysets SET {column} = ? WHERE ck_id = ?",
                        (_rewrap(copy, old_wrap, new_wrap, new_kid), ck_id),
                    )
                    rewrapped += 1
            self._db.execute(
                "UPDATE nodes SET generation = ?, sealed_keys = ?, pending_keys = NULL "
                "WHERE identity = ?",
                (
                    new_generation,
                    self.store.seal_keys(identity, node.token_id, new_generation, new_keys),
                    identity,
                ),
            )
            lifted = self._after_rekey_for_the_as(identity, now)
            self._audit(
                now,
                "rekey",
                node=identity,
                generation=new_generation,
                rewrapped=rewrapped,
                **({"suspension_lifted": True} if lifted else {}),
            )
        return self.node(identity)

    def _as_suspended(self) -> set[str]:
        """Nodes an AS that served this desk's file suspended (a clone alert), if one did."""
        if not self._as_ran():
            return set()
        rows = self._db.execute("SELECT identity FROM nodes WHERE suspended_at IS NOT NULL")
        return {identity for (identity,) in rows}

    def _previous_keys(self, identity: str, generation: int) -> tuple[bytes, ...] | None:
        """K[generation] as the AS kept it (``previous_keys``), if it did."""
        row = self._db.execute(
            "SELECT token_id, previous_keys, previous_generation FROM nodes WHERE identity = ?",
            (identity,),
        ).fetchone()
        if row is None or row[1] is None or row[2] != generation:
            return None
        return self.store.open_keys(identity, row[0], generation, row[1])

    def _as_ran(self) -> bool:
        """Whether an AS migrated this file (its columns exist only then)."""
        return any(r[1] == "suspended_at" for r in self._db.execute("PRAGMA table_info(nodes)"))

    def _after_rekey_for_the_as(self, identity: str, now: int) -> bool:
        """The AS's view of fresh keys: its clock restarts, a clone suspension is lifted.

        Once this token holds keys no copy of it can know, the copy that set
        off a clone alert is locked out for good, so the node may authenticate
        again. Returns whether it was suspended.
        """
        if not self._as_ran():
            return False
        (suspended,) = self._db.execute(
            "SELECT suspended_at IS NOT NULL FROM nodes WHERE identity = ?", (identity,)
        ).fetchone()
        self._db.execute(
            "UPDATE nodes SET suspended_at = NULL, keys_since = ?, previous_keys = NULL, "
            "previous_generation = NULL WHERE identity = ?",
            (now, identity),
        )
        return bool(suspended)

    def revoke(self, identity: str, *, now: int) -> NodeRecord:
        """No further CKs for ``identity``; later exports leave it out and list it revoked."""
        if self.node(identity).revoked:  # (named before the write lock is waited for)
            raise PolicyError(f"node {identity} is already revoked")
        with self.store.transaction():
            if self.node(identity).revoked:  # under the lock: a revoke that ran meanwhile
                raise PolicyError(f"node {identity} is already revoked")
            self._db.execute("UPDATE nodes SET revoked_at = ? WHERE identity = ?", (now, identity))
            self._audit(now, "revoke", node=identity)
        return self.node(identity)

    # -- reporting --------------------------------------------------------------------------------

    def audit_log(self, limit: int | None = None) -> list[dict[str, Any]]:
        query = "SELECT seq, at, op, detail FROM audit ORDER BY seq DESC"
        rows = self._db.execute(
            query + (" LIMIT ?" if limit else ""), (limit,) if limit else ()
        ).fetchall()
        return [{**e, "at": _ts(e["at"])} for e in audit_entries(rows)]

    def summary(self, *, now: int) -> dict[str, Any]:
        m = self.mission
        groups: dict[str, list[str]] = {}
        for name, member in self._db.execute("SELECT name, member FROM groups ORDER BY 1, 2"):
            groups.setdefault(name, []).append(member)
        counts = dict(
            self._db.execute(
                "SELECT p, COUNT(*) FROM (SELECT a AS p FROM keysets UNION ALL "
                "SELECT b AS p FROM keysets) GROUP BY p"
            )
        )
        current = m.epoch_at(now)
        suspended = self._as_suspended()
        return {
            "mission": {
                "name": m.name,
                "id": m.mission_id.hex(),
                "start": _ts(m.start),
                "end": _ts(m.end),
                "epoch_hours": m.epoch_seconds / 3600,
                "epochs": m.epoch_count,
                "current_epoch": None if current is None else current.index,
            },
            "nodes": [
                {
                    "id": n.identity,
                    "role": n.role,
                    "token": n.token_id.hex(),
                    "generation": n.generation,
                    "token_written": n.personalised,
                    "revoked": n.revoked,
                    "suspended": n.identity in suspended,
                    "keysets": counts.get(n.identity, 0),
                }
                for n in self.nodes()
            ],
            "groups": groups,
            "pairs": [list(p) for p in self._db.execute("SELECT a, b FROM pairs ORDER BY 1, 2")],
            "keysets": self._db.execute("SELECT COUNT(*) FROM keysets").fetchone()[0],
            "permitted_pairs": sum(1 for _ in self.permitted_pairs()),
            "imported": self.imported(),
            "audit": self.audit_log(limit=10),
        }


def _rewrap(copy: str, old: jwk.JWK, new: jwk.JWK, new_kid: str) -> str:
    header = read_copy_header(copy)
    pair_key = decrypt_copy(copy, old)
    ck = CommunicationKeyset(
        header.ck_id,
        pair_key,
        header.mission_id,
        header.party_a,
        header.party_b,
        header.not_before,
        header.not_after,
    )
    return wrap_copy(ck, holder=header.holder, kid=new_kid, wrap_key=new)
