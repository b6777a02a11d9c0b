#!/usr/bin/env python3
"""Provision a 1,000-node mission and report how fast the desk issues and exports keysets.

Mission shape (issue 2): 20 squads of 50 (every pair within a squad), the 20
squad leaders paired with each other and with one ``authority``, 12 epochs:
about 300 k CKs, 600 k wrapped JWE copies. The baseline, measured in the same
run on one core, is the raw cost of the same AES-KW + AES-GCM operations with no
JOSE or storage around them, and jwcrypto alone (the desk's copies are made by
``mesh.crypto.jose``; ``wrap_copy`` alone is reported too); the desk's rate is
reported as a ratio of those. Peak memory (RSS) shows that issuance streams.

    python bench/provisioning.py            # the full mission (about a minute)
    python bench/provisioning.py --squads 2 --squad-size 5 --epochs 2 --json   # smoke run
"""

# ruff: noqa: E402 - the path fix below must precede the imports
from __future__ import annotations

import sys

# bench/ also holds token.py, which would shadow the standard library's ``token``
# (inspect -> tokenize): import from the repository root instead
sys.path[0] = __file__.rsplit("/", 2)[0] or "."

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jwcrypto import jwe, jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import aes_key_wrap, aesgcm_encrypt, random_bytes
from mesh.keyset import CommunicationKeyset, read_copy_header, wrap_copy
from provisioning.desk import Desk
from provisioning.plan import MissionPlan, PlannedNode

EPOCH_SECONDS = 6 * 3600


def plan(squads: int, size: int) -> MissionPlan:
    nodes = [PlannedNode("authority", "authority")]
    groups = []
    for s in range(squads):
        members = [f"sq{s:02d}-{m:03d}" for m in range(size)]
        nodes += [PlannedNode(m, "soldier") for m in members]
        groups.append((f"squad-{s:02d}", tuple(members)))
    leaders = tuple(f"sq{s:02d}-000" for s in range(squads))
    if len(leaders) >= 2:
        groups.append(("leaders", leaders))
    pairs = tuple(("authority", leader) for leader in leaders)
    return MissionPlan(tuple(nodes), tuple(groups), pairs)


def raw_copies_per_second(n: int) -> float:
    """One copy = AES-KW of a fresh CEK + AES-GCM of the 32-byte pair key with a ~300 B header."""
    kek, aad = random_bytes(32), b"x" * 300
    start = time.perf_counter()
    for _ in range(n):
        cek = random_bytes(32)
        aes_key_wrap(kek, cek)
        aesgcm_encrypt(cek, random_bytes(12), random_bytes(32), aad)
    return n / (time.perf_counter() - start)


def jwcrypto_copies_per_second(n: int) -> float:
    """The same copy made by jwcrypto itself (what ``wrap_copy`` used before mesh.crypto.jose)."""
    key = jwk.JWK(kty="oct", k=base64url_encode(random_bytes(32)))
    ck = CommunicationKeyset(
        random_bytes(16), random_bytes(32), random_bytes(16), "a-1", "b-1", 0, EPOCH_SECONDS
    )
    header = json.dumps(
        read_copy_header(
            wrap_copy(ck, holder="a-1", kid="00" * 16 + ".0.1", wrap_key=key)
        ).to_json(),
        separators=(",", ":"),
    )
    start = time.perf_counter()
    for _ in range(n):
        token = jwe.JWE(ck.pair_key, protected=header)
        token.add_recipient(key)
        token.serialize(compact=True)
    return n / (time.perf_counter() - start)


def encoder_copies_per_second(n: int) -> float:
    """``wrap_copy`` as the desk calls it (mesh.crypto.jose under the hood)."""
    key = jwk.JWK(kty="oct", k=base64url_encode(random_bytes(32)))
    ck = CommunicationKeyset(
        random_bytes(16), random_bytes(32), random_bytes(16), "a-1", "b-1", 0, EPOCH_SECONDS
    )
    start = time.perf_counter()
    for _ in range(n):
        wrap_copy(ck, holder="a-1", kid="00" * 16 + ".0.1", wrap_key=key)
    return n / (time.perf_counter() - start)


def peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--squads", type=int, default=20)
    parser.add_argument("--squad-size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--exports", type=int, default=5, help="nodes of each kind to export")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    figures: dict[str, object] = {"cores": os.cpu_count()}
    sample = 20_000 if args.squads * args.squad_size >= 100 else 2_000
    log("baseline: raw AES-KW + AES-GCM and jwcrypto, one core ...")
    figures["raw_copies_per_s_1core"] = round(raw_copies_per_second(sample))
    figures["jwcrypto_copies_per_s_1core"] = round(jwcrypto_copies_per_second(sample // 4))
    figures["wrap_copy_per_s_1core"] = round(encoder_copies_per_second(sample // 4))

    the_plan = plan(args.squads, args.squad_size)
    with tempfile.TemporaryDirectory(prefix="snrmesh-bench-") as tmp:
        now = int(time.time())
        t0 = time.perf_counter()
        desk = Desk.init(
            Path(tmp) / "desk",
            passphrase="bench passphrase",
            name="bench",
            start=now,
            end=now + args.epochs * EPOCH_SECONDS,
            epoch_seconds=EPOCH_SECONDS,
            now=now,
        )
        t1 = time.perf_counter()
        desk.apply(the_plan, now=now)
        t2 = time.perf_counter()
        log(f"enrolled {len(the_plan.nodes)} nodes in {t2 - t1:.1f} s; issuing ...")
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 5:
                last[0] = time.perf_counter()
                log(f"  {done}/{total} keysets")

        report = desk.issue(now=now, workers=args.workers, on_progress=progress)
        t3 = time.perf_counter()
        issue_s = t3 - t2
        copies = 2 * report.issued
        log(f"issued {report.issued} keysets in {issue_s:.1f} s; exporting ...")
        exports = []
        kinds = [
            ("authority", ["authority"]),
            ("leader", [f"sq{s:02d}-000" for s in range(min(args.exports, args.squads))]),
            ("member", [f"sq{s:02d}-001" for s in range(min(args.exports, args.squads))]),
        ]
        for kind, names in kinds:
            for name in names:
                out = Path(tmp) / f"{name}.bundle"
                e0 = time.perf_counter()
                bundle = desk.export(name, out, now=now)
                seconds = time.perf_counter() - e0
                exports.append(
                    {
                        "kind": kind,
                        "node": name,
                        "mates": len(bundle.mates),
                        "keysets": len(bundle.keysets),
                        "seconds": round(seconds, 4),
                        "us_per_keyset": round(seconds / max(1, len(bundle.keysets)) * 1e6, 1),
                        "bytes": out.stat().st_size,
                    }
                )
        desk.close()
        store_bytes = (Path(tmp) / "desk" / "desk.sqlite").stat().st_size

    figures.update(
        {
            "nodes": len(the_plan.nodes),
            "pairs": report.pairs,
            "epochs": report.epochs,
            "keysets": report.issued,
            "wrapped_copies": copies,
            "init_s": round(t1 - t0, 2),
            "enrol_s": round(t2 - t1, 2),
            "issue_s": round(issue_s, 2),
            "total_s": round(t3 - t0, 2),
            "copies_per_s": round(copies / issue_s) if issue_s else None,
            "store_mib": round(store_bytes / 2**20, 1),
            "peak_rss_mib_desk": round(peak_rss_mib(resource.RUSAGE_SELF), 1),
            "peak_rss_mib_workers": round(peak_rss_mib(resource.RUSAGE_CHILDREN), 1),
            "exports": exports,
        }
    )
    raw = figures["raw_copies_per_s_1core"]
    jose = figures["jwcrypto_copies_per_s_1core"]
    rate = figures["copies_per_s"]
    assert isinstance(raw, int) and isinstance(jose, int)
    if isinstance(rate, int):
        figures["ratio_vs_raw_1core"] = round(rate / raw, 3)
        figures["ratio_vs_jwcrypto_1core"] = round(rate / jose, 3)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"mission: {figures['nodes']} nodes, {report.pairs} pairs x {report.epochs} epochs = "
        f"{report.issued} keysets ({copies} wrapped copies)"
    )
    print(
        f"time: init {figures['init_s']} s, enrol {figures['enrol_s']} s, "
        f"issue {figures['issue_s']} s, total {figures['total_s']} s  (goal: < 60 s)"
    )
    print(
        f"issue rate: {rate} copies/s on {figures['cores']} cores; baseline one core: raw "
        f"AES-KW+AES-GCM {raw}/s, jwcrypto {jose}/s, wrap_copy "
        f"{figures['wrap_copy_per_s_1core']}/s -> ratio {figures.get('ratio_vs_raw_1core')} "
        f"of raw, {figures.get('ratio_vs_jwcrypto_1core')} of jwcrypto"
    )
    print(
        f"memory: desk peak RSS {figures['peak_rss_mib_desk']} MiB, largest worker "
        f"{figures['peak_rss_mib_workers']} MiB; store {figures['store_mib']} MiB on disk"
    )
    for e in exports:
        print(
            f"export {e['kind']:<9} {e['node']:<10} {e['mates']:>3} mates {e['keysets']:>5} "
            f"keysets  {e['seconds'] * 1000:7.1f} ms  {e['us_per_keyset']:6.1f} us/keyset  "
            f"{e['bytes'] / 1024:7.0f} KiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
