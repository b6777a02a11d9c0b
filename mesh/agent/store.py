"""The agent's durable state: message history, outbox, replay high-water marks, alerts.

One SQLite file in the agent's state folder, in WAL mode. Every change is a
transaction that is written to the WAL before the call returns, so killing the
agent (even ``kill -9``) loses nothing it has acknowledged; ``synchronous =
FULL`` syncs the WAL at every commit, so a power cut does not either (with
``NORMAL`` it could lose the last transactions, among them messages already
acknowledged ``delivered``, which no sender retries). Chat rates make one sync
per commit cheap.

* ``messages``: the user's history; ``(id, direction, peer)`` is unique, so a chat
  retried by its sender is stored -- and shown -- once, and a mate that sends under
  another's message id (a group member sees the group's) cannot make that one look held.
* ``outbox``: one row per (message, recipient) until a receipt arrives; group
  messages fan out into one row per member.
* ``high_water``: per ``ck_id`` and role, the newest handshake timestamp accepted, so
  a replayed handshake is refused even across restarts.
* ``read_receipts``: read receipts owed to a sender that has not answered them
  yet; written with the ``read`` mark itself, so a crash cannot lose one.
* ``alerts``: refused peers, expiring keysets, token problems.
* ``revoked``: every node revoked in a bundle this agent held. A revocation is for
  good, and the bundle file holds only the last bundle as its AS sent it (one that
  forgot a revocation: an AS restored from a backup), so a restart takes these too.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import MeshError
from mesh.files import create_private

__all__ = [
    "STATE_DB",
    "AgentStore",
    "Alert",
    "OutboxEntry",
    "Outgoing",
    "StoredMessage",
]

STATE_DB = "agent.sqlite"
# One recipient's progress, in order: a state only moves forward. ``undeliverable`` is a
# recipient revoked before the message reached it (a revocation is final); a late receipt still
# moves it on, since the message did arrive.
OUT_STATES = ("pending", "sent", "undeliverable", "delivered", "read")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id        BLOB NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    peer      TEXT NOT NULL,
    grp       TEXT,
    text      TEXT NOT NULL,
    at        REAL NOT NULL,
    read      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (id, direction, peer)
);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (at);
CREATE TABLE IF NOT EXISTS outbox (
    id        BLOB NOT NULL,
    recipient TEXT NOT NULL,
    state     TEXT NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (id, recipient)
);
CREATE INDEX IF NOT EXISTS outbox_by_recipient ON outbox (recipient, state);
CREATE TABLE IF NOT EXISTS high_water (
    ck_id     BLOB NOT NULL,
    role      TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (ck_id, role)
);
CREATE TABLE IF NOT EXISTS read_receipts (
    id        BLOB NOT NULL,
    peer      TEXT NOT NULL,
    PRIMARY KEY (peer, id)
);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    at        REAL NOT NULL,
    kind      TEXT NOT NULL,
    peer      TEXT,
    message   TEXT NOT NULL,
    dismissed INTEGER NOT NULL DEFAULT 0,
    repeats   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS revoked (
    identity  TEXT PRIMARY KEY
);
"""
MAX_BOUND_IDS = 500  # ids bound in one statement (SQLite's bound-parameter limit)
MAX_ALERTS = 1000  # alerts of one kind not dismissed; past it the oldest go

# Each table's columns and the SQLite types (``typeof``) their values may have: what this code
# writes, checked at open, so that a state file another program wrote (or a hand edit) is refused
# in one line rather than a traceback wherever the agent first reads the odd row.
_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "messages": {
        "id": ("blob",),
        "direction": ("text",),
        "peer": ("text",),
        "grp": ("text", "null"),
        "text": ("text",),
        "at": ("real",),
        "read": ("integer",),
    },
    "outbox": {
        "id": ("blob",),
        "recipient": ("text",),
        "state": ("text",),
        "attempts": ("integer",),
    },
    "high_water": {"ck_id": ("blob",), "role": ("text",), "timestamp": ("integer",)},
    "read_receipts": {"id": ("blob",), "peer": ("text",)},
    "alerts": {
        "alert_id": ("integer",),
        "at": ("real",),
        "kind": ("text",),
        "peer": ("text", "null"),
        "message": ("text",),
        "dismissed": ("integer",),
        "repeats": ("integer",),
    },
    "revoked": {"identity": ("text",)},
}
_VALUES = {  # columns that hold one of a few words
    "outbox": f"state IN ({', '.join(repr(s) for s in OUT_STATES)})",
    "high_water": "role IN ('initiator', 'responder')",
}


