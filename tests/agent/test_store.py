"""The agent's durable store: idempotent delivery, receipts, read state, replay marks."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from mesh.agent.store import STATE_DB, AgentStore, Outgoing, StoreError


def test_incoming_duplicates_are_stored_once_and_survive_reopen(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    mid = os.urandom(16)
    assert len(store.receive([(mid, "b", None, "hi", 1.0)])) == 1
    assert store.receive([(mid, "b", None, "hi", 1.0)]) == []
    store.close()
    again = AgentStore(tmp_path)
    assert again.receive([(mid, "b", None, "hi", 1.0)]) == []
    assert [(m.text, m.state) for m in again.history(peer="b")] == [("hi", None)]


def test_outbox_advances_only_forward_and_group_fans_out(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    mid = os.urandom(16)
    store.queue([Outgoing(mid, "", "squad", "all", 1.0, ("b", "c"))])
    assert [e.recipient for e in store.undelivered("b")] == ["b"]
    assert [e.recipient for e in store.undelivered("b", include_sent=False)] == ["b"]
    assert store.history(group="squad")[0].state == "pending"
    store.mark_sent([(mid, "b"), (mid, "c")])
    assert store.undelivered("c", include_sent=False) == []
    assert [e.recipient for e in store.undelivered("c")] == ["c"]
    assert store.receipts([(mid, "b", "read")]) == [(mid, "b", "read")]
    assert store.receipts([(mid, "b", "delivered")]) == []  # never moves back
    assert store.history(group="squad")[0].state == "read"
    assert store.undelivered("b") == []
    assert [e.recipient for e in store.undelivered("c")] == ["c"]
    assert store.recipients_waiting() == ["c"]


def test_mark_read_returns_what_needs_a_read_receipt_once(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    m1, m2 = os.urandom(16), os.urandom(16)
    store.receive([(m1, "b", None, "one", 1.0), (m2, "c", "squad", "two", 2.0)])
    assert store.mark_read(peer="b", group=None, mates={"b", "c"}) == [(m1, "b")]
    assert store.mark_read(peer="b", group=None, mates={"b", "c"}) == []
    assert store.mark_read(peer=None, group="squad", mates={"b", "c"}) == [(m2, "c")]


def test_read_receipts_owed_survive_reopen_until_the_sender_answers_them(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    m1, m2, m3 = os.urandom(16), os.urandom(16), os.urandom(16)
    store.receive([(m1, "b", None, "one", 1.0), (m2, "b", None, "two", 2.0)])
    store.receive([(m3, "x", None, "from a stranger", 3.0)])
    store.mark_read(peer="b", group=None, mates={"b"})
    store.mark_read(peer="x", group=None, mates={"b"})  # not a mate: no receipt owed
    store.close()  # as after a crash: the receipts were owed in the mark's own transaction
    again = AgentStore(tmp_path)
    assert sorted(again.owed_receipts("b")) == sorted([m1, m2])
    assert again.owed_receipts("x") == [] and again.owed_peers() == ["b"]
    again.receipts_acknowledged("b", [m1])
    assert again.owed_receipts("b") == [m2]


def test_high_water_marks_never_go_back(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    ck = os.urandom(16)
    store.set_high_water([(ck, "responder", 10)])
    store.set_high_water([(ck, "responder", 5)])
    store.set_high_water([(ck, "initiator", 7)])
    assert sorted(store.high_water_marks()) == sorted([(ck, "responder", 10), (ck, "initiator", 7)])


def test_alerts_can_be_dismissed(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    alert = store.add_alert(1.0, "refused", "mallory", "handshake refused")
    assert [a.alert_id for a in store.alerts()] == [alert.alert_id]
    assert store.dismiss_alert(alert.alert_id)
    assert store.alerts() == []
    assert not store.dismiss_alert(alert.alert_id)


def test_a_revoked_recipients_messages_become_undeliverable_for_it_alone(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    direct, group = os.urandom(16), os.urandom(16)
    store.queue([Outgoing(direct, "b", None, "to b", 1.0, ("b",))])
    store.queue([Outgoing(group, "", "squad", "to all", 2.0, ("b", "c"))])
    store.mark_sent([(direct, "b")])
    assert store.abandon("b") == (1, 1)  # pending and sent alike: its own, a group's copy
    assert store.abandon("b") == (0, 0)
    assert [(m.text, m.state) for m in store.history(peer="b")] == [("to b", "undeliverable")]
    # a group message is undeliverable only once it is for every recipient
    assert store.history(group="squad")[0].state == "pending"
    assert [e.recipient for e in store.undelivered("c")] == ["c"]
    assert store.undelivered("b") == [] and store.recipients_waiting() == ["c"]
    store.abandon("c")
    assert store.history(group="squad")[0].state == "undeliverable"
    # a receipt that was on its way still says what happened: the message did arrive
    assert store.receipts([(direct, "b", "delivered")]) == [(direct, "b", "delivered")]
    assert store.history(peer="b")[0].state == "delivered"
    assert store.counts() == {"undeliverable": 2, "delivered": 1}


def test_a_group_messages_best_state_does_not_move_back_when_a_member_is_revoked(
    tmp_path: Path,
) -> None:
    store = AgentStore(tmp_path)
    mid = os.urandom(16)
    store.queue([Outgoing(mid, "", "squad", "all", 1.0, ("b", "c"))])
    store.mark_sent([(mid, "b")])
    assert store.history(group="squad")[0].state == "sent"
    store.abandon("b")  # b had it sent; c still waits
    assert store.history(group="squad")[0].state == "sent"
    store.abandon("c")
    assert store.history(group="squad")[0].state == "undeliverable"


@pytest.mark.parametrize(
    ("what", "sql"),
    [
        ("another shape", ["CREATE TABLE high_water (ck_id BLOB, timestamp INTEGER)"]),
        (
            "values of another type",
            [
                "CREATE TABLE high_water (ck_id BLOB, role TEXT, timestamp INTEGER)",
                "INSERT INTO high_water VALUES ('not bytes', 'responder', 'not a number')",
            ],
        ),
        (
            "a state no version writes",
            [
                "CREATE TABLE outbox (id BLOB, recipient TEXT, state TEXT, attempts INTEGER)",
                "INSERT INTO outbox VALUES (x'00', 'b', 'lost', 0)",
            ],
        ),
    ],
)
def test_a_state_file_another_program_wrote_is_refused_in_one_line(
    tmp_path: Path, what: str, sql: list[str]
) -> None:
    db = sqlite3.connect(tmp_path / STATE_DB)
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="is unusable"):
        AgentStore(tmp_path)


def test_a_state_file_with_damaged_pages_is_refused_in_one_line(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    store.receive([(os.urandom(16), "b", None, "x" * 1000, float(i)) for i in range(400)])
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    path = tmp_path / STATE_DB
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 3 * page + 64] = b"\xff" * 64  # the header of a page of messages
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="is unusable"):
        AgentStore(tmp_path)


def test_a_state_file_from_before_read_receipts_and_repeats_opens(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / STATE_DB)
    db.executescript(
        "CREATE TABLE alerts (alert_id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
        "kind TEXT NOT NULL, peer TEXT, message TEXT NOT NULL, dismissed INTEGER NOT NULL "
        "DEFAULT 0);"
        "INSERT INTO alerts (at, kind, peer, message) VALUES (1.0, 'token', NULL, 'card out');"
    )
    db.close()
    store = AgentStore(tmp_path)
    assert [(a.message, a.repeats) for a in store.alerts()] == [("card out", 0)]
    assert store.owed_receipts("b") == []  # (the table is new)


def test_a_mate_reusing_another_senders_message_id_hides_nothing(tmp_path: Path) -> None:
    """A group member sees the id of a group message; sent under it first, its own chat must
    not make the real one look like a copy already held (acknowledged, never shown)."""
    store = AgentStore(tmp_path)
    mid = os.urandom(16)
    assert len(store.receive([(mid, "mallory", "squad", "fake orders", 1.0)])) == 1
    assert len(store.receive([(mid, "a", "squad", "real orders", 2.0)])) == 1
    assert store.receive([(mid, "a", "squad", "real orders", 2.0)]) == []  # a copy, once
    assert [(m.peer, m.text) for m in store.history(group="squad")] == [
        ("mallory", "fake orders"),
        ("a", "real orders"),
    ]
    assert sorted(store.mark_read(peer=None, group="squad", mates={"a", "mallory"})) == sorted(
        [(mid, "a"), (mid, "mallory")]
    )


def test_a_state_file_keyed_by_id_alone_moves_to_id_and_sender(tmp_path: Path) -> None:
    mid = os.urandom(16)
    db = sqlite3.connect(tmp_path / STATE_DB)
    db.executescript(
        "CREATE TABLE messages (id BLOB NOT NULL, direction TEXT NOT NULL, peer TEXT NOT NULL, "
        "grp TEXT, text TEXT NOT NULL, at REAL NOT NULL, read INTEGER NOT NULL DEFAULT 0, "
        "PRIMARY KEY (id, direction));"
        "CREATE INDEX messages_by_time ON messages (at);"
    )
    db.execute("INSERT INTO messages VALUES (?, 'in', 'b', NULL, 'kept', 1.0, 1)", (mid,))
    db.commit()
    db.close()
    store = AgentStore(tmp_path)
    assert [(m.text, m.read) for m in store.history(peer="b")] == [("kept", True)]
    assert store.receive([(mid, "b", None, "kept", 1.0)]) == []
    assert len(store.receive([(mid, "c", None, "other", 2.0)])) == 1


def test_the_history_is_private_even_in_a_folder_others_may_read(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(0o755)
    store = AgentStore(folder)
    store.receive([(b"\x01" * 16, "b", None, "the plan", 1.0)])
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    store.close()
    assert set(modes) >= {STATE_DB, f"{STATE_DB}-wal"}
    assert set(modes.values()) == {0o600}, modes  # was 0o644: plaintext history for everyone


def test_a_state_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    (tmp_path / STATE_DB).mkdir()  # a folder where the file goes
    with pytest.raises(StoreError, match="cannot open the agent state"):
        AgentStore(tmp_path)


def test_every_commit_is_synced_so_a_power_cut_loses_no_acknowledged_message(
    tmp_path: Path,
) -> None:
    # A power cut cannot be staged here; what decides it is SQLite's setting (WAL mode: NORMAL
    # syncs only at checkpoints, FULL at every commit), so the setting is what is pinned.
    store = AgentStore(tmp_path)
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert store.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        store.close()
