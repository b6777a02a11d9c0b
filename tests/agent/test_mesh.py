"""The agent end to end: real agent processes and real sockets on 127.0.0.1.

Each test provisions a throwaway mission (``mesh.sim``) and drives agents
through their control sockets, as the CLI and the TUI do.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable

import pytest

from mesh.agent.store import STATE_DB
from mesh.sim import Simulation

MakeSim = Callable[..., Simulation]


def ids(sim: Simulation, name: str, **args: object) -> list[str]:
    return [m["id"] for m in sim.history(name, **args) if m["direction"] == "in"]


def delivered(sim: Simulation, sender: str, message_id: str) -> bool:
    return any(
        m["id"] == message_id and m["state"] in ("delivered", "read") for m in sim.history(sender)
    )


def test_two_agents_chat_both_ways(make_sim: MakeSim) -> None:
    sim = make_sim(["alpha-1", "bravo-1"])
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 20, "the link")
    a = sim.nodes["alpha-1"].request("send", to="bravo-1", text="bravo, alpha: radio check")
    b = sim.nodes["bravo-1"].request("send", to="alpha-1", text="alpha, bravo: loud and clear")
    sim.wait_for(lambda: delivered(sim, "alpha-1", a["message_id"]), 20, "alpha's receipt")
    sim.wait_for(lambda: delivered(sim, "bravo-1", b["message_id"]), 20, "bravo's receipt")
    at_bravo = sim.history("bravo-1", peer="alpha-1")
    assert [m["text"] for m in at_bravo if m["direction"] == "in"] == ["bravo, alpha: radio check"]
    assert ids(sim, "alpha-1", peer="bravo-1") == [b["message_id"]]
    assert sim.peer_states("alpha-1") == {"bravo-1": "direct"}


def test_group_message_reaches_five_agents_once_each(make_sim: MakeSim) -> None:
    names = ["gs-1", "alpha-1", "alpha-2", "alpha-3", "uav-1", "uav-2"]
    sim = make_sim(names)
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 30, "every link")
    sent = sim.nodes["gs-1"].request("send", group="all", text="all stations: move to phase 2")
    for name in names[1:]:
        sim.wait_for(
            lambda name=name: sent["message_id"] in ids(sim, name, group="all"),
            20,
            f"{name} to receive the group message",
        )
    time.sleep(1.0)  # let any duplicate arrive, if one were sent
    for name in names[1:]:
        assert ids(sim, name, group="all") == [sent["message_id"]]
    sim.wait_for(lambda: delivered(sim, "gs-1", sent["message_id"]), 10, "receipts")


def _relayed_line(make_sim: MakeSim) -> Simulation:
    """a - b - c in a line, running, with a reaching c through b."""
    sim = make_sim(["a", "b", "c"], topology="line")
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 20, "a-b and b-c links")
    sim.wait_for(lambda: sim.peer_states("a")["c"] == "relayed", 20, "a to see c relayed")
    return sim


def test_relay_carries_end_to_end_session_it_cannot_read(make_sim: MakeSim) -> None:
    sim = _relayed_line(make_sim)
    sent = sim.nodes["a"].request("send", to="c", text="for c only")
    sim.wait_for(lambda: sent["message_id"] in ids(sim, "c", peer="a"), 20, "c to receive")
    sim.wait_for(lambda: delivered(sim, "a", sent["message_id"]), 20, "c's receipt back to a")
    # a and c hold an end-to-end session under the a-c CK; it runs through b ...
    a_sessions = sim.nodes["a"].request("sessions")
    ac = {s["ck_id"] for s in a_sessions["sessions"] if s["peer"] == "c"}
    assert ac and a_sessions["routes"]["c"] == {"via": "b", "hops": 2}
    # ... and b never holds the a-c CK: not in its bundle, not in any of its sessions.
    _, b_bundle = sim.nodes["b"].unlock()
    assert not ac & {k.ck_id.hex() for k in b_bundle.keysets}
    assert not ac & {s["ck_id"] for s in sim.nodes["b"].request("sessions")["sessions"]}
    assert "for c only" not in sim.nodes["b"].log.read_text()
    assert sim.history("b") == []
    # The pair's two relayed sessions (one each way) are logged once each, by direction.
    a_log = sim.nodes["a"].log.read_text()
    assert a_log.count("relayed session to c up") == 1
    assert a_log.count("relayed session from c up") == 1


def test_a_relayed_mate_that_restarts_is_reached_again(make_sim: MakeSim) -> None:
    """c's new session reaches a's listener as a new session, not a rekey of the old one.

    The relay's source for c stays "c" across its restart, so the wire must tell a new
    session's message 1 (INIT) from a rekey's (REKEY_INIT); a then drops its own session to
    c, whose other end went with the restart (c says so: ``SessionGone``), and opens a new one.
    """
    sim = _relayed_line(make_sim)
    first = sim.nodes["a"].request("send", to="c", text="one")
    sim.wait_for(lambda: delivered(sim, "a", first["message_id"]), 20, "the first receipt")
    sim.stop("c")
    sim.start("c")
    sim.wait_for(
        lambda: "relayed session to c is gone at c" in sim.nodes["a"].log.read_text(),
        30,
        "c's word that a's session is gone",
    )
    second = sim.nodes["a"].request("send", to="c", text="two")
    sim.wait_for(lambda: delivered(sim, "a", second["message_id"]), 20, "the second receipt")
    back = sim.nodes["c"].request("send", to="a", text="three")
    sim.wait_for(lambda: delivered(sim, "c", back["message_id"]), 20, "c's message to a")
    time.sleep(1.0)
    assert ids(sim, "c", peer="a").count(second["message_id"]) == 1


def test_message_to_an_agent_that_is_down_is_delivered_once_when_it_starts(
    make_sim: MakeSim,
) -> None:
    sim = make_sim(["a", "c"])
    sim.provision()
    sim.start("a")
    sent = sim.nodes["a"].request("send", to="c", text="read this when you wake up")
    assert sim.history("a")[0]["state"] == "pending"
    sim.stop("a")  # the sender restarts too: the outbox is on disk
    sim.start("a")
    sim.start("c")
    sim.wait_for(lambda: delivered(sim, "a", sent["message_id"]), 30, "delivery after start")
    time.sleep(1.0)
    assert ids(sim, "c", peer="a") == [sent["message_id"]]


def test_messages_to_a_mate_revoked_while_the_sender_was_down_become_undeliverable(
    make_sim: MakeSim,
) -> None:
    """The desk revokes c; a restarts on its new bundle: what waited for c is marked, once."""
    sim = make_sim(["a", "c"], groups={"pair": ["a", "c"]})
    sim.provision()
    sim.start("a")
    sent = sim.nodes["a"].request("send", to="c", text="never to arrive")
    to_group = sim.nodes["a"].request("send", group="pair", text="nor this")
    sim.stop("a")
    with sim.desk() as desk:
        now = int(time.time())
        desk.revoke("c", now=now)
        desk.export("a", sim.nodes["a"].bundle, now=now)
    sim.start("a", topology=False)  # (a --peer naming c would now be refused)
    assert [(m["id"], m["state"]) for m in sim.history("a")] == [
        (sent["message_id"], "undeliverable"),
        (to_group["message_id"], "undeliverable"),  # c was its only other member
    ]

    def revoked_alerts() -> list[dict[str, object]]:
        return [a for a in sim.nodes["a"].request("alerts")["alerts"] if a["kind"] == "revoked"]

    (alert,) = revoked_alerts()
    assert alert["message"] == (
        "c is revoked: it will be refused; 1 message to it will not be delivered (undeliverable)"
        "; 1 group message will not reach it"
    )
    sim.stop("a")
    sim.start("a", topology=False)  # nothing more to mark: no second alert
    assert revoked_alerts() == [alert]


def test_read_receipt_for_an_offline_sender_survives_kill_9(make_sim: MakeSim) -> None:
    sim = make_sim(["a", "c"])
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 20, "the link")
    sent = sim.nodes["a"].request("send", to="c", text="tell me when you have read this")
    sim.wait_for(lambda: delivered(sim, "a", sent["message_id"]), 20, "delivery")
    sim.stop("a")
    sim.wait_for(lambda: sim.peer_states("c")["a"] == "offline", 20, "c to see a gone")
    assert sim.nodes["c"].request("mark_read", peer="a") == {"marked": 1}
    sim.stop("c", kill=True)  # before any session could take the read receipt
    sim.start()
    sim.wait_for(lambda: [m["state"] for m in sim.history("a")] == ["read"], 30, "a to see it read")


def test_a_read_receipt_the_sender_never_took_in_is_sent_again(make_sim: MakeSim) -> None:
    """The link takes the receipt, but the sender dies before it reads it: it comes again."""
    sim = make_sim(["a", "c"])
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 20, "the link")
    sent = sim.nodes["a"].request("send", to="c", text="tell me when you have read this")
    sim.wait_for(lambda: delivered(sim, "a", sent["message_id"]), 20, "delivery")
    process = sim.nodes["a"].process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # a's socket still takes bytes; a reads none
    try:
        assert sim.nodes["c"].request("mark_read", peer="a") == {"marked": 1}
        time.sleep(0.5)  # c writes the receipt on the link
    finally:
        sim.stop("a", kill=True)  # (SIGKILL ends a stopped process too)
    sim.start("a")
    sim.wait_for(lambda: [m["state"] for m in sim.history("a")] == ["read"], 30, "a to see it read")

    def owed_by_c() -> int:  # a sends the receipt back: c stops sending it
        db = sqlite3.connect(f"file:{sim.nodes['c'].state / STATE_DB}?mode=ro", uri=True)
        try:
            ((count,),) = db.execute("SELECT COUNT(*) FROM read_receipts")
        finally:
            db.close()
        return int(count)

    sim.wait_for(lambda: owed_by_c() == 0, 10, "a to answer c's read receipt")


@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_kill_9_mid_stream_loses_and_duplicates_nothing(make_sim: MakeSim, victim: str) -> None:
    sim = make_sim(["a", "b"])
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 20, "the link")
    killed = "b" if victim == "receiver" else "a"
    acknowledged: list[str] = []
    for i in range(40):
        if i == 20:
            sim.stop(killed, kill=True)
            if killed == "a":
                sim.start("a")
        acknowledged.append(sim.nodes["a"].request("send", to="b", text=f"msg {i}")["message_id"])
    if killed == "b":
        sim.start("b")
    sim.wait_for(
        lambda: sorted(ids(sim, "b", peer="a")) == sorted(acknowledged),
        40,
        "every acknowledged message at b",
    )
    sim.wait_for(lambda: all(delivered(sim, "a", m) for m in acknowledged), 20, "all receipts")
    time.sleep(1.0)
    received = ids(sim, "b", peer="a")
    assert len(received) == len(set(received)) == 40


def test_mdns_discovery_on_loopback_finds_mates_without_peer_addresses(
    make_sim: MakeSim,
) -> None:
    sim = make_sim(["a", "b", "c"], mdns=True)
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 40, "links from mDNS discovery")
    for name in sim.nodes:
        assert "--peer" not in sim.agent_args(sim.nodes[name])
        assert set(sim.peer_states(name).values()) == {"direct"}


def test_strangers_revoked_and_expired_are_refused_with_an_alert(make_sim: MakeSim) -> None:
    now = time.time()
    # Provisioned two hours ago with 30-minute epochs: "old" keeps a stale clock, so it
    # presents the CK of an epoch that is over.
    sim = make_sim(["a", "b", "r", "old"], epoch_hours=0.5)
    sim.provision(now=now - 7200)
    with sim.desk() as desk:
        desk.revoke("r", now=int(now))
        for name in ("a", "b"):
            desk.export(name, sim.nodes[name].bundle, now=int(now))
    stranger = make_sim(["x", "a"])
    stranger.provision()
    port_a = sim.nodes["a"].port
    sim.start("b", topology=False)
    sim.start("a", extra=["--peer", f"b@127.0.0.1:{sim.nodes['b'].port}"], topology=False)
    sim.wait_for(lambda: sim.peer_states("a")["b"] == "direct", 20, "the honest a-b link")
    at_a = ["--peer", f"a@127.0.0.1:{port_a}"]
    sim.start("r", extra=at_a, topology=False)
    sim.start("old", extra=[*at_a, "--clock-offset", "-7000"], topology=False)
    stranger.start("x", extra=at_a, topology=False)

    def refusals() -> list[str]:
        return [
            alert["message"].rsplit(": ", 1)[-1]
            for alert in sim.nodes["a"].request("alerts")["alerts"]
            if alert["kind"] == "refused"
        ]

    # Every dialler sends a ticket with message 1; a lacks all three CKs, so it opens the
    # ticket: the stranger's is wrapped for another token, r's names a revoked node, and
    # old's CK is past its window. (Refusals of one reason from one host are one alert a
    # minute, so the stranger and r -- both on 127.0.0.1 -- share one; the log has both.)
    sim.wait_for(lambda: {"ticket-invalid", "ck-expired"} <= set(refusals()), 30, "refusals at a")
    for line, who in (("ticket names r", "r"), ("wrapped for another token", "the stranger")):
        sim.wait_for(
            lambda line=line: line in sim.nodes["a"].log.read_text(),
            30,
            f"{who}'s refusal in a's log",
        )
    log = sim.nodes["a"].log.read_text()
    assert "wrapped for another token" in log  # the stranger
    assert "ticket names r, who is revoked" in log
    kinds = {alert["kind"] for alert in sim.nodes["a"].request("alerts")["alerts"]}
    assert "revoked" in kinds
    assert sim.peer_states("a")["b"] == "direct"
    assert "r" not in sim.peer_states("a")  # a revoked node is not a mate any more
    sent = sim.nodes["a"].request("send", to="b", text="still here")
    sim.wait_for(lambda: delivered(sim, "a", sent["message_id"]), 20, "the honest link to work")
