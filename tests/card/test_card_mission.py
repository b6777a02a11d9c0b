"""A mission on two virtual cards, end to end through the command line and real agents.

The desk personalises two blank cards (``--token pcsc:READER``), exports their
bundles and rekeys one; two agent processes run on the cards and chat; one
card is pulled out mid-session (the session goes on, new handshakes are
refused, hello and an alert say so) and put back (the agent recovers by
itself). Everything goes through pcscd and the vpcd driver.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mesh.sim import Simulation
from mesh.sim.harness import PASSPHRASE, PIN
from tests.card.conftest import CardSlot

NODES = ("alpha-1", "gs-1")


def snrmesh(*args: str, cwd: Path, pin: str = PIN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SNRMESH_DESK_PASSPHRASE": PASSPHRASE, "SNRMESH_PIN": pin}
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def delivered(sim: Simulation, sender: str, message_id: str) -> bool:
    return any(
        m["id"] == message_id and m["state"] in ("delivered", "read") for m in sim.history(sender)
    )


def token_state(sim: Simulation, name: str) -> str:
    state: str = sim.nodes[name].request("hello")["token"]["state"]
    return state


def token_alerts(sim: Simulation, name: str) -> list[dict[str, Any]]:
    return [a for a in sim.nodes[name].request("alerts")["alerts"] if a["kind"] == "token"]


def preamble_sent(port: int) -> bool:
    """Whether an agent answers a new connection (with its discovery preamble) or drops it."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.settimeout(2)
        try:
            return conn.recv(1) != b""
        except ConnectionResetError:
            return False


def test_a_mission_on_two_cards(slots: list[CardSlot], tmp_path: Path) -> None:
    cards = dict(zip(NODES, slots, strict=True))
    for slot in cards.values():
        slot.insert()
    ok(snrmesh("desk", "init", "desk", "--mission", "cards", "--hours", "24", cwd=tmp_path))
    for node, role in zip(NODES, ("soldier", "ground-station"), strict=True):
        out = ok(
            snrmesh(
                "desk",
                "enrol",
                "desk",
                node,
                "--role",
                role,
                "--token",
                cards[node].spec,
                cwd=tmp_path,
            )
        )
        assert node in out
    refused = snrmesh(
        "desk", "personalise", "desk", "alpha-1", "--token", cards["alpha-1"].spec, cwd=tmp_path
    )
    assert refused.returncode == 1 and "already has a token" in refused.stderr
    ok(snrmesh("desk", "group", "desk", "squad", *NODES, cwd=tmp_path))
    ok(snrmesh("desk", "issue", "desk", cwd=tmp_path))

    sim = Simulation(list(NODES), workdir=tmp_path / "sim", heartbeat=2.0)
    for node in NODES:
        sim.nodes[node].token_spec = cards[node].spec
        sim.nodes[node].folder.mkdir(parents=True)
        ok(
            snrmesh(
                "desk", "export", "desk", node, "--out", str(sim.nodes[node].bundle), cwd=tmp_path
            )
        )
    readers = ok(snrmesh("card", "readers", cwd=tmp_path))
    assert "snrmesh card of alpha-1 (soldier), closed" in readers
    inspected = ok(
        snrmesh(
            "bundle",
            "inspect",
            str(sim.nodes["alpha-1"].bundle),
            "--token",
            cards["alpha-1"].spec,
            cwd=tmp_path,
        )
    )
    assert "integrity OK" in inspected and "gs-1" in inspected
    wrong = snrmesh(
        "bundle",
        "inspect",
        str(sim.nodes["alpha-1"].bundle),
        "--token",
        cards["alpha-1"].spec,
        cwd=tmp_path,
        pin="0000",
    )
    assert (
        wrong.returncode == 1
        and wrong.stderr.strip()
        == "snrmesh: error: wrong PIN (4 tries left before the token locks)"
    )

    with sim:
        sim.start()
        sim.wait_for(sim.links_up, 20, "the link between the cards' agents")
        first = sim.nodes["alpha-1"].request("send", to="gs-1", text="gs, alpha: on my card")
        sim.wait_for(
            lambda: delivered(sim, "alpha-1", first["message_id"]), 20, "the first receipt"
        )
        assert token_state(sim, "alpha-1") == "ok"

        # Pull alpha's card out mid-session.
        cards["alpha-1"].pull()
        sim.wait_for(lambda: token_state(sim, "alpha-1") == "absent", 10, "alpha to miss its card")
        assert "new handshakes refused" in token_alerts(sim, "alpha-1")[-1]["message"]
        second = sim.nodes["gs-1"].request("send", to="alpha-1", text="alpha, gs: still hear you")
        sim.wait_for(
            lambda: delivered(sim, "gs-1", second["message_id"]),
            20,
            "a receipt over the old session",
        )
        assert not preamble_sent(sim.nodes["alpha-1"].port)  # no new handshake accepted...
        sim.stop("gs-1")
        sim.start("gs-1")
        time.sleep(3.0)  # ...and none dialled: gs-1 is back, but alpha-1 stays away
        assert sim.peer_states("alpha-1")["gs-1"] != "direct"

        # Put it back: the agent re-verifies the PIN by itself and links again.
        cards["alpha-1"].insert()
        sim.wait_for(lambda: token_state(sim, "alpha-1") == "ok", 10, "alpha to find its card")
        assert "back" in token_alerts(sim, "alpha-1")[-1]["message"]
        assert preamble_sent(sim.nodes["alpha-1"].port)
        sim.wait_for(sim.links_up, 30, "the link again")
        third = sim.nodes["alpha-1"].request("send", to="gs-1", text="gs, alpha: card back in")
        sim.wait_for(lambda: delivered(sim, "alpha-1", third["message_id"]), 20, "the last receipt")

    # The desk rekeys a card like a token file: the old bundle stops working, a new one works.
    old_bundle = sim.nodes["alpha-1"].bundle
    ok(snrmesh("desk", "rekey", "desk", "alpha-1", "--token", cards["alpha-1"].spec, cwd=tmp_path))
    stale = snrmesh(
        "bundle", "inspect", str(old_bundle), "--token", cards["alpha-1"].spec, cwd=tmp_path
    )
    assert stale.returncode == 1 and "older key generation" in stale.stderr
    ok(snrmesh("desk", "export", "desk", "alpha-1", "--out", "alpha-2.bundle", cwd=tmp_path))
    ok(
        snrmesh(
            "bundle", "inspect", "alpha-2.bundle", "--token", cards["alpha-1"].spec, cwd=tmp_path
        )
    )
