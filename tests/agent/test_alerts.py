"""Alerts: one per cause, updated when it comes again; a flood cannot grow them."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.agent.agent import ALERT_COALESCE, Agent, AgentConfig
from mesh.agent.store import MAX_ALERTS, STATE_DB, AgentStore
from mesh.keyset.bundle import Bundle
from mesh.sim import Simulation


class Clock:
    """The agent's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agent(tmp_path: Path, clock: Clock) -> Iterator[Agent]:
    """Node a's agent, not started: ``_alert`` and its store are all these tests need."""
    with Simulation(["a", "b"], workdir=tmp_path / "sim") as sim:
        sim.provision()
        node = sim.nodes["a"]
        token, bundle = node.unlock()
        agent = Agent(AgentConfig(state_dir=node.state, mdns=False), bundle, token, clock=clock)
        try:
            yield agent
        finally:
            agent.store.close()


def test_the_same_refusal_is_alerted_once_per_window(agent: Agent, clock: Clock) -> None:
    for port in range(40000, 40500):  # a stranger, from ever new source ports
        agent._alert(
            "refused",
            None,
            f"refused a handshake from 10.0.0.9:{port}: x",
            key=("refused", "10.0.0.9", "unknown-ck"),
        )
    agent._alert(
        "refused",
        None,
        "refused a handshake from 10.0.0.8:1: x",
        key=("refused", "10.0.0.8", "unknown-ck"),
    )
    assert len(agent.store.alerts()) == 2
    clock.now += ALERT_COALESCE
    agent._alert(
        "refused",
        None,
        "refused a handshake from 10.0.0.9:1: x",
        key=("refused", "10.0.0.9", "unknown-ck"),
    )
    # the same cause a minute later: its alert says so, no new one
    first, second = agent.store.alerts()
    assert first.message.endswith("10.0.0.9:1: x") and first.repeats == 1
    assert first.at == clock.now and second.repeats == 0


def test_a_cause_that_lasts_keeps_one_alert_until_it_is_dismissed(
    agent: Agent, clock: Clock
) -> None:
    """A mate that refuses us for good (say its clock is off) is retried all day: one alert,
    its count and latest time, not one alert a minute; once dismissed, a new one."""
    for _ in range(24 * 60):  # a day, once a minute
        agent._alert("refused", "b", "refused a relayed handshake from b: ck-expired")
        clock.now += ALERT_COALESCE
    [alert] = agent.store.alerts()
    assert alert.repeats == 24 * 60 - 1 and alert.at == clock.now - ALERT_COALESCE
    assert alert.to_json()["repeats"] == alert.repeats
    assert agent.store.dismiss_alert(alert.alert_id)
    agent._alert("refused", "b", "refused a relayed handshake from b: ck-expired")
    [again] = agent.store.alerts()
    assert again.alert_id != alert.alert_id and again.repeats == 0
    # a dismissed alert is gone from the file, not kept as a row nothing reads
    assert agent.store.db.execute("SELECT COUNT(*) FROM alerts").fetchone() == (1,)


def test_alerts_not_dismissed_are_bounded_the_oldest_go(tmp_path: Path) -> None:
    store = AgentStore(tmp_path)
    try:
        for i in range(MAX_ALERTS + 5):  # strangers from ever new hosts
            store.add_alert(float(i), "refused", None, f"refused a handshake from 10.1.{i}: x")
        alerts = store.alerts()
        assert len(alerts) == MAX_ALERTS
        assert alerts[0].message.endswith("10.1.5: x")  # the five oldest were dismissed
    finally:
        store.close()


def test_a_state_file_from_before_repeats_opens_and_keeps_its_alerts(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / STATE_DB)
    db.execute(
        "CREATE TABLE alerts (alert_id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
        "kind TEXT NOT NULL, peer TEXT, message TEXT NOT NULL, "
        "dismissed INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("INSERT INTO alerts (at, kind, message) VALUES (1.0, 'token', 'card out')")
    db.execute("INSERT INTO alerts (at, kind, message, dismissed) VALUES (0.5, 'token', 'x', 1)")
    db.commit()
    db.close()
    store = AgentStore(tmp_path)
    try:
        [old] = store.alerts()
        assert old.message == "card out" and old.repeats == 0
        assert store.db.execute("SELECT COUNT(*) FROM alerts").fetchone() == (1,)  # (dismissed)
        repeated = store.repeat_alert(old.alert_id, 2.0, "card out")
        assert repeated is not None and repeated.repeats == 1
    finally:
        store.close()


def test_a_flood_of_refusals_leaves_the_other_alerts_and_the_table_bounded(
    tmp_path: Path,
) -> None:
    """Strangers from ever new hosts raise a ``refused`` alert each: the cap takes the oldest
    refusals, never a card pulled out or a revoked node (a flood would hide them), and the
    rows it takes go, so the table itself (every ``alerts`` op, every cap) stays bounded."""
    store = AgentStore(tmp_path)
    try:
        token = store.add_alert(0.0, "token", None, "the card was pulled out")
        for i in range(3 * MAX_ALERTS):
            store.add_alert(float(i), "refused", None, f"refused a handshake from 10.2.{i}: x")
        alerts = store.alerts()
        assert token in alerts
        assert sum(a.kind == "refused" for a in alerts) == MAX_ALERTS
        [(rows,)] = store.db.execute("SELECT COUNT(*) FROM alerts")
        assert rows == MAX_ALERTS + 1
    finally:
        store.close()


def test_the_last_keyset_expiring_is_alerted_once_and_again_for_a_later_bundle(
    tmp_path: Path,
) -> None:
    """``expiring``: the last CK with a mate ends within 10 minutes. Once, not every tick; and
    once more when a bundle taken since (``--as``) brought later CKs that now end too."""
    import dataclasses

    from mesh.agent.keyring import RingContents

    with Simulation(["a", "b"], workdir=tmp_path / "sim") as sim:
        sim.provision()
        node = sim.nodes["a"]
        token, full = node.unlock()
        first, second, *_ = sorted({k.not_after for k in full.keysets})  # 6-hour epochs

        def until(end: float) -> Bundle:
            return dataclasses.replace(
                full, keysets=tuple(k for k in full.keysets if k.not_after <= end)
            )

        clock = Clock()
        clock.now = first - 3600
        only_first = until(first)
        agent = Agent(AgentConfig(state_dir=node.state, mdns=False), only_first, token, clock=clock)
        try:

            def expiring() -> list[str]:
                return [a.message for a in agent.store.alerts() if a.kind == "expiring"]

            agent._warn_expiry(clock.now)
            assert expiring() == []  # an hour left
            for _ in range(3):
                clock.now = first - 300
                agent._warn_expiry(clock.now)
                clock.now += 2 * ALERT_COALESCE
            assert expiring() == ["the last keyset with b expires in 5 min"]
            clock.now = first - 200  # a bundle from the AS brings the next epoch's CK
            agent._adopt(RingContents.open(until(second), token, now=clock.now), None, clock.now)
            agent._warn_expiry(clock.now)
            assert len(expiring()) == 1  # epochs chain: b's last CK ends in 6 h now
            clock.now = second - 420
            agent._warn_expiry(clock.now)
            assert expiring()[1:] == ["the last keyset with b expires in 7 min"]
        finally:
            agent.store.close()
