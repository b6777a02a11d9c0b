#!/usr/bin/env python3
"""Authentication Server at smart-meter scale: enrolment, sustained issuance, reconnect storm.

1. **Enrolment**: ``import_meters`` of ``--meters`` meters (default 1 M) into a
   fresh desk: time, rows/s and peak RSS (streamed: memory must stay flat).
2. **Sustained issuance**: ``snrmesh as serve`` with ``--workers`` processes on
   that store; ``--clients`` concurrent meter loops, each authenticating and
   fetching one keyset per link (a durable store commit per keyset: the
   requestor's key-state row, the CK, the audit row) for ``--seconds``.
   Reports keysets/s and p50/p99 latency of one full link (TCP connect,
   HELLO, Noise handshake, challenge, keyset). The baseline, measured in the
   same run, is one core doing only the handshake's cryptography
   (X25519 keygen + DH, both sides), i.e. the floor of a link's cost.
3. **Reconnect storm**: ``--storm`` meters power up at once through 8
   concentrator addresses; time until all are served, and the share of
   HELLOs answered with a cookie or a busy refusal.

Client and server share this machine's cores, so the figures are the
server's rate *while* the simulated fleet also burns CPU.

    python bench/auth_server.py                                   # the full run
    python bench/auth_server.py --meters 20000 --seconds 5 --storm 2000 --json   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mesh.crypto import random_bytes
from mesh.errors import MeshError
from provisioning.authserver.client import Backoff, request_keysets
from provisioning.authserver.messages import KeysetRequest
from provisioning.authserver.meters import (
    import_meters,
    meter_identity,
    meter_token,
    simulate_fleet,
)
from provisioning.desk import Desk

PASSPHRASE = "bench passphrase"
HEAD_END = "head-end"


def enrol(directory: Path, meters: int, seed: bytes) -> dict[str, float]:
    now = int(time.time())
    desk = Desk.init(directory, passphrase=PASSPHRASE, name="grid", start=now - 60,
                     end=now + 365 * 86400, epoch_seconds=86400, now=now)
    with desk:
        desk.enrol(HEAD_END, "authority", token_path=directory.parent / "head-end.token",
                   pin="2468", now=now)
        started = time.perf_counter()
        import_meters(desk.store, seed=seed, count=meters, now=now, head_end=HEAD_END)
        elapsed = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = (directory / "desk.sqlite").stat().st_size / 2**20
    return {"meters": meters, "seconds": round(elapsed, 1),
            "meters_per_s": round(meters / elapsed), "peak_rss_MiB": round(rss, 1),
            "store_MiB": round(size, 1)}


def crypto_floor(seconds: float = 1.0) -> float:
    """Links/s one core manages doing nothing but the handshake's X25519 work."""
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        a.exchange(b.public_key())
        b.exchange(a.public_key())
        n += 1
    return n / (time.perf_counter() - started)


def start_server(store: Path, workers: int, key_lifetime: float) -> tuple[subprocess.Popen[str],
                                                                          str, int]:
    env = {**os.environ, "SNRMESH_DESK_PASSPHRASE": PASSPHRASE}
    server = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "as", "serve", "--store", str(store),
         "--listen", "127.0.0.1:0", "--workers", str(workers), "--key-lifetime",
         str(key_lifetime), "--identity-rate", "100", "--json"],
        env=env, stdout=subprocess.PIPE, text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(f"server did not start: {line!r}")
    host, port = line.split()[4].rsplit(":", 1)
    return server, host, int(port)


def stop_server(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=60)


async def sustained(host: str, port: int, seed: bytes, meters: int, clients: int,
                    seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    rng = random.Random(7)

    async def loop(worker: int) -> None:
        nonlocal failures
        i = worker
        while time.perf_counter() < deadline:  # bounded by the deadline
            token = meter_token(seed, meter_identity("meter", 1 + (i * 7919) % meters))
            i += clients
            t0 = time.perf_counter()
            try:
                outcome = await request_keysets(
                    host, port, token, [KeysetRequest(random_bytes(16), HEAD_END, "bench")],
                    backoff=Backoff(attempts=3, base=0.05), rng=random.Random(rng.random()),
                )
            except MeshError:  # counted; the bench goes on
                failures += 1
                continue
            if outcome.grants:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {"keysets": n, "seconds": round(elapsed, 2), "keysets_per_s": round(n / elapsed),
            "p50_ms": round(latencies[n // 2] * 1000, 1) if n else -1,
            "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 1) if n else -1,
            "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storm", type=int, default=10_000)
    parser.add_argument("--key-lifetime", type=float, default=30 * 86400.0,
                        help="AS key-change policy during the sustained run (0: every link)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seed = random_bytes(32)
    figures: dict[str, object] = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="snrmesh-as-bench-") as tmp:
        desk_dir = Path(tmp) / "desk"
        figures["enrolment"] = enrol(desk_dir, args.meters, seed)
        figures["crypto_floor_links_per_s_one_core"] = round(crypto_floor())
        server, host, port = start_server(desk_dir, args.workers, args.key_lifetime)
        try:
            figures["sustained_sqlite"] = asyncio.run(
                sustained(host, port, seed, args.meters, args.clients, args.seconds))
            storm = asyncio.run(simulate_fleet(
                host, port, seed=seed, count=args.storm, head_end=HEAD_END,
                first=args.meters - args.storm + 1, storm=True, sources=8))
            storm["cookie_share"] = round(storm["cookies"] / max(1, storm["attempts"]), 3)
            figures["storm_sqlite"] = storm
        finally:
            stop_server(server)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    e = figures["enrolment"]
    s = figures["sustained_sqlite"]
    st = figures["storm_sqlite"]
    assert isinstance(e, dict) and isinstance(s, dict) and isinstance(st, dict)
    print(f"enrolment: {e['meters']:,} meters in {e['seconds']} s "
          f"({e['meters_per_s']:,}/s), peak RSS {e['peak_rss_MiB']} MiB, "
          f"store {e['store_MiB']} MiB")
    print(f"crypto floor (X25519 only, one core): "
          f"{figures['crypto_floor_links_per_s_one_core']:,} links/s")
    print(f"sustained (SQLite, {args.workers} workers, {args.clients} clients): "
          f"{s['keysets_per_s']:,} keysets/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
          f"{s['failures']} failures")
    print(f"storm: {st['served']:,}/{st['meters']:,} meters served in {st['seconds']} s "
          f"(p99 {st['p99_s']} s), {st['attempts']:,} attempts, cookie share "
          f"{st['cookie_share']:.1%}, busy {st['busy']}, rate-limited {st['rate_limited']}")


if __name__ == "__main__":
    main()
