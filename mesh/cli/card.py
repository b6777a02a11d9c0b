"""``snrmesh card ...``: a virtual card for machines without one, and what the readers hold."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

from mesh.files import check_replaceable
from mesh.token import Slot
from mesh.token.cardstate import LifeCycle
from mesh.token.emulator import VPCD_DEFAULT_PORT, Emulator, VirtualCard
from mesh.token.errors import TokenAbsent, TokenError

__all__ = ["register"]

log = logging.getLogger("snrmesh.card")

CARD_HELP = """\
Smartcards: a node's identity and static keys on a card that never lets a key
out (docs/secure-element.md). Any command taking --token accepts 'pcsc:READER'
(a reader whose name is or contains READER; 'pcsc:' alone: the only reader)
instead of a token file.
"""

EMULATE_HELP = f"""\
A virtual snrmesh card for machines without a card: the card applet runs in
this process and plugs into the real PC/SC daemon through vsmartcard's virtual
reader driver, so pcscd, pyscard and snrmesh run exactly as with a real card.
Its state (identity, PIN counter, keys sealed under the PIN) lives in FILE and
survives restarts; a new FILE is a blank card. Stop the emulator (Ctrl-C) to
pull the card out; start it again to put it back.

Run a node on a virtual card (Debian 12):
  sudo apt-get install pcscd vsmartcard-vpcd   # reader "Virtual PCD", port {VPCD_DEFAULT_PORT}
  pip install 'snrmesh[card]'                  # pyscard (needs libpcsclite-dev, swig)
  sudo pcscd                                   # unless it runs already ('pcscd -f': foreground)
  snrmesh card emulate --state alpha-1.card &  # insert the card
  snrmesh card readers                         # Virtual PCD 00 00: snrmesh card, blank
  snrmesh desk enrol desk alpha-1 --role soldier --token 'pcsc:Virtual PCD 00 00'
  snrmesh desk issue desk
  snrmesh desk export desk alpha-1 --out alpha-1.bundle
  snrmesh agent --bundle alpha-1.bundle --token 'pcsc:Virtual PCD 00 00' ...

The desk personalises the blank card and closes it (no second personalisation);
'desk rekey --token pcsc:...' changes its keys. A second card on the same
machine: --vpcd 127.0.0.1:{VPCD_DEFAULT_PORT + 1} is the reader "Virtual PCD 00 01".
"""


def cmd_emulate(args: argparse.Namespace) -> int:
    from mesh.transport.address import parse_address

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    host, port = parse_address(args.vpcd, VPCD_DEFAULT_PORT)
    card = VirtualCard(args.state)
    # every change to the card is written there: a missing folder was found only at the
    # card's first write, which then failed (the emulator had started and said nothing)
    check_replaceable(args.state, option="--state")
    state = card.applet.state
    who = "blank" if state.image is None else f"{state.image.identity}, {state.life.name.lower()}"

    def changed(inserted: bool) -> None:
        what = "inserted into" if inserted else "pulled out of"
        log.info("card %s (%s) %s the reader at %s:%d", args.state, who, what, host, port)

    emulator = Emulator(card, host, port, on_change=changed)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: emulator.stop())
    log.info("virtual card %s (%s): connecting to vpcd at %s:%d", args.state, who, host, port)
    emulator.run()
    return 0


def _describe(reader: str) -> dict[str, Any]:
    from mesh.token.pcsc import PcscToken

    entry: dict[str, Any] = {"reader": reader}
    try:
        token = PcscToken(reader)
    except TokenAbsent:
        return {**entry, "card": None}
    except TokenError as exc:
        return {**entry, "card": "other", "detail": str(exc)}
    try:
        entry["card"] = "snrmesh"
        entry["life_cycle"] = token.life_cycle.name.lower()
        if token.life_cycle is not LifeCycle.BLANK:
            info = token.info()
            entry.update(
                identity=info.identity,
                role=info.role,
                token=info.token_id.hex(),
                generation=info.generation(Slot.WRAP),
                pin_tries_left=info.pin_tries_left,
            )
    finally:
        token.close()
    return entry


def cmd_readers(args: argparse.Namespace) -> int:
    from mesh.token.pcsc import list_readers

    entries = [_describe(reader) for reader in list_readers()]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("no smartcard reader (is pcscd running with a reader driver?)")
    for e in entries:
        if e["card"] is None:
            what = "no card"
        elif e["card"] == "other":
            what = f"not a snrmesh card ({e['detail']})"
        elif e["life_cycle"] == "blank":
            what = "snrmesh card, blank"
        else:
            what = (
                f"snrmesh card of {e['identity']} ({e['role']}), {e['life_cycle']}, key generation "
                f"{e['generation']}, {e['pin_tries_left']} PIN tries left"
            )
        print(f"{e['reader']}: {what}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    card = commands.add_parser(
        "card",
        help="smartcards: a virtual card, and what the readers hold",
        description=CARD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = card.add_subparsers(title="card commands", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "emulate",
        help="run a virtual snrmesh card in a vpcd reader (no hardware needed)",
        description=EMULATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--state", required=True, metavar="FILE", help="the card's state file (new file: blank)"
    )
    p.add_argument(
        "--vpcd",
        default=f"127.0.0.1:{VPCD_DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"where the vpcd reader driver listens (default: 127.0.0.1:{VPCD_DEFAULT_PORT}, "
        "the reader 'Virtual PCD 00 00' of Debian's pcscd)",
    )
    p.set_defaults(func=cmd_emulate)
    p = sub.add_parser(
        "readers",
        help="list the PC/SC readers and the card in each",
        description="List the PC/SC readers pcscd knows and what each holds (no PIN needed).",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_readers)
