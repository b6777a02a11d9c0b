"""``snrmesh sim``: provision a throwaway mission, run N agents on loopback, report."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from mesh.errors import MeshError
from mesh.sim import MAX_RUN_SECONDS, TOPOLOGIES, SimError, Simulation
from mesh.sim.topology import SQUAD_SIZE

__all__ = ["register", "run_scenario"]

SIM_HELP = """\
Provision a throwaway mission (one desk, N nodes, one group 'all' so every
node is a dialogue mate of every other), start N agents as separate processes
on 127.0.0.1, and run a scenario: wait until every pair in reach has a secure
link, then every node sends one message to the next node and the first node
sends one message to the whole group. Mates out of direct reach (line or
squads topologies, --cut) are reached through relays. Prints what happened;
nothing leaves this machine.

examples:
  snrmesh sim --nodes 5
  snrmesh sim --nodes 6 --topology line --json
  snrmesh sim --nodes 10 --topology squads --cut node-01-node-02
"""


def _cut(text: str) -> tuple[str, str]:
    for i, ch in enumerate(text):
        if ch == "-" and text[:i].count("-") == text[i + 1 :].count("-") and i:
            return text[:i], text[i + 1 :]
    raise argparse.ArgumentTypeError(f"expected NODE_A-NODE_B, got {text!r}")


def run_scenario(sim: Simulation, *, duration: float, log: Any = None) -> dict[str, Any]:
    say = log or (lambda *a: None)
    started = time.monotonic()
    sim.provision()
    provisioned = time.monotonic()
    say(f"provisioned {len(sim.nodes)} nodes in {provisioned - started:.1f} s; starting agents")
    sim.start()
    running = time.monotonic()
    say(f"agents answering after {running - provisioned:.1f} s; waiting for links")
    links_s = sim.wait_for(sim.links_up, duration, "every link in reach to come up")
    say(f"every link in reach is up after {links_s:.1f} s; sending")
    names = list(sim.nodes)
    sent: list[tuple[str, str, str]] = []  # sender, recipient, message id
    t_send = time.monotonic()
    for i, name in enumerate(names):
        target = names[(i + 1) % len(names)]
        if target != name:
            result = sim.nodes[name].request("send", to=target, text=f"hello {target}, from {name}")
            sent.append((name, target, result["message_id"]))
    if len(names) > 1:
        result = sim.nodes[names[0]].request("send", group="all", text="hello all")
        sent += [(names[0], n, result["message_id"]) for n in names[1:]]

    def received(item: tuple[str, str, str]) -> bool:
        sender, recipient, mid = item
        return any(m["id"] == mid for m in sim.history(recipient, peer=sender, limit=50)) or any(
            m["id"] == mid for m in sim.history(recipient, group="all", limit=50)
        )

    def delivered_all() -> bool:
        return all(received(item) for item in sent)

    try:
        deliver_s: float | None = sim.wait_for(delivered_all, duration, "every message")
    except SimError:
        deliver_s = None
    delivered = sum(received(item) for item in sent)
    peers = {n: sim.peer_states(n) for n in names}
    report = {
        "nodes": len(names),
        "topology": sim.topology,
        "links_in_reach": len(sim.reach),
        "seconds": {
            "provision": round(provisioned - started, 2),
            "start_agents": round(running - provisioned, 2),
            "all_links_up": round(links_s, 2),
            "all_delivered": None if deliver_s is None else round(deliver_s, 2),
        },
        "messages": {"sent": len(sent), "delivered": delivered},
        "peer_states": {
            n: {s: sum(1 for v in states.values() if v == s) for s in set(states.values())}
            for n, states in peers.items()
        },
        "rss_mib": {n: sim.rss_mib(n) for n in names},
        "send_to_delivered_s": None if deliver_s is None else round(time.monotonic() - t_send, 2),
    }
    return report


def cmd_sim(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 200:
        raise MeshError("--nodes must be 1..200")
    if not (math.isfinite(args.duration) and 0 < args.duration <= MAX_RUN_SECONDS):
        # -1 and nan were taken: every wait timed out at once, or never
        raise MeshError(
            f"--duration is a number of seconds, more than 0 and at most {MAX_RUN_SECONDS:,.0f}"
        )
    names = {f"node-{i:02d}" for i in range(1, args.nodes + 1)}
    for a, b in args.cut:  # a typo cut nothing, and the run went on as if it had
        unknown = sorted({a, b} - names)
        if unknown:
            last = f"node-{args.nodes:02d}"
            raise MeshError(f"--cut {a}-{b}: no node {unknown[0]} (the nodes are node-01..{last})")
        if a == b:
            raise MeshError(f"--cut {a}-{b}: a node has no link to itself")
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    with Simulation(args.nodes, topology=args.topology, cuts=args.cut, mdns=args.mdns) as sim:
        report = run_scenario(sim, duration=args.duration, log=say)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["messages"]["delivered"] == report["messages"]["sent"] else 1
    s, m = report["seconds"], report["messages"]
    print(
        f"{report['nodes']} agents, topology {report['topology']}: "
        f"{report['links_in_reach']} links in reach, all up after {s['all_links_up']} s"
    )
    print(
        f"messages: {m['delivered']}/{m['sent']} delivered"
        + (f" in {s['all_delivered']} s" if s["all_delivered"] is not None else " (timed out)")
    )
    for name, states in report["peer_states"].items():
        rss = report["rss_mib"][name]
        print(
            f"  {name}: "
            + ", ".join(f"{v} {k}" for k, v in sorted(states.items()))
            + (f"  ({rss:.0f} MiB)" if rss else "")
        )
    return 0 if m["delivered"] == m["sent"] else 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "sim",
        help="simulate a mission with N agents on loopback",
        description=SIM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--nodes", type=int, default=5, metavar="N", help="number of agents, 1..200 (default: 5)"
    )
    p.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="full",
        help="who is in direct reach of whom: full, everyone; line, each node its two "
        f"neighbours; squads, squads of {SQUAD_SIZE} in full reach, their first nodes in a line "
        "(default: full)",
    )
    p.add_argument(
        "--cut",
        type=_cut,
        action="append",
        default=[],
        metavar="A-B",
        help="also cut the direct link between nodes A and B, e.g. node-01-node-02 (repeatable)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=60.0,
        metavar="S",
        help="give up waiting after S seconds per phase, at most 86,400 (default: 60)",
    )
    p.add_argument(
        "--mdns",
        action="store_true",
        help="discover with mDNS bound to 127.0.0.1 instead of --peer lists",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_sim)
