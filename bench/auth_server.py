#!/usr/bin/env python3
"""Authentication Server at smart-meter scale: enrolment, sustained issuance, reconnect storm.

1. **Enrolment**: ``import_meters`` of ``--meters`` meters (default 1 M) into a
   fresh desk: time, rows/s and peak RSS (streamed: memory must stay flat).
2. **Sustained issuance**: ``snrmesh as serve`` with ``--workers`` processes on
   that store; ``--clients`` concurrent meter loops, each authenticating and
   fetching one keyset per link (a durable store commit per keyset: the
   requestor's key-state row, the CK, the audit row) for ``--seconds``.
   Reports keysets/s and p50/p99 latency of one full link (TCP connect,
   HELLO, Noise handshake, challenge, keyset). Each meter loop's meters are
   made before its clock starts (keys are written at the factory, not at
   each connection); meters and AS run on the same event loop (uvloop where
   installed). The baselines, measured in the same run: the **floors** of a
   link (``bench/link_floors.py``: the bare NNpsk0 handshake, loopback TCP
   carrying the link's flights, the store's lookup and durable issuance),
   their sum set against the goal's CPU budget per link (cores / 1,200 per
   second) and against what the sustained run spent; and the same sustained
   run on SQLite, for ``--baseline-seconds``, with the AS and the meters on
   asyncio's own loop.
   Then, for ``--prefetch-seconds``, links that each fetch two keysets, the
   epoch's and the next epoch's (the prefetch a node does when it reaches an
   AS): a separate figure, which splits a link's cost from a keyset's; the
   headline stays one keyset per link.
3. **Reconnect storm**: ``--storm`` meters power up at once through 8
   concentrator addresses; time until all are served, and the share of
   HELLOs answered with a cookie or a busy refusal.
4. Steps 2 and 3 again on **PostgreSQL** (unless ``--no-postgres``): a private
   server (``tests/authserver/pgserver.py``, Unix socket, fsync and
   synchronous commit *on*) holding the same desk, imported right after
   enrolment (``as import-desk``, timed), served by ``as serve --postgres``;
   the CPU its server processes spend per keyset is reported too.

The simulated meters run in ``--client-procs`` processes of their own (so one
client process's event loop does not cap the figure), but client and server
share this machine's cores: the figures are the server's rate *while* the
fleet also burns CPU, which the output states. So that the server's own cost
is visible apart from the fleet's, the run also reports the CPU time the
server processes (all workers) and the meter processes spent per keyset
(``/proc``), and what the server's CPU per keyset alone would allow on these
cores -- a derived ceiling, labelled as such, not a measured rate.

    python bench/auth_server.py                                   # the full run
    python bench/auth_server.py --meters 20000 --seconds 5 --storm 2000 --json   # smoke run
"""

# ruff: noqa: E402 - the path fix below must precede the imports
from __future__ import annotations

import sys

# bench/ also holds token.py, which would shadow the standard library's ``token``
# (asyncio -> traceback -> tokenize): import from the repository root instead
sys.path[0] = __file__.rsplit("/", 2)[0] or "."

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.link_floors import handshake_floor, io_floor, store_floor
from mesh.crypto import random_bytes
from mesh.errors import MeshError
from provisioning.authserver import eventloop
from provisioning.authserver.client import Backoff, request_keysets
from provisioning.authserver.desk_import import import_desk
from provisioning.authserver.messages import KeysetRequest
from provisioning.authserver.meters import (
    import_meters,
    meter_identity,
    meter_token,
    simulate_fleet,
)
from provisioning.desk import Desk
from provisioning.store import Store
from tests.authserver.pgserver import PostgresServer, unavailable_reason

PASSPHRASE = "bench passphrase"
HEAD_END = "head-end"
GOAL = 1200  # keysets/s sustained, issue 7
MAX_LINK_RATE = 4000  # links/s the prebuilt meters of the sustained run are enough for


def enrol(directory: Path, meters: int, seed: bytes) -> dict[str, float]:
    now = int(time.time())
    desk = Desk.init(
        directory,
        passphrase=PASSPHRASE,
        name="grid",
        start=now - 60,
        end=now + 365 * 86400,
        epoch_seconds=86400,
        now=now,
    )
    with desk:
        desk.enrol(
            HEAD_END,
            "authority",
            token_path=directory.parent / "head-end.token",
            pin="2468",
            now=now,
        )
        started = time.perf_counter()
        import_meters(desk.store, seed=seed, count=meters, now=now, head_end=HEAD_END)
        elapsed = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = (directory / "desk.sqlite").stat().st_size / 2**20
    return {
        "meters": meters,
        "seconds": round(elapsed, 1),
        "meters_per_s": round(meters / elapsed),
        "peak_rss_MiB": round(rss, 1),
        "store_MiB": round(size, 1),
    }


