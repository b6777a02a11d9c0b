"""Epoch roll: at the boundary a link moves to the new epoch's CK, losing nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

from mesh.sim import Simulation

MakeSim = Callable[..., Simulation]
EPOCH_HOURS = 0.5


def link_ck(sim: Simulation, name: str, peer: str) -> str | None:
    for session in sim.nodes[name].request("sessions")["sessions"]:
        if session["peer"] == peer and session["kind"] == "link":
            return str(session["ck_id"])
    return None


def test_link_rolls_to_the_next_epoch_ck_without_losing_a_message(make_sim: MakeSim) -> None:
    now = time.time()
    sim = make_sim(["a", "b"], epoch_hours=EPOCH_HOURS)
    sim.provision(now=now)  # the mission starts at now - 60 s
    with sim.desk() as desk:
        epochs = list(desk.mission.epochs())
    # Run both agents with clocks set 5 s before the end of epoch 0: at the boundary the
    # dialler must roll the link onto epoch 1's CK.
    offset = ["--clock-offset", str(epochs[0].end - 5 - now)]
    sim.start("b", extra=offset, topology=False)
    sim.start("a", extra=[*offset, "--peer", f"b@127.0.0.1:{sim.nodes['b'].port}"], topology=False)
    sim.wait_for(lambda: link_ck(sim, "a", "b") is not None, 20, "the first link")
    first_ck = link_ck(sim, "a", "b")
    sent = [sim.nodes["a"].request("send", to="b", text="before the roll")["message_id"]]
    sim.wait_for(lambda: link_ck(sim, "a", "b") not in (first_ck, None), 30, "the roll to epoch 1")
    rolled = link_ck(sim, "a", "b")
    assert rolled == link_ck(sim, "b", "a")  # both ends kept the same, new link
    sent.append(sim.nodes["a"].request("send", to="b", text="after the roll")["message_id"])

    def received() -> list[str]:
        return [m["id"] for m in sim.history("b", peer="a") if m["direction"] == "in"]

    sim.wait_for(lambda: sorted(received()) == sorted(sent), 20, "both messages at b")
    time.sleep(1.0)
    assert sorted(received()) == sorted(sent)  # exactly once each
    with sim.desk() as desk:
        ck_epochs = {
            row[0].hex(): row[1]
            for row in desk.store.db.execute("SELECT ck_id, epoch FROM keysets")
        }
    assert ck_epochs[str(first_ck)] == 0
    assert ck_epochs[rolled] == 1