class StoreError(MeshError):
    """The agent's state file is unusable."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    message_id: bytes
    direction: str
    peer: str
    group: str | None
    text: str
    at: float
    read: bool
    state: str | None  # outgoing: best state over recipients

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.message_id.hex(),
            "direction": self.direction,
            "peer": self.peer,
            "group": self.group,
            "text": self.text,
            "at": self.at,
            "state": self.state,
            "read": self.read,
        }


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the local user sends: to one mate (``peer``) or to a ``group``'s members."""

    message_id: bytes
    peer: str
    group: str | None
    text: str
    at: float
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    message_id: bytes
    recipient: str
    group: str | None
    text: str
    at: float


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: int
    at: float
    kind: str
    peer: str | None
    message: str
    repeats: int = 0  # times the same cause came again since ``alert_id`` was raised

    def to_json(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "at": self.at,
            "kind": self.kind,
            "peer": self.peer,
            "message": self.message,
            "repeats": self.repeats,
        }


# The best state over a message's recipients; ``undeliverable`` only when it is every one's (a
# group message with one member revoked is still on its way to the others). A recipient made
# undeliverable still counts as ``sent`` if it was (``attempts``), so that the best state never
# moves back (a group message ``sent`` to b, ``pending`` for c, stays ``sent`` when b is revoked).
_BEST_STATE = """
    (SELECT CASE WHEN MIN(o.state = 'undeliverable') THEN 'undeliverable'
            ELSE CASE MAX(CASE o.state WHEN 'pending' THEN 0 WHEN 'sent' THEN 1
                                       WHEN 'undeliverable' THEN IIF(o.attempts > 0, 1, -1)
                                       WHEN 'delivered' THEN 2 ELSE 3 END)
                 WHEN 0 THEN 'pending' WHEN 1 THEN 'sent' WHEN 2 THEN 'delivered'
                 WHEN 3 THEN 'read' END END
       FROM outbox o WHERE o.id = m.id AND m.direction = 'out')"""