def link_floors(floors: dict[str, float], sustained: dict[str, Any]) -> dict[str, Any]:
    """The floors (``bench/link_floors.py``) against the goal and the sustained SQLite run.

    All on these cores, fully busy: the goal's budget is cores / GOAL of CPU per
    link, of which the floors leave what the protocol's own code may spend.
    """
    cores = os.cpu_count() or 1
    floor = sum(floors.values())
    budget = cores * 1000 / GOAL
    spent = sustained["server_cpu_ms_per_keyset"] + sustained["meter_cpu_ms_per_keyset"]
    return {
        **{f"{name}_ms": round(ms, 3) for name, ms in floors.items()},
        "floor_ms": round(floor, 3),
        "floor_ceiling_per_s": round(cores * 1000 / floor),
        "goal_budget_ms": round(budget, 3),
        "goal_left_ms": round(budget - floor, 3),
        "sustained_ms": round(spent, 3),
        "sustained_above_floor_ms": round(spent - floor, 3),
    }


def start_server(
    store: list[str], workers: int, key_lifetime: float, loop: str = "uvloop"
) -> tuple[subprocess.Popen[str], str, int]:
    env = {**os.environ, "SNRMESH_DESK_PASSPHRASE": PASSPHRASE, eventloop.ENV_VARIABLE: loop}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "as",
            "serve",
            *store,
            "--listen",
            "127.0.0.1:0",
            "--workers",
            str(workers),
            "--key-lifetime",
            str(key_lifetime),
            "--identity-rate",
            "100",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(f"server did not start: {line!r}")
    host, port = line.split()[4].rsplit(":", 1)
    return server, host, int(port)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one live process (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds so far of a process and its children: the AS and its forked workers,
    or PostgreSQL's postmaster and its backends."""
    total = _cpu_seconds(pid)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    total += _cpu_seconds(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # a process that ended meanwhile
    return total


def stop_server(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=60)


async def sustained_loops(
    host: str,
    port: int,
    seed: bytes,
    meters: int,
    clients: int,
    mine: list[int],
    seconds: float,
    first: int = 0,
    epochs: tuple[int | None, ...] = (None,),
) -> tuple[list[float], int, float, int]:
    """Client loops ``mine`` (of ``clients``) in this process; latencies, failures, CPU s, keysets.

    Each link asks for one keyset per entry of ``epochs`` (None: the current epoch).

    Each loop's meters are made before the clock starts (a meter's keys are
    written at the factory, not derived at each connection), enough for
    :data:`MAX_LINK_RATE` links/s; a loop that runs out starts over with meters
    it served already (whose CK for the epoch then exists). Meters are spread
    over the fleet from position ``first`` of one fixed sequence, so that two
    runs on one store can ask for different meters' first keysets.
    """
    per_loop = max(1, int(MAX_LINK_RATE * seconds / clients))
    tokens = {
        w: [
            meter_token(
                seed, meter_identity("meter", 1 + ((first + w + k * clients) * 7919) % meters)
            )
            for k in range(per_loop)
        ]
        for w in mine
    }
    cpu0 = time.process_time()
    latencies: list[float] = []
    failures = keysets = 0
    deadline = time.perf_counter() + seconds
    backoff = Backoff(attempts=3, base=0.05)

    async def loop(worker: int) -> None:
        nonlocal failures, keysets
        rng = random.Random(7 + worker)  # one per meter loop, as a meter has one
        fleet = tokens[worker]
        k = 0
        while time.perf_counter() < deadline:  # bounded by the deadline
            token = fleet[k % per_loop]
            k += 1
            t0 = time.perf_counter()
            try:
                outcome = await request_keysets(
                    host,
                    port,
                    token,
                    [KeysetRequest(random_bytes(16), HEAD_END, "bench", e) for e in epochs],
                    backoff=backoff,
                    rng=rng,
                )
            except MeshError:  # counted; the bench goes on
                failures += 1
                continue
            if len(outcome.grants) == len(epochs):
                latencies.append(time.perf_counter() - t0)
                keysets += len(epochs)
            else:
                failures += 1

    await asyncio.gather(*(loop(w) for w in mine))
    return latencies, failures, time.process_time() - cpu0, keysets


def _client_process(
    args: tuple[
        str, tuple[str, int, bytes, int, int, list[int], float, int, tuple[int | None, ...]]
    ],
) -> tuple[list[float], int, float, int]:
    loop, loop_args = args
    os.environ[eventloop.ENV_VARIABLE] = loop  # the meters run on the loop the AS does
    return eventloop.run(sustained_loops(*loop_args))


def sustained(
    server: subprocess.Popen[str],
    host: str,
    port: int,
    seed: bytes,
    meters: int,
    clients: int,
    seconds: float,
    procs: int,
    *,
    loop: str = "uvloop",
    database_pid: int | None = None,
    first: int = 0,
    epochs: tuple[int | None, ...] = (None,),
) -> dict[str, Any]:
    cpu0 = tree_cpu(server.pid)
    db0 = tree_cpu(database_pid) if database_pid else 0.0
    started = time.perf_counter()
    jobs = [
        (
            loop,
            (
                host,
                port,
                seed,
                meters,
                clients,
                list(range(p, clients, procs)),
                seconds,
                first,
                epochs,
            ),
        )
        for p in range(procs)
    ]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        results = pool.map(_client_process, jobs)
    elapsed = time.perf_counter() - started
    server_s = tree_cpu(server.pid) - cpu0
    database_s = tree_cpu(database_pid) - db0 if database_pid else 0.0
    meters_s = sum(r[2] for r in results)
    latencies = sorted(x for r in results for x in r[0])
    failures = sum(r[1] for r in results)
    n = sum(r[3] for r in results)  # keysets: len(epochs) per link
    links = len(latencies)
    cores = os.cpu_count() or 1
    return {
        "event_loop": loop,
        "keysets_per_link": len(epochs),
        "keysets": n,
        "seconds": round(elapsed, 2),
        "keysets_per_s": round(n / seconds),
        "links_per_s": round(links / seconds),
        "p50_ms": round(latencies[links // 2] * 1000, 1) if links else -1,
        "p99_ms": round(latencies[min(links - 1, int(links * 0.99))] * 1000, 1) if links else -1,
        "failures": failures,
        "server_cpu_ms_per_keyset": round(server_s * 1000 / max(1, n), 3),
        "meter_cpu_ms_per_keyset": round(meters_s * 1000 / max(1, n), 3),
        "database_cpu_ms_per_keyset": round(database_s * 1000 / max(1, n), 3),
        # over the measured window (the meters' set-up before it is excluded)
        "cpu_busy_share": round((server_s + meters_s + database_s) / (seconds * cores), 2),
        "server_only_ceiling_per_s": round(cores * n / server_s) if server_s else -1,
    }


def serve_and_measure(
    store: list[str], args: argparse.Namespace, seed: bytes, database_pid: int | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    server, host, port = start_server(store, args.workers, args.key_lifetime)
    try:
        steady = sustained(
            server,
            host,
            port,
            seed,
            args.meters,
            args.clients,
            args.seconds,
            args.client_procs,
            database_pid=database_pid,
        )
        storm = eventloop.run(
            simulate_fleet(
                host,
                port,
                seed=seed,
                count=args.storm,
                head_end=HEAD_END,
                first=args.meters - args.storm + 1,
                storm=True,
                sources=8,
            )
        )
        storm["cookie_share"] = round(storm["cookies"] / max(1, storm["attempts"]), 3)
    finally:
        stop_server(server)
    return steady, storm


def another_run(
    store: list[str],
    args: argparse.Namespace,
    seed: bytes,
    seconds: float,
    first: int,
    *,
    loop: str = "uvloop",
    epochs: tuple[int | None, ...] = (None,),
) -> dict[str, Any]:
    """The sustained SQLite run again, on a fresh server, varying one thing (``loop``, ``epochs``).

    ``first``: where in the fleet its meters start, past those earlier runs asked,
    so that it too mints each meter's first keysets.
    """
    server, host, port = start_server(store, args.workers, args.key_lifetime, loop=loop)
    try:
        return sustained(
            server,
            host,
            port,
            seed,
            args.meters,
            args.clients,
            seconds,
            args.client_procs,
            loop=loop,
            first=first,
            epochs=epochs,
        )
    finally:
        stop_server(server)


def print_run(name: str, args: argparse.Namespace, s: dict[str, Any], st: dict[str, float]) -> None:
    print(
        f"sustained ({name}, {args.workers} server workers, {args.clients} clients in "
        f"{args.client_procs} processes, all on the same {os.cpu_count()} cores): "
        f"{s['keysets_per_s']:,} keysets/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
        f"{s['failures']} failures"
    )
    database = (
        f", PostgreSQL {s['database_cpu_ms_per_keyset']} ms"
        if s["database_cpu_ms_per_keyset"]
        else ""
    )
    print(
        f"  CPU per keyset: server {s['server_cpu_ms_per_keyset']} ms (all workers), meters "
        f"{s['meter_cpu_ms_per_keyset']} ms{database}; cores busy {s['cpu_busy_share']:.0%} "
        f"(these processes); derived ceiling with the cores to the server alone: "
        f"{s['server_only_ceiling_per_s']:,}/s (not measured)"
    )
    print(
        f"storm ({name}): {st['served']:,}/{st['meters']:,} meters served in {st['seconds']} s "
        f"(p99 {st['p99_s']} s), {st['attempts']:,} attempts, cookie share "
        f"{st['cookie_share']:.1%}, busy {st['busy']}, rate-limited {st['rate_limited']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="A quick smoke run: --meters 20000 --seconds 6 --storm 100 --no-postgres "
        "--baseline-seconds 0 --prefetch-seconds 0",
    )
    parser.add_argument("--meters", type=int, default=1_000_000, help="meters enrolled")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each sustained run")
    parser.add_argument(
        "--clients",
        type=int,
        default=256,
        help="meter loops, each one link at a time (enough to keep the AS busy: with 64 the "
        "cores sat 15 %% idle and the figure was 64 / latency, not the AS's rate)",
    )
    parser.add_argument(
        "--client-procs", type=int, default=2, help="processes the simulated meters run in"
    )
    parser.add_argument("--workers", type=int, default=2, help="AS worker processes")
    parser.add_argument(
        "--storm", type=int, default=10_000, help="meters of the reconnect storm, all at once"
    )
    parser.add_argument(
        "--key-lifetime",
        type=float,
        default=30 * 86400.0,
        help="AS key-change policy during the sustained run (0: every link)",
    )
    parser.add_argument(
        "--no-postgres", action="store_true", help="SQLite only (no private PostgreSQL)"
    )
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=10.0,
        help="the sustained SQLite run again on asyncio's own loop (0: skip)",
    )
    parser.add_argument(
        "--prefetch-seconds",
        type=float,
        default=10.0,
        help="the sustained SQLite run again, each link fetching the epoch's keyset and the "
        "next epoch's (0: skip)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seed = random_bytes(32)
    figures: dict[str, object] = {
        "cores": os.cpu_count(),
        "workers": args.workers,
        "clients": args.clients,
        "client_procs": args.client_procs,
    }
    reason = None if not args.no_postgres else "--no-postgres"
    reason = reason or unavailable_reason()
    pg: PostgresServer | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="snrmesh-as-bench-") as tmp:
            desk_dir = Path(tmp) / "desk"
            figures["enrolment"] = enrol(desk_dir, args.meters, seed)
            floors = {
                "handshake": handshake_floor(),
                "io": io_floor(args.workers, args.client_procs, args.clients),
            }
            if reason is None:
                pg = PostgresServer(durable=True).start()
                dsn = pg.create_database("as_bench")
                # from a copy: the import marks its desk, which then refuses to be served, and
                # the SQLite runs below need the same fresh desk
                imported = Path(tmp) / "desk-imported"
                shutil.copytree(desk_dir, imported)
                started = time.perf_counter()
                store = Store.open(imported, PASSPHRASE)
                try:
                    import_desk(store, dsn, now=int(time.time()), source=str(desk_dir))
                finally:
                    store.close()
                figures["postgres_import_s"] = round(time.perf_counter() - started, 1)
                shutil.rmtree(imported)
            steady, storm = serve_and_measure(["--store", str(desk_dir)], args, seed)
            figures["sustained_sqlite"], figures["storm_sqlite"] = steady, storm
            sqlite_run = steady
            # later runs start past the meters earlier runs asked (MAX_LINK_RATE per second)
            first = MAX_LINK_RATE * int(args.seconds + 1)
            if args.baseline_seconds > 0:
                figures["sustained_sqlite_asyncio_loop"] = another_run(
                    ["--store", str(desk_dir)],
                    args,
                    seed,
                    args.baseline_seconds,
                    first,
                    loop="asyncio",
                )
                first += MAX_LINK_RATE * int(args.baseline_seconds + 1)
            if args.prefetch_seconds > 0:
                # the desk's epochs are days from 60 s before enrolment: the next one is 1
                figures["sustained_sqlite_prefetch"] = another_run(
                    ["--store", str(desk_dir)],
                    args,
                    seed,
                    args.prefetch_seconds,
                    first,
                    epochs=(None, 1),
                )
                first += MAX_LINK_RATE * int(args.prefetch_seconds + 1)
            floors["store"] = store_floor(desk_dir, PASSPHRASE, HEAD_END, args.meters, first)
            figures["floors"] = link_floors(floors, sqlite_run)
            if pg is not None:
                assert pg.process is not None
                steady, storm = serve_and_measure(
                    ["--postgres", dsn], args, seed, database_pid=pg.process.pid
                )
                figures["sustained_postgres"], figures["storm_postgres"] = steady, storm
            else:
                figures["postgres"] = f"skipped: {reason}"
    finally:
        if pg is not None:
            pg.stop()
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    e = figures["enrolment"]
    assert isinstance(e, dict)
    print(
        f"enrolment: {e['meters']:,} meters in {e['seconds']} s "
        f"({e['meters_per_s']:,}/s), peak RSS {e['peak_rss_MiB']} MiB, "
        f"store {e['store_MiB']} MiB"
    )
    for name in ("sqlite", "postgres"):
        s, st = figures.get(f"sustained_{name}"), figures.get(f"storm_{name}")
        if isinstance(s, dict) and isinstance(st, dict):
            print_run("SQLite" if name == "sqlite" else "PostgreSQL", args, s, st)
        base = figures.get("sustained_sqlite_asyncio_loop")
        if name == "sqlite" and isinstance(base, dict) and isinstance(s, dict):
            print(
                f"baseline (SQLite, AS and meters on asyncio's own loop, {args.baseline_seconds:g}"
                f" s): {base['keysets_per_s']:,} keysets/s, p99 {base['p99_ms']} ms; CPU per "
                f"keyset server {base['server_cpu_ms_per_keyset']} ms, meters "
                f"{base['meter_cpu_ms_per_keyset']} ms; uvloop / asyncio: "
                f"{s['keysets_per_s'] / max(1, base['keysets_per_s']):.2f}x"
            )
        pre = figures.get("sustained_sqlite_prefetch")
        if name == "sqlite" and isinstance(pre, dict) and isinstance(s, dict):
            print(
                f"prefetch (SQLite, each link fetching the epoch's and the next epoch's keyset, "
                f"{args.prefetch_seconds:g} s): {pre['keysets_per_s']:,} keysets/s on "
                f"{pre['links_per_s']:,} links/s, p99 {pre['p99_ms']} ms per link; CPU per keyset "
                f"server {pre['server_cpu_ms_per_keyset']} ms, meters "
                f"{pre['meter_cpu_ms_per_keyset']} ms; against one keyset per link: "
                f"{pre['keysets_per_s'] / max(1, s['keysets_per_s']):.2f}x keysets/s"
            )
    f = figures["floors"]
    assert isinstance(f, dict)
    print(
        f"floors (CPU per one-keyset link, every process): NNpsk0 handshake + 2 records "
        f"{f['handshake_ms']} ms, loopback TCP with the link's 6 flights {f['io_ms']} ms, "
        f"SQLite load + issue {f['store_ms']} ms: {f['floor_ms']} ms, at most "
        f"{f['floor_ceiling_per_s']:,} links/s on {os.cpu_count()} cores for a link running no "
        f"other code; {GOAL:,}/s allows {f['goal_budget_ms']} ms, leaving "
        f"{f['goal_left_ms']} ms for the protocol's own code (the SQLite run: "
        f"{f['sustained_ms']} ms, {f['sustained_above_floor_ms']} ms above the floors)"
    )
    if "postgres_import_s" in figures:
        print(f"PostgreSQL import of the desk: {figures['postgres_import_s']} s")
    else:
        print(f"PostgreSQL: {figures['postgres']}")


if __name__ == "__main__":
    main()
