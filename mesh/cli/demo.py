"""``snrmesh demo``: a live mission on this machine, with the TUI on the ground station.

A throwaway desk provisions a ground station (gs-1), two soldiers (alpha-1,
alpha-2) and a UAV (uav-1) that only alpha-1 can reach directly, so gs-1
talks to it through a relay. Four agents start on 127.0.0.1 (mDNS off), with
simulated positions and batteries; a script has the mates report in and
answer whatever the operator writes to them ("copy that: ..."), and marks it
read. Quitting stops every process and deletes every file the demo made.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
import time
from typing import Any

from mesh.agent.client import ControlClient
from mesh.errors import MeshError
from mesh.sim import MAX_RUN_SECONDS, Simulation

__all__ = ["GROUND_STATION", "MATES", "register", "run_demo"]

GROUND_STATION = "gs-1"
MATES = ("alpha-1", "alpha-2", "uav-1")
ROLES = {"gs-1": "ground-station", "alpha-1": "soldier", "alpha-2": "soldier", "uav-1": "uav"}
# uav-1 is in direct reach of alpha-1 only.
CUTS = (("gs-1", "uav-1"), ("alpha-2", "uav-1"))
POSITIONS = {
    "gs-1": "48.8566,2.3522,35",
    "alpha-1": "48.8600,2.3400,40",
    "alpha-2": "48.8620,2.3450,38",
    "uav-1": "48.8700,2.3300,350",
}
SCRIPT = (  # (seconds after start, sender, recipient or "#group", text)
    (2.0, "alpha-1", GROUND_STATION, "gs-1, alpha-1: in position at checkpoint north"),
    (4.0, "uav-1", GROUND_STATION, "gs-1, uav-1: on station, camera up (via alpha-1)"),
    (6.0, "alpha-2", "#all", "all stations, alpha-2: road clear, moving up"),
)

DEMO_HELP = """\
Run a live mission on this machine: a desk provisions gs-1 (ground station),
alpha-1, alpha-2 (soldiers) and uav-1 (a UAV only alpha-1 reaches directly);
their agents start on 127.0.0.1; the mates report in; the terminal UI opens on
gs-1 so you can chat straight away (F2 peers, Enter to open a chat, type,
Enter to send; the mates answer). Ctrl+Q quits and cleans up everything.
Without a terminal, or with --headless, the same scenario runs for --duration
seconds and prints a report. Nothing leaves this machine.
"""


def _bot(sim: Simulation, name: str, stop: threading.Event) -> None:
    """Answer every chat the operator sends to ``name``, and mark it read."""
    while not stop.is_set():
        try:
            with ControlClient(str(sim.nodes[name].control), timeout=None) as client:
                for event in client.events():
                    if stop.is_set():
                        return
                    message = event.get("message") if event.get("event") == "message" else None
                    if not isinstance(message, dict) or message.get("direction") != "in":
                        continue
                    sender, group = message.get("peer"), message.get("group")
                    if sender != GROUND_STATION or group is not None:
                        continue
                    sim.nodes[name].request("mark_read", peer=sender)
                    text = str(message.get("text", ""))[:200]
                    sim.nodes[name].request("send", to=sender, text=f"copy that: {text}")
        except MeshError:
            time.sleep(0.5)


def _script(sim: Simulation, started: float, stop: threading.Event) -> None:
    for at, sender, target, text in SCRIPT:
        if stop.wait(max(0.0, started + at - time.monotonic())):
            return
        args: dict[str, Any] = {"group": target[1:]} if target.startswith("#") else {"to": target}
        with contextlib.suppress(MeshError):
            sim.nodes[sender].request("send", text=text, **args)


def run_demo(*, headless: bool, duration: float, say: Any = print) -> dict[str, Any]:
    with Simulation(
        [GROUND_STATION, *MATES], topology="full", cuts=CUTS, roles=ROLES, heartbeat=5.0
    ) as sim:
        say("provisioning a throwaway mission (desk, 4 tokens, keysets, bundles) ...")
        sim.provision()
        for name in sim.nodes:
            sim.start(
                name,
                extra=[
                    "--position",
                    POSITIONS[name],
                    "--simulate-track",
                    "--battery",
                    "87" if name != "uav-1" else "64",
                    "--status-text",
                    f"{ROLES[name]} ready",
                ],
            )
        say(f"agents running on 127.0.0.1; control sockets under {sim.workdir}")
        sim.wait_for(sim.links_up, 30, "the direct links")
        stop = threading.Event()
        threads = [threading.Thread(target=_bot, args=(sim, m, stop), daemon=True) for m in MATES]
        threads.append(
            threading.Thread(target=_script, args=(sim, time.monotonic(), stop), daemon=True)
        )
        for thread in threads:
            thread.start()
        try:
            if headless:
                time.sleep(duration)
            else:
                from tui.app import SnrmeshApp

                SnrmeshApp(str(sim.nodes[GROUND_STATION].control)).run()
        finally:
            stop.set()
        report = {
            "peers": {
                p["identity"]: p["state"] + (f" via {p['via']}" if p["via"] else "")
                for p in sim.nodes[GROUND_STATION].request("peers")["peers"]
            },
            "messages": [
                {
                    "from": m["peer"] if m["direction"] == "in" else GROUND_STATION,
                    "to": m["group"] or (GROUND_STATION if m["direction"] == "in" else m["peer"]),
                    "text": m["text"],
                    "state": m["state"],
                }
                for m in sim.history(GROUND_STATION)
            ],
        }
        say("stopping the agents and removing the demo's files ...")
    return report


def cmd_demo(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.duration) and 0 <= args.duration <= MAX_RUN_SECONDS):
        # before anything starts: it was a traceback once the four agents were up
        raise MeshError(f"--duration is a number of seconds, 0..{MAX_RUN_SECONDS:,.0f}")
    headless = args.headless or not (sys.stdin.isatty() and sys.stdout.isatty())

    def say(*parts: object) -> None:
        if not args.json:
            print(*parts, file=sys.stderr, flush=True)

    if headless and not args.headless:
        say("no terminal: running headless (use a terminal for the TUI)")

    def leave(signum: int, frame: object) -> None:  # a closed terminal or a kill: still clean up
        raise SystemExit(128 + signum)

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, leave)
    report = run_demo(headless=headless, duration=args.duration, say=say)
    if args.json:
        import json

        print(json.dumps(report, indent=2))
        return 0
    print("gs-1's view of its dialogue mates:")
    for peer, state in report["peers"].items():
        print(f"  {peer:<10} {state}")
    print("gs-1's messages:")
    for m in report["messages"]:
        print(
            f"  {m['from']:>8} -> {m['to']:<8} {m['text']}"
            + (f"  ({m['state']})" if m["state"] else "")
        )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "demo",
        help="a live demo mission on this machine, with the TUI",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--headless",
        action="store_true",
        help="no TUI: run the scenario for --duration seconds and print a report",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=15.0,
        metavar="S",
        help="headless run time in seconds, 0..86,400 (default: 15)",
    )
    p.add_argument("--json", action="store_true", help="headless report as JSON")
    p.set_defaults(func=cmd_demo)
