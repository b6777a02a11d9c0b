"""The app state's transitions: idempotent, delivery never moves backwards, unread counting."""

from __future__ import annotations

import dataclasses

from tui.link import Snapshot
from tui.model import MAX_MESSAGES_PER_CONVERSATION, AppState, Connection
from tui.state import (
    AgentInfo,
    Alert,
    AlertKind,
    AlertUpdate,
    Conversation,
    Delivery,
    Epoch,
    EpochUpdate,
    Message,
    MessageUpdate,
    Mission,
    ReceiptUpdate,
    TokenStatus,
)

GS1 = Conversation("peer", "gs-1")
SQUAD = Conversation("group", "squad")
INFO = AgentInfo(
    "alpha-1",
    "soldier",
    Mission("op", "ab", 0, 10, 5),
    Epoch(0, 0, 5),
    TokenStatus("ok", ""),
    "127.0.0.1:1",
    1,
    "0.1.0",
)


def message(
    mid: str,
    *,
    direction: str = "in",
    group: str | None = None,
    at: float = 1.0,
    state: Delivery = Delivery.DELIVERED,
    read: bool = False,
) -> Message:
    return Message(
        mid, "out" if direction == "out" else "in", "gs-1", group, f"text {mid}", at, state, read
    )


def test_replaying_events_over_a_snapshot_changes_nothing() -> None:
    events = [
        MessageUpdate(message("a")),
        MessageUpdate(message("b", direction="out", state=Delivery.PENDING)),
        ReceiptUpdate("b", "gs-1", Delivery.DELIVERED),
        AlertUpdate(Alert(1, 2.0, AlertKind.REFUSED, "bravo-9", "refused")),
    ]
    state = AppState()
    for event in events:
        state = state.with_event(event)
    replayed = state
    for event in events:
        replayed = replayed.with_event(event)
    assert replayed == state
    assert state.history(GS1)[1].state is Delivery.DELIVERED


def test_delivery_state_never_moves_backwards() -> None:
    state = AppState().with_messages([message("b", direction="out", state=Delivery.READ)])
    state = state.with_receipt("b", Delivery.DELIVERED)
    state = state.with_messages([message("b", direction="out", state=Delivery.PENDING)])
    assert state.history(GS1)[0].state is Delivery.READ
    assert state.with_receipt("unknown", Delivery.READ) == state


def test_a_refetch_marks_a_waiting_message_undeliverable_but_not_one_that_arrived() -> None:
    """The agent marks messages to a revoked mate ``undeliverable``; a late receipt still wins."""
    waiting = AppState().with_messages([message("b", direction="out", state=Delivery.SENT)])
    marked = waiting.with_messages([message("b", direction="out", state=Delivery.UNDELIVERABLE)])
    assert marked.history(GS1)[0].state is Delivery.UNDELIVERABLE
    assert marked.with_receipt("b", Delivery.DELIVERED).history(GS1)[0].state is Delivery.DELIVERED
    read = AppState().with_messages([message("b", direction="out", state=Delivery.READ)])
    again = read.with_messages([message("b", direction="out", state=Delivery.UNDELIVERABLE)])
    assert again.history(GS1)[0].state is Delivery.READ


def test_unread_counts_and_opening_a_conversation_reads_it() -> None:
    state = AppState().with_messages(
        [
            message("a"),
            message("b", read=True),
            message("c", group="squad"),
            message("d", direction="out"),
        ]
    )
    assert (state.unread(GS1), state.unread(SQUAD)) == (1, 1)
    opened = state.with_active(GS1)
    assert (opened.unread(GS1), opened.unread(SQUAD), opened.active) == (0, 1, GS1)
    assert opened.with_read(GS1) == opened


def test_messages_are_kept_in_time_order_and_capped() -> None:
    many = [message(f"{i:04x}", at=float(i)) for i in range(MAX_MESSAGES_PER_CONVERSATION + 5)]
    state = AppState().with_messages(reversed(many))
    thread = state.history(GS1)
    assert len(thread) == MAX_MESSAGES_PER_CONVERSATION
    assert thread[0].at == 5.0 and thread[-1].at == float(len(many) - 1)


def test_snapshot_replaces_peers_and_alerts_but_merges_history() -> None:
    before = (
        AppState()
        .with_messages([message("old", read=True)])
        .with_alert(Alert(9, 1.0, AlertKind.TOKEN, None, "gone since"))
        .with_active(GS1)
    )
    snapshot = Snapshot(INFO, (), (), (message("old"), message("new")), (), ())
    after = before.with_snapshot(snapshot, Connection.RECONNECTED)
    assert after.alerts == () and after.info == INFO and after.active == GS1
    assert [m.id for m in after.history(GS1)] == ["old", "new"]
    assert after.history(GS1)[0].read  # read here stays read
    assert after.connection is Connection.RECONNECTED and after.online


def test_epoch_event_moves_the_status_on() -> None:
    state = dataclasses.replace(AppState(), info=INFO).with_event(EpochUpdate(Epoch(1, 5, 10)))
    assert state.info is not None and state.info.epoch == Epoch(1, 5, 10)
    assert AppState().with_event(EpochUpdate(Epoch(1, 5, 10))) == AppState()


def test_conversations_list_mates_then_groups_then_strangers_from_history() -> None:
    state = AppState().with_messages([message("x", group="ghost")])
    assert state.conversations() == (Conversation("group", "ghost"),)
    assert state.without_alert(4) == state


def test_two_senders_messages_under_one_id_are_both_shown() -> None:
    """The agent keys a message by id and sender (a mate may reuse another's id)."""
    mine = message("x", direction="out", group="squad", state=Delivery.SENT)
    real = dataclasses.replace(message("x", group="squad"), peer="alpha-2", text="real")
    fake = dataclasses.replace(message("x", group="squad"), peer="mallory", text="fake")
    state = AppState().with_messages([fake, mine, real, real])
    assert [(m.peer, m.text) for m in state.history(SQUAD)] == [
        ("mallory", "fake"),
        ("gs-1", "text x"),
        ("alpha-2", "real"),
    ]
    state = state.with_receipt("x", Delivery.READ)  # a receipt is for a message we sent
    assert [m.state for m in state.history(SQUAD)] == [
        Delivery.DELIVERED,
        Delivery.READ,
        Delivery.DELIVERED,
    ]
