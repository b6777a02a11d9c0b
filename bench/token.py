#!/usr/bin/env python3
"""Secure-element benchmark (issue 6, section 5): the virtual card against the software token.

One run, one machine, ratios between figures measured side by side:

* **APDU round trip**: one command and its answer through pyscard, pcscd, the
  vpcd driver and the virtual card; with and without a PC/SC transaction
  around it, and with the applet in this process (no PC/SC at all);
* **UNWRAP/s**: opening a CK copy in the software token, in the applet in
  this process, and in the virtual card over PC/SC; and MAC of a 1 MiB
  bundle (extended-length commands, chained);
* **the agent's handshakes** with its token on the card: an agent unwraps
  every CK of its bundle when it starts (:class:`mesh.agent.keyring.KeyRing`:
  the warm-up), after which a handshake never touches the token, so its rate
  must not depend on the token. A handshake with a *ticket* (a CK the bundle
  lacks) unwraps once, then the CK is cached; its first-time rate is bounded
  by UNWRAP/s.

It needs what the card tests need: pcscd and vsmartcard-vpcd (Debian), pyscard
(``snrmesh[card]``), and root or user namespaces for a private pcscd. The
system's pcscd, if any, is not touched.

    python3 bench/token.py          # a table, about 30 s
    python3 bench/token.py --json   # the same figures as JSON
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where this file would shadow
# the standard library's ``token`` module (imported by ``inspect``): swap it for the repository.
sys.path.remove(sys.path[0])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.agent.keyring import KeyRing
from mesh.agent.store import AgentStore
from mesh.keyset import decrypt_copy, open_copy, read_copy_header
from mesh.keyset.bundle import Bundle, open_bundle
from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol import Connection, MemoryKeyStore, Role, SessionConfig
from mesh.sim.pcscd import PcscdUnavailable, PrivatePcscd
from mesh.token import SecureElement, Slot, TokenAbsent
from mesh.token.apdu import Command, Ins
from mesh.token.applet import Applet
from mesh.token.card import CardToken, LocalChannel
from mesh.token.cardstate import CardState
from mesh.token.emulator import Emulator, VirtualCard
from mesh.token.software import SoftwareToken
from provisioning.desk import Desk
from provisioning.plan import MissionPlan, PlannedNode

PIN = "2468"
MATES = 100
EPOCH_HOURS = 6
SLICE = 0.25
ROUNDS = 4
GET_STATUS = Command(0x80, Ins.GET_STATUS, le=256).encode()


def best_rate(
    contenders: dict[str, Callable[[], object]], rounds: int = ROUNDS
) -> dict[str, float]:
    """Operations per second of each contender: interleaved slices, best slice kept."""
    best = dict.fromkeys(contenders, 0.0)
    for _ in range(rounds):
        for name, operation in contenders.items():
            count, start = 0, time.perf_counter()
            while True:
                operation()
                count += 1
                if count % 8 == 0 and time.perf_counter() - start >= SLICE:
                    break
            best[name] = max(best[name], count / (time.perf_counter() - start))
    return best


def provision(folder: Path, reader: str, now: int) -> Desk:
    """alpha-c on the card and alpha-s on a token file, each paired with the same 100 mates."""
    mates = [f"m-{i:03d}" for i in range(MATES)]
    plan = MissionPlan(
        nodes=tuple(PlannedNode(n, "soldier") for n in ("alpha-c", "alpha-s", *mates)),
        groups=(),
        pairs=tuple((a, m) for a in ("alpha-c", "alpha-s") for m in mates),
    )
    desk = Desk.init(
        folder / "desk",
        passphrase="bench desk",
        name="bench",
        start=now - 60,
        end=now + 4 * EPOCH_HOURS * 3600,
        epoch_seconds=EPOCH_HOURS * 3600,
        now=now,
    )
    desk.apply(plan, now=now)
    desk.personalise("alpha-c", token_path=f"pcsc:{reader}", pin=PIN, now=now)
    desk.personalise("alpha-s", token_path=folder / "alpha-s.token", pin=PIN, now=now)
    desk.issue(now=now)
    for node in ("alpha-c", "alpha-s"):
        desk.export(node, folder / f"{node}.bundle", now=now)
    return desk


class Handshakes:
    """Mates dial one node whose keys come from a KeyRing (or a ticket-only store)."""

    def __init__(self, bundle: Bundle, desk: Desk, now: float) -> None:
        self.mission = bundle.mission.mission_id
        self.me = bundle.identity
        self.now = now
        self.entries = [k for k in bundle.keysets if k.not_before <= now < k.not_after]
        self.cks: dict[bytes, CommunicationKeyset] = {}
        for entry in self.entries:  # the mates' side: their CK, from the desk's copy for them
            keys = desk._keys(entry.peer)  # the bench plays every mate
            header = read_copy_header(entry.ticket)
            pair_key = decrypt_copy(
                entry.ticket, jwk.JWK(kty="oct", k=base64url_encode(keys[Slot.WRAP]))
            )
            self.cks[entry.ck_id] = CommunicationKeyset(
                header.ck_id,
                pair_key,
                header.mission_id,
                header.party_a,
                header.party_b,
                header.not_before,
                header.not_after,
            )
        self.configs = {
            e.peer: SessionConfig(identity=e.peer, mission_id=self.mission) for e in self.entries
        }
        self.my_config = SessionConfig(identity=self.me, mission_id=self.mission)
        self.index = 0

    def one(self, responder_keys: Any, *, ticket: bool = False) -> None:
        entry = self.entries[self.index % len(self.entries)]
        self.index += 1
        self.now += 1e-3
        ck = self.cks[entry.ck_id]
        initiator = Connection(
            config=self.configs[entry.peer], keys=MemoryKeyStore([ck]), role=Role.INITIATOR
        )
        responder = Connection(config=self.my_config, keys=responder_keys, role=Role.RESPONDER)
        initiator.connect(ck.ck_id, self.now, ticket=entry.own if ticket else None)
        responder.receive_data(initiator.data_to_send(), self.now)
        initiator.receive_data(responder.data_to_send(), self.now)
        responder.receive_data(initiator.data_to_send(), self.now)
        assert responder.peer == entry.peer


def run() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="snrmesh-bench-token-"))
    daemon = PrivatePcscd(work / "pcscd").start()
    os.environ.update(daemon.env())
    reader = daemon.readers[0]
    card_file = work / "alpha-c.card"
    emulator = Emulator(VirtualCard(card_file), port=reader.port)
    thread = threading.Thread(target=emulator.run, daemon=True)
    thread.start()
    try:
        from mesh.token.pcsc import PcscToken

        deadline = time.monotonic() + 10
        while True:
            try:
                PcscToken(reader.name).close()
                break
            except TokenAbsent:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        now = int(time.time())
        desk = provision(work, reader.name, now)
        card = PcscToken(reader.name)
        card.verify_pin(PIN)
        soft = SoftwareToken(work / "alpha-s.token")
        soft.verify_pin(PIN)
        local = CardToken(
            LocalChannel(
                Applet(CardState.decode(card_file.read_bytes()), persist=lambda data: None)
            )
        )
        local.verify_pin(PIN)
        card_bundle = open_bundle((work / "alpha-c.bundle").read_bytes(), card)
        soft_bundle = open_bundle((work / "alpha-s.bundle").read_bytes(), soft)
        return measure(work, desk, now, card, soft, local, card_bundle, soft_bundle)
    finally:
        emulator.stop()
        thread.join(5)
        daemon.stop()


def measure(
    work: Path,
    desk: Desk,
    now: int,
    card: SecureElement,
    soft: SoftwareToken,
    local: CardToken,
    card_bundle: Bundle,
    soft_bundle: Bundle,
) -> dict[str, Any]:
    from mesh.token.pcsc import PcscToken

    assert isinstance(card, PcscToken)
    channel = card._channel  # the raw round trip, inside one held transaction

    def raw_round_trip() -> None:
        channel.transmit(GET_STATUS)

    with channel.transaction():
        raw = best_rate({"raw": raw_round_trip})["raw"]
    round_trip = best_rate({"pcsc": card.check_present, "local": local.check_present})
    card_copy, soft_copy = card_bundle.keysets[0].own, soft_bundle.keysets[0].own
    unwraps = best_rate(
        {
            "software": lambda: soft.unwrap(soft_copy),
            "local": lambda: local.unwrap(card_copy),
            "pcsc": lambda: card.unwrap(card_copy),
        }
    )
    bundle = os.urandom(1 << 20)
    macs = best_rate(
        {
            "software": lambda: soft.mac(Slot.MAC, bundle),
            "pcsc": lambda: card.mac(Slot.MAC, bundle),
        },
        rounds=2,
    )

    warmups: dict[str, float] = {}
    rings: dict[str, KeyRing] = {}
    for name, token, bundle_ in (("software", soft, soft_bundle), ("pcsc", card, card_bundle)):
        store = AgentStore(work / f"agent-{name}")
        start = time.perf_counter()
        rings[name] = KeyRing(bundle_, token, store, now=now)
        warmups[name] = time.perf_counter() - start
    shakes = {
        "software": Handshakes(soft_bundle, desk, now),
        "pcsc": Handshakes(card_bundle, desk, now),
    }
    warm = best_rate({name: (lambda name=name: shakes[name].one(rings[name])) for name in shakes})

    def cold(name: str, token: SecureElement) -> Callable[[], None]:
        def handshake() -> None:
            store = MemoryKeyStore(ticket_opener=lambda ticket: open_copy(token, ticket))
            shakes[name].one(store, ticket=True)

        return handshake

    tickets = best_rate({"software": cold("software", soft), "pcsc": cold("pcsc", card)})
    return {
        "keysets_in_bundle": len(card_bundle.keysets),
        "discovery_keys": len(card_bundle.discovery),
        "apdu_round_trip_us": {
            "pcsc_raw": round(1e6 / raw, 1),
            "pcsc_with_transaction": round(1e6 / round_trip["pcsc"], 1),
            "applet_in_process": round(1e6 / round_trip["local"], 1),
        },
        "unwrap_per_s": {k: round(v) for k, v in unwraps.items()},
        "mac_1mib_per_s": {k: round(v, 1) for k, v in macs.items()},
        "keyring_warmup_s": {k: round(v, 3) for k, v in warmups.items()},
        "handshakes_per_s_warm": {k: round(v) for k, v in warm.items()},
        "handshakes_per_s_first_ticket": {k: round(v) for k, v in tickets.items()},
    }


def report(f: dict[str, Any]) -> str:
    rt, un, mac = f["apdu_round_trip_us"], f["unwrap_per_s"], f["mac_1mib_per_s"]
    warmup, warm, ticket = (
        f["keyring_warmup_s"],
        f["handshakes_per_s_warm"],
        f["handshakes_per_s_first_ticket"],
    )
    return "\n".join(
        [
            "APDU round trip (GET STATUS):",
            f"  virtual card over PC/SC, raw transmit      {rt['pcsc_raw']:>9.1f} us",
            f"  ... with a PC/SC transaction around it     {rt['pcsc_with_transaction']:>9.1f} us",
            f"  applet in this process (no PC/SC)          {rt['applet_in_process']:>9.1f} us",
            "UNWRAP of a CK copy:",
            f"  software token                             {un['software']:>9,} /s",
            f"  applet in this process                     {un['local']:>9,} /s",
            f"  virtual card over PC/SC                    {un['pcsc']:>9,} /s"
            f"   ({un['pcsc'] / un['software']:.2f} x software)",
            "MAC of a 1 MiB bundle (chained extended-length commands on the card):",
            f"  software token {mac['software']:>7.1f} /s, virtual card {mac['pcsc']:>6.1f} /s"
            f" ({mac['pcsc']:.0f} MiB/s)",
            f"Agent key ring warm-up ({f['keysets_in_bundle']} CKs + {f['discovery_keys']} "
            "discovery keys unwrapped at start):",
            f"  software token {warmup['software']:.3f} s, virtual card {warmup['pcsc']:.3f} s",
            "Agent handshakes (responder's keys from its KeyRing; a card is not on this path):",
            f"  after warm-up: software {warm['software']:,} /s, card {warm['pcsc']:,} /s"
            f"   (card/software {warm['pcsc'] / warm['software']:.2f})",
            f"  first handshake of a CK by ticket: software {ticket['software']:,} /s, "
            f"card {ticket['pcsc']:,} /s (one UNWRAP each, then cached)",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        figures = run()
    except PcscdUnavailable as exc:
        print(f"bench/token.py: cannot run a private pcscd here: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
