#!/usr/bin/env python3
"""How the mesh agent performs on this machine: pairing time, link throughput, latency, memory.

Figures (issue 4), each next to a baseline measured in the same run:

* time for N agents (separate processes, full mesh on 127.0.0.1) to secure
  every pair, for N = 10, 25, 50;
* chat messages per second over one link (100-byte texts, through the whole
  agent: outbox, session record, TCP, inbox, receipt back), next to the raw
  session-record rate of the protocol core in memory;
* end-to-end latency, direct and through one relay (send request to the
  recipient's ``message`` event);
* resident memory per agent.

    python bench/mesh.py                  # everything (a few minutes)
    python bench/mesh.py --sizes 10 --messages 2000 --json   # a quick run
"""

# ruff: noqa: E402 - the path fix below must precede the imports
from __future__ import annotations

import sys

# bench/ also holds token.py, which would shadow the standard library's ``token``
# (inspect -> tokenize): import from the repository root instead
sys.path[0] = __file__.rsplit("/", 2)[0] or "."

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.agent.agent import Agent, AgentConfig
from mesh.agent.client import ControlClient
from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol import Connection, DataReceived, MemoryKeyStore, Role, SessionConfig
from mesh.sim import Simulation

TEXT = "x" * 100


def raw_records_per_second(count: int, size: int = 100) -> float:
    """The protocol core alone: seal, frame, parse, open, both ends in memory, one core."""
    now = time.time()
    ck = CommunicationKeyset(
        os.urandom(16), os.urandom(32), b"m" * 16, "a", "b", int(now) - 10, int(now) + 3600
    )
    keys = MemoryKeyStore([ck])
    a = Connection(
        config=SessionConfig(identity="a", mission_id=b"m" * 16), keys=keys, role=Role.INITIATOR
    )
    b = Connection(
        config=SessionConfig(identity="b", mission_id=b"m" * 16), keys=keys, role=Role.RESPONDER
    )
    a.connect(ck.ck_id, now)
    b.receive_data(a.data_to_send(), now)
    a.receive_data(b.data_to_send(), now)
    a.send_data(b"confirm", now)
    b.receive_data(a.data_to_send(), now)
    while b.next_event() is not None:
        pass
    payload = os.urandom(size)
    start = time.perf_counter()
    for _ in range(count // 100):
        for _ in range(100):
            a.send_data(payload, now)
        b.receive_data(a.data_to_send(), now)
        while (event := b.next_event()) is not None:
            assert isinstance(event, DataReceived)
    return count / (time.perf_counter() - start)


def pairing(n: int) -> dict[str, Any]:
    with Simulation(n, topology="full") as sim:
        sim.provision()
        t0 = time.monotonic()
        sim.start()
        started = time.monotonic() - t0
        linked = sim.wait_for(sim.links_up, 300, f"{n * (n - 1) // 2} links")
        rss = [r for r in (sim.rss_mib(name) for name in sim.nodes) if r is not None]
        return {
            "agents": n,
            "pairs": n * (n - 1) // 2,
            "processes_started_s": round(started, 2),
            "all_pairs_secured_s": round(started + linked, 2),
            "rss_mib_median": round(statistics.median(rss), 1),
            "rss_mib_max": round(max(rss), 1),
        }


def link_throughput(count: int) -> dict[str, Any]:
    """Receiver: an agent process. Sender: an agent in this process, fed as fast as it takes."""
    with Simulation(["a", "b"]) as sim:
        sim.provision()
        sim.start("b", topology=False)
        node = sim.nodes["a"]
        token, bundle = node.unlock()
        config = AgentConfig(
            state_dir=node.state,
            listen=("127.0.0.1", node.port),
            peers=(f"b@127.0.0.1:{sim.nodes['b'].port}",),
            mdns=False,
        )

        async def run() -> tuple[float, int]:
            agent = Agent(config, bundle, token)
            await agent.start()
            while "b" not in agent.links:
                await asyncio.sleep(0.05)
            start = time.perf_counter()
            # As if many clients sent at once: the agent group-commits each burst.
            for first in range(0, count, 256):
                burst = range(first, min(count, first + 256))
                await asyncio.gather(*(agent._op_send({"to": "b", "text": TEXT}) for _ in burst))
            while agent.store.counts().get("delivered", 0) < count:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - start
            await agent.stop()
            return elapsed, count

        elapsed, sent = asyncio.run(run())
        received = len(sim.history("b", peer="a", limit=10_000))
    return {
        "messages": sent,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(sent / elapsed),
        "received_at_b_last_10k": received,
    }


def latency(samples: int) -> dict[str, Any]:
    with Simulation(["a", "b", "c"], topology="line") as sim:
        sim.provision()
        sim.start()
        sim.wait_for(sim.links_up, 30, "links")
        sim.wait_for(lambda: sim.peer_states("a")["c"] == "relayed", 30, "relayed session")
        results = {}
        for target in ("b", "c"):
            times = []
            for _ in range(samples):
                got = threading.Event()
                with ControlClient(str(sim.nodes[target].control), timeout=None) as watcher:
                    stream = watcher.events()
                    t0 = time.perf_counter()
                    sim.nodes["a"].request("send", to=target, text=TEXT)
                    for event in stream:
                        if event.get("event") == "message":
                            times.append(time.perf_counter() - t0)
                            got.set()
                            break
            results["direct_ms" if target == "b" else "one_relay_ms"] = {
                "median": round(statistics.median(times) * 1000, 2),
                "max": round(max(times) * 1000, 2),
            }
        return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    figures: dict[str, Any] = {"cores": os.cpu_count()}
    log("raw session records (protocol core, in memory) ...")
    figures["raw_records_per_s_100B"] = round(raw_records_per_second(100_000))
    log("chat over one link ...")
    figures["link"] = link_throughput(args.messages)
    figures["link"]["ratio_vs_raw_records"] = round(
        figures["link"]["messages_per_s"] / figures["raw_records_per_s_100B"], 3
    )
    log("latency, direct and through one relay ...")
    figures["latency"] = latency(args.samples)
    figures["pairing"] = []
    for n in args.sizes:
        log(f"{n} agents, full mesh ...")
        figures["pairing"].append(pairing(n))
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    link = figures["link"]
    print(
        f"one link: {link['messages_per_s']} chat msgs/s (100-byte texts, {link['messages']} "
        f"messages with receipts) vs raw session records {figures['raw_records_per_s_100B']}/s "
        f"in memory -> ratio {link['ratio_vs_raw_records']}  (goal: >= 20000 msgs/s)"
    )
    lat = figures["latency"]
    print(
        f"latency: direct {lat['direct_ms']['median']} ms, through one relay "
        f"{lat['one_relay_ms']['median']} ms (medians of {args.samples})"
    )
    for p in figures["pairing"]:
        print(
            f"{p['agents']:>3} agents: {p['pairs']:>5} pairs secured in "
            f"{p['all_pairs_secured_s']:6.2f} s (processes up after {p['processes_started_s']} s); "
            f"RSS per agent median {p['rss_mib_median']} MiB, max {p['rss_mib_max']} MiB  "
            f"(goals: 50 agents < 30 s, < 60 MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