class AgentStore:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        folder = Path(state_dir)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, or a parent that cannot hold a folder
            raise StoreError(f"cannot create the state folder {folder}: {exc.strerror}") from None
        try:
            create_private(folder / STATE_DB)  # the history: for this user only
            self.db = sqlite3.connect(folder / STATE_DB, isolation_level=None)
        except (OSError, sqlite3.DatabaseError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else exc
            raise StoreError(f"cannot open the agent state {folder / STATE_DB}: {why}") from None
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")  # a power cut loses no ack either
            self._key_messages_by_sender()
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(alerts)")}
            if "repeats" not in columns:  # a state file from before repeats were counted
                self.db.execute("ALTER TABLE alerts ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0")
                self.db.execute("DELETE FROM alerts WHERE dismissed = 1")  # (kept until then)
            self._check()
        except (sqlite3.DatabaseError, StoreError) as exc:
            self.db.close()
            raise StoreError(f"agent state {folder / STATE_DB} is unusable: {exc}") from None

    def _key_messages_by_sender(self) -> None:
        """A state file from before: its messages were keyed by (id, direction) alone."""
        keyed = {row[1]: row[5] for row in self.db.execute("PRAGMA table_info(messages)")}
        if not keyed or keyed.get("peer"):
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("ALTER TABLE messages RENAME TO messages_before")
            self.db.execute("DROP INDEX IF EXISTS messages_by_time")
            self.db.execute(SCHEMA.split(";", 1)[0])  # messages (executescript would commit)
            self.db.execute(
                "INSERT INTO messages SELECT id, direction, peer, grp, text, at, read "
                "FROM messages_before"
            )
            self.db.execute("DROP TABLE messages_before")

    def _check(self) -> None:
        """Refuse a damaged file, or tables of another shape or with values of another type."""
        ((verdict, *_),) = self.db.execute("PRAGMA quick_check(1)").fetchall()
        if verdict != "ok":
            raise StoreError(f"damaged ({' '.join(str(verdict).split())})")  # one line
        for table, types in _TYPES.items():
            columns = [row[1] for row in self.db.execute(f"PRAGMA table_info({table})")]
            if columns != list(types):
                raise StoreError(f"table {table} has columns {', '.join(columns)}")
            wrong = " OR ".join(
                f"typeof({column}) NOT IN ({', '.join(repr(t) for t in allowed)})"
                for column, allowed in types.items()
            )
            if table in _VALUES:
                wrong += f" OR NOT ({_VALUES[table]})"
            if self.db.execute(f"SELECT 1 FROM {table} WHERE {wrong} LIMIT 1").fetchone():
                raise StoreError(f"table {table} holds values no version of snrmesh writes")

    def close(self) -> None:
        self.db.close()

    def _with_ids(self, query: str, ids: Sequence[bytes], *params: object) -> Iterator[Any]:
        """The rows of ``query`` (``... IN ({ids})``) for ``ids``, in chunks SQLite can bind."""
        for i in range(0, len(ids), MAX_BOUND_IDS):
            chunk = ids[i : i + MAX_BOUND_IDS]
            marks = ",".join("?" * len(chunk))
            yield from self.db.execute(query.format(ids=marks), [*params, *chunk])

    # -- outgoing ---------------------------------------------------------------------------------

    def queue(self, batch: list[Outgoing]) -> None:
        """Record outgoing messages and their outbox rows, all in one transaction.

        The agent gathers the sends of one event-loop turn into one call (group
        commit): each is acknowledged to its client only after this returns.
        """
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO messages (id, direction, peer, grp, text, at, read) "
                "VALUES (?, 'out', ?, ?, ?, ?, 1)",
                [(m.message_id, m.peer, m.group, m.text, m.at) for m in batch],
            )
            self.db.executemany(
                "INSERT INTO outbox (id, recipient, state) VALUES (?, ?, 'pending')",
                [(m.message_id, r) for m in batch for r in m.recipients],
            )

    def undelivered(
        self, recipient: str, *, include_sent: bool = True, limit: int = 500
    ) -> list[OutboxEntry]:
        """Outbox rows for ``recipient`` with no receipt yet, oldest first.

        ``include_sent=False`` gives only those never sent: what a new message
        adds. Sent-but-unacknowledged ones are re-sent on retries and when a
        session (re)starts.
        """
        states = "('pending', 'sent')" if include_sent else "('pending')"
        rows = self.db.execute(
            "SELECT o.id, o.recipient, m.grp, m.text, m.at FROM outbox o "
            "JOIN messages m ON m.id = o.id AND m.direction = 'out' "
            f"WHERE o.recipient = ? AND o.state IN {states} ORDER BY m.at LIMIT ?",
            (recipient, limit),
        ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def recipients_waiting(self) -> list[str]:
        return [
            r
            for (r,) in self.db.execute(
                "SELECT DISTINCT recipient FROM outbox WHERE state IN ('pending', 'sent')"
            )
        ]

    def mark_sent(self, entries: Iterable[tuple[bytes, str]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1 "
                "WHERE id = ? AND recipient = ? AND state = 'pending'",
                list(entries),
            )

    def abandon(self, recipient: str) -> tuple[int, int]:
        """Mark every message still on its way to ``recipient`` undeliverable.

        For a revoked mate: it will never be let in again, so nothing in the outbox can reach
        it, and its sender should see that rather than ``pending`` for ever. Returns how many
        were its own and how many group messages (which still go to their other members).
        """
        waiting = "recipient = ? AND state IN ('pending', 'sent')"
        with self.db:
            self.db.execute("BEGIN")
            ((own, groups),) = self.db.execute(
                "SELECT COALESCE(SUM(m.grp IS NULL), 0), COALESCE(SUM(m.grp IS NOT NULL), 0) "
                "FROM outbox JOIN messages m ON m.id = outbox.id AND m.direction = 'out' "
                f"WHERE {waiting}",
                (recipient,),
            )
            self.db.execute(
                f"UPDATE outbox SET state = 'undeliverable' WHERE {waiting}", (recipient,)
            )
        return own, groups

    def receipts(self, batch: list[tuple[bytes, str, str]]) -> list[tuple[bytes, str, str]]:
        """Apply receipts (id, recipient, state) in one transaction; return those that were news.

        A state never moves back (a late ``delivered`` after ``read`` changes nothing).
        """
        order = {state: i for i, state in enumerate(OUT_STATES)}
        news: list[tuple[bytes, str, str]] = []
        with self.db:
            self.db.execute("BEGIN")
            current: dict[tuple[bytes, str], str] = {
                (bytes(mid), rcpt): state
                for mid, rcpt, state in self._with_ids(
                    "SELECT id, recipient, state FROM outbox WHERE id IN ({ids})",
                    [mid for mid, _, _ in batch],
                )
            }
            for message_id, recipient, state in batch:
                before = current.get((message_id, recipient))
                if before is not None and order[state] > order[before]:
                    current[message_id, recipient] = state
                    news.append((message_id, recipient, state))
            self.db.executemany(
                "UPDATE outbox SET state = ? WHERE id = ? AND recipient = ?",
                [(state, mid, rcpt) for mid, rcpt, state in news],
            )
        return news

    def sent_to(self, recipient: str, message_ids: list[bytes]) -> list[bytes]:
        """Those of ``message_ids`` that we sent to ``recipient`` (outbox rows)."""
        return [
            bytes(mid)
            for (mid,) in self._with_ids(
                "SELECT id FROM outbox WHERE recipient = ? AND id IN ({ids})",
                message_ids,
                recipient,
            )
        ]

    # -- incoming ---------------------------------------------------------------------------------

    def receive(
        self, batch: list[tuple[bytes, str, str | None, str, float]]
    ) -> list[StoredMessage]:
        """Store incoming chats (id, sender, group, text, at); return only the new ones."""
        fresh: list[StoredMessage] = []
        with self.db:
            self.db.execute("BEGIN")
            known = {  # (id, sender): an id is its sender's
                (bytes(mid), sender)
                for mid, sender in self._with_ids(
                    "SELECT id, peer FROM messages WHERE direction = 'in' AND id IN ({ids})",
                    [m[0] for m in batch],
                )
            }
            for message_id, sender, group, text, at in batch:
                if (message_id, sender) not in known:
                    known.add((message_id, sender))
                    fresh.append(
                        StoredMessage(message_id, "in", sender, group, text, at, False, None)
                    )
            self.db.executemany(
                "INSERT INTO messages (id, direction, peer, grp, text, at) "
                "VALUES (?, 'in', ?, ?, ?, ?)",
                [(m.message_id, m.peer, m.group, m.text, m.at) for m in fresh],
            )
        return fresh

    def mark_read(
        self, *, peer: str | None, group: str | None, mates: Collection[str]
    ) -> list[tuple[bytes, str]]:
        """Mark a conversation read; return the (message id, sender) pairs it marked.

        The read receipts owed to the senders among ``mates`` are recorded in the
        mark's own transaction (``owed_receipts``), so none is lost if the agent
        dies before the sender has it.
        """
        where = "grp = ?" if group is not None else "grp IS NULL AND peer = ?"
        arg = group if group is not None else peer
        with self.db:
            self.db.execute("BEGIN")
            rows = self.db.execute(
                f"SELECT id, peer FROM messages WHERE direction = 'in' AND read = 0 AND {where}",
                (arg,),
            ).fetchall()
            self.db.execute(
                f"UPDATE messages SET read = 1 WHERE direction = 'in' AND read = 0 AND {where}",
                (arg,),
            )
            marked = [(bytes(i), p) for i, p in rows]
            self.db.executemany(
                "INSERT OR IGNORE INTO read_receipts (id, peer) VALUES (?, ?)",
                [(i, p) for i, p in marked if p in mates],
            )
        return marked

    def owed_receipts(self, peer: str) -> list[bytes]:
        """Ids of ``peer``'s messages read here whose read receipt it has not answered yet."""
        return [
            bytes(i)
            for (i,) in self.db.execute("SELECT id FROM read_receipts WHERE peer = ?", (peer,))
        ]

    def owed_peers(self) -> list[str]:
        """The senders some read receipt is still owed to (re-sent until each answers)."""
        return [p for (p,) in self.db.execute("SELECT DISTINCT peer FROM read_receipts")]

    def receipts_acknowledged(self, peer: str, message_ids: Iterable[bytes]) -> None:
        """Forget the read receipts for ``message_ids`` that ``peer`` says it holds.

        Not when a session takes them: a session takes bytes that may never be
        read (the sender killed, a relayed frame lost), and nothing else would
        ever send that receipt again.
        """
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "DELETE FROM read_receipts WHERE peer = ? AND id = ?",
                [(peer, i) for i in message_ids],
            )

    def history(
        self, *, peer: str | None = None, group: str | None = None, limit: int = 200
    ) -> list[StoredMessage]:
        query = (
            f"SELECT m.id, m.direction, m.peer, m.grp, m.text, m.at, m.read, {_BEST_STATE} "
            "FROM messages m"
        )
        args: tuple[Any, ...] = ()
        if group is not None:
            query += " WHERE m.grp = ?"
            args = (group,)
        elif peer is not None:
            query += " WHERE m.grp IS NULL AND m.peer = ?"
            args = (peer,)
        rows = self.db.execute(
            f"SELECT * FROM ({query} ORDER BY m.at DESC LIMIT ?) ORDER BY 6", (*args, limit)
        ).fetchall()
        return [
            StoredMessage(bytes(r[0]), r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows
        ]

    # -- replay protection ------------------------------------------------------------------------

    def high_water_marks(self) -> list[tuple[bytes, str, int]]:
        """Every (ck_id, role, timestamp) mark, loaded into the key store at start."""
        return [(bytes(c), r, int(t)) for c, r, t in self.db.execute("SELECT * FROM high_water")]

    def set_high_water(self, marks: Iterable[tuple[bytes, str, int]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO high_water VALUES (?, ?, ?) ON CONFLICT (ck_id, role) DO UPDATE "
                "SET timestamp = MAX(timestamp, excluded.timestamp)",
                list(marks),
            )

    # -- revocations ------------------------------------------------------------------------------

    def remember_revoked(self, identities: Iterable[str]) -> frozenset[str]:
        """Record ``identities`` as revoked for good; returns every node ever recorded so."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO revoked VALUES (?) ON CONFLICT DO NOTHING",
                [(identity,) for identity in identities],
            )
            return frozenset(r for (r,) in self.db.execute("SELECT identity FROM revoked"))

    # -- alerts -----------------------------------------------------------------------------------

    def add_alert(self, at: float, kind: str, peer: str | None, message: str) -> Alert:
        """A new alert; past MAX_ALERTS of its kind not dismissed, the oldest of them go.

        Per kind, so a flood of ``refused`` (strangers from ever new hosts) never
        takes a ``token`` or ``revoked`` alert with it; the rows go (as dismissed
        ones do), so the table stays bounded.
        """
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "INSERT INTO alerts (at, kind, peer, message) VALUES (?, ?, ?, ?)",
                (at, kind, peer, message),
            )
            self.db.execute(
                "DELETE FROM alerts WHERE kind = ? AND alert_id <= "
                "(SELECT alert_id FROM alerts WHERE kind = ? AND dismissed = 0 "
                "ORDER BY alert_id DESC LIMIT 1 OFFSET ?)",
                (kind, kind, MAX_ALERTS),
            )
        return Alert(int(cur.lastrowid or 0), at, kind, peer, message)

    def repeat_alert(self, alert_id: int, at: float, message: str) -> Alert | None:
        """The same cause again: the alert takes this time and message and counts one more
        repeat; None if it was dismissed (or is gone), so the caller raises a new one."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "UPDATE alerts SET at = ?, message = ?, repeats = repeats + 1 "
                "WHERE alert_id = ? AND dismissed = 0",
                (at, message, alert_id),
            )
            if cur.rowcount == 0:
                return None
            row = self.db.execute(
                "SELECT alert_id, at, kind, peer, message, repeats FROM alerts WHERE alert_id = ?",
                (alert_id,),
            ).fetchone()
        return Alert(*row)

    def alerts(self) -> list[Alert]:
        return [
            Alert(*row)
            for row in self.db.execute(
                "SELECT alert_id, at, kind, peer, message, repeats FROM alerts "
                "WHERE dismissed = 0 ORDER BY alert_id"
            )
        ]

    def dismiss_alert(self, alert_id: int) -> bool:
        """Forget the alert (nothing reads dismissed ones; ids are never reused)."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "DELETE FROM alerts WHERE alert_id = ? AND dismissed = 0", (alert_id,)
            )
        return cur.rowcount > 0

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
