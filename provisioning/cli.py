"""``snrmesh desk ...``: the provisioning desk's command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from mesh.cli.progress import progress
from mesh.cli.secrets import DESK_PASSPHRASE_ENV, PIN_ENV, read_secret
from mesh.files import FileTooLarge, check_replaceable, read_bounded
from mesh.keyset.bundle import BUNDLE_MAGIC
from mesh.keyset.mission import MIN_EPOCH_SECONDS
from mesh.token.open import open_token
from provisioning.authserver.cli import (
    MAX_AUDIT_LIMIT,
    add_import_meters_arguments,
    audit_text,
    cmd_import_meters,
    desk_passphrase,
)
from provisioning.desk import MAX_SEED_SIZE, Desk
from provisioning.errors import DeskError, MissionError
from provisioning.plan import ROLES, load_plan

__all__ = ["register"]

Handler = Callable[[argparse.Namespace], int]

DESK_HELP = """\
The provisioning desk prepares a mission before it starts: it enrols nodes and
personalises their tokens, records who may talk to whom (groups and pairs),
issues a Communication Keyset (CK) for every such pair and epoch, and exports
one bundle per node. Its state is one SQLite file in DIR, its secrets sealed
under the desk passphrase (SNRMESH_DESK_PASSPHRASE or a prompt).

A 3-node mission, end to end:
  export SNRMESH_DESK_PASSPHRASE=... SNRMESH_PIN=...
  snrmesh desk init desk --mission op-dawn --hours 24 --epoch-hours 6
  snrmesh desk enrol desk gs-1 --role ground-station --token gs-1.token
  snrmesh desk enrol desk alpha-1 --role soldier --token alpha-1.token
  snrmesh desk enrol desk uav-1 --role uav --token uav-1.token
  snrmesh desk group desk squad gs-1 alpha-1 uav-1
  snrmesh desk issue desk
  snrmesh desk export desk alpha-1 --out alpha-1.bundle
  snrmesh bundle inspect alpha-1.bundle --token alpha-1.token

Once 'snrmesh as import-desk' has copied the desk into PostgreSQL, the mission's
keys and policy live there: the desk refuses every change (revoke with 'snrmesh
as revoke NODE --postgres DSN'; nodes fetch bundles with 'snrmesh as bundle';
more meters with 'snrmesh as import-meters --postgres DSN').
"""


_NEW_TOKEN_HELP = (
    "token file to create, or 'pcsc:READER': personalise the blank card in that reader "
    "and close it (see 'snrmesh card --help')"
)


MAX_MISSION_HOURS = 10 * 366 * 24  # ten years: far past any epoch budget
DEFAULT_EPOCH_HOURS = 6.0


def _now() -> int:
    return int(time.time())


def _pin(node: str, *, confirm: bool = False) -> str:
    return read_secret(PIN_ENV, f"PIN for {node}'s token: ", confirm=confirm)


def _seed(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return read_bounded(path, MAX_SEED_SIZE, what="external seed file")
    except (OSError, FileTooLarge) as exc:
        raise DeskError(f"cannot read external seed {path}: {exc}") from None


@contextlib.contextmanager
def _desk(args: argparse.Namespace) -> Iterator[Desk]:
    desk = Desk.open(args.dir, passphrase=desk_passphrase(args.dir))
    try:
        yield desk
    finally:
        desk.close()


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def _parse_time(value: str) -> int:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise MissionError(
            f"--start {value!r} is not an ISO 8601 date-time (e.g. 2026-12-01T06:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


# -- handlers ---------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    epoch_hours = DEFAULT_EPOCH_HOURS if args.epoch_hours is None else args.epoch_hours
    if args.epoch_hours is None and math.isfinite(args.hours) and args.hours > 0:
        epoch_hours = min(epoch_hours, args.hours)  # a short mission is one epoch
    if math.isfinite(args.hours) and 0 < args.hours * 3600 < MIN_EPOCH_SECONDS:
        raise MissionError(f"--hours: a mission lasts at least {MIN_EPOCH_SECONDS} s (one epoch)")
    for option, value in (("--hours", args.hours), ("--epoch-hours", epoch_hours)):
        if not (math.isfinite(value) and 0 < value <= MAX_MISSION_HOURS):
            raise MissionError(
                f"{option} is a number of hours, more than 0 and at most {MAX_MISSION_HOURS:,}"
            )
    if epoch_hours > args.hours:
        raise MissionError(
            f"--epoch-hours {epoch_hours:g} is longer than the mission ({args.hours:g} h): "
            "its one epoch would end with the mission; give at most --hours"
        )
    now = _now()
    start = now if args.start is None else _parse_time(args.start)
    passphrase = read_secret(DESK_PASSPHRASE_ENV, "Desk passphrase: ", confirm=True)
    desk = Desk.init(
        args.dir,
        passphrase=passphrase,
        name=args.mission,
        start=start,
        end=start + round(args.hours * 3600),
        epoch_seconds=round(epoch_hours * 3600),
        now=now,
    )
    with contextlib.closing(desk):
        summary = desk.summary(now=now)["mission"]
    return _emit(
        args,
        summary,
        f"desk ready in {args.dir}: mission {summary['name']} "
        f"({summary['start']} to {summary['end']}, {summary['epochs']} epochs of "
        f"{summary['epoch_hours']:g} h)",
    )


def cmd_enrol(args: argparse.Namespace) -> int:
    seed = _seed(args.seed_file)
    with _desk(args) as desk:
        pin = _pin(args.node, confirm=True)
        node = desk.enrol(
            args.node, args.role, token_path=args.token, pin=pin, now=_now(), seed=seed
        )
    return _emit(
        args,
        {
            "id": node.identity,
            "role": node.role,
            "token": node.token_id.hex(),
            "token_file": args.token,
        },
        f"enrolled {node.identity} ({node.role}); token written to {args.token}",
    )


def cmd_personalise(args: argparse.Namespace) -> int:
    with _desk(args) as desk:
        node = desk.personalise(
            args.node, token_path=args.token, pin=_pin(args.node, confirm=True), now=_now()
        )
    return _emit(
        args,
        {"id": node.identity, "token_file": args.token},
        f"token of {node.identity} written to {args.token}",
    )


def cmd_group(args: argparse.Namespace) -> int:
    with _desk(args) as desk:
        desk.group(args.group, args.nodes, now=_now())
        members = desk.summary(now=_now())["groups"].get(args.group, [])
    return _emit(
        args, {"group": args.group, "members": members}, f"group {args.group}: {', '.join(members)}"
    )


def cmd_pair(args: argparse.Namespace) -> int:
    with _desk(args) as desk:
        desk.pair(args.node_a, args.node_b, now=_now())
    return _emit(
        args,
        {"pair": sorted([args.node_a, args.node_b])},
        f"{args.node_a} and {args.node_b} are dialogue mates",
    )


def cmd_apply(args: argparse.Namespace) -> int:
    plan = load_plan(args.mission_file)
    seed = _seed(args.seed_file)
    with _desk(args) as desk:
        pin = _pin("every new node", confirm=True) if args.tokens else None
        created = desk.apply(plan, now=_now(), tokens_dir=args.tokens, pin=pin, seed=seed)
    text = (
        f"applied {args.mission_file}: {len(created)} new node(s), {len(plan.groups)} "
        f"group(s), {len(plan.pairs)} pair(s)"
    )
    if args.tokens:
        text += f"; tokens in {args.tokens}"
    return _emit(
        args, {"enrolled": created, "groups": len(plan.groups), "pairs": len(plan.pairs)}, text
    )


MAX_ISSUE_WORKERS = 64  # as 'as serve --workers': a typo must not fork thousands of processes


def cmd_issue(args: argparse.Namespace) -> int:
    if args.workers is not None and not 1 <= args.workers <= MAX_ISSUE_WORKERS:
        raise DeskError(f"--workers must be 1..{MAX_ISSUE_WORKERS}")
    started = time.perf_counter()
    with _desk(args) as desk, progress(not args.json, "issuing keysets") as tick:
        report = desk.issue(now=_now(), workers=args.workers, on_progress=tick)
    seconds = time.perf_counter() - started
    data = {
        "pairs": report.pairs,
        "epochs": report.epochs,
        "issued": report.issued,
        "already_issued": report.skipped_existing,
        "seconds": round(seconds, 3),
    }
    return _emit(
        args,
        data,
        f"issued {report.issued} keysets ({2 * report.issued} wrapped "
        f"copies) for {report.pairs} pairs x {report.epochs} epochs in {seconds:.1f} s; "
        f"{report.skipped_existing} already issued",
    )


def cmd_export(args: argparse.Namespace) -> int:
    # a typo must not replace the node's token or the desk's own database with a bundle
    check_replaceable(args.out, option="--out", looks_like=(BUNDLE_MAGIC, "a bundle"))
    with _desk(args) as desk:
        bundle = desk.export(args.node, args.out, now=_now())
    data = {
        "node": bundle.identity,
        "out": args.out,
        "mates": [m.identity for m in bundle.mates],
        "keysets": len(bundle.keysets),
    }
    text = (
        f"bundle for {bundle.identity} written to {args.out}: {len(bundle.mates)} mate(s), "
        f"{len(bundle.keysets)} keyset(s)"
    )
    if not bundle.mates:
        text += " -- no dialogue mates: none declared, or all revoked"
    elif not bundle.keysets:
        text += " -- no keysets yet: run 'snrmesh desk issue' first"
    return _emit(args, data, text)


def cmd_show(args: argparse.Namespace) -> int:
    with _desk(args) as desk:
        s = desk.summary(now=_now())
    m = s["mission"]
    lines = [
        f"mission {m['name']} ({m['id']}): {m['start']} to {m['end']}, "
        f"{m['epochs']} epochs of {m['epoch_hours']:g} h, current epoch: "
        f"{'none' if m['current_epoch'] is None else m['current_epoch']}",
        f"nodes ({len(s['nodes'])}):",
    ]
    for n in s["nodes"]:
        flags = [] if n["token_written"] else ["no token yet"]
        if n["revoked"]:
            flags.append("REVOKED")
        if n["suspended"]:
            flags.append(
                "SUSPENDED by the AS (clone alert)"
                + (": 'as reinstate' it" if s["imported"] else ": 'desk rekey' its token")
            )
        lines.append(
            f"  {n['id']:<20} {n['role']:<15} gen {n['generation']:<3} "
            f"{n['keysets']:>6} keysets  {' '.join(flags)}"
        )
    lines.append(f"groups ({len(s['groups'])}):")
    lines += [f"  {g}: {', '.join(members)}" for g, members in s["groups"].items()]
    # "a + b": "a-b" was ambiguous, names have hyphens ("gs-1-uav-1")
    lines.append(f"pairs ({len(s['pairs'])}): " + ", ".join(f"{a} + {b}" for a, b in s["pairs"]))
    lines.append(f"permitted pairs: {s['permitted_pairs']}, keysets issued: {s['keysets']}")
    lines.append("recent audit entries:")
    lines += [f"  #{e['seq']} {e['at']} {e['op']}" for e in s["audit"]]
    return _emit(args, s, "\n".join(lines))


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit is not None and not 1 <= args.limit <= MAX_AUDIT_LIMIT:
        raise DeskError(f"--limit must be 1..{MAX_AUDIT_LIMIT:,}")
    with _desk(args) as desk:
        entries = desk.audit_log(limit=args.limit)
    return _emit(args, {"audit": entries}, audit_text(entries))


def cmd_rekey(args: argparse.Namespace) -> int:
    with _desk(args) as desk:
        token = open_token(args.token)
        with token.exclusive():  # an AS link of another process must not change it meanwhile
            token.verify_pin(_pin(args.node))
            try:
                node = desk.rekey(args.node, token, now=_now(), seed=_seed(args.seed_file))
            except KeyboardInterrupt:  # the desk or the token may hold the change half way
                print(
                    f"snrmesh: the rekey of {args.node} may be half done: run the same "
                    "'snrmesh desk rekey' again to finish it (desk export refuses until then)",
                    file=sys.stderr,
                )
                raise
    return _emit(
        args,
        {"id": node.identity, "generation": node.generation},
        f"rekeyed {node.identity}: token keys now at generation {node.generation}; "
        f"export new bundles for {node.identity} and its mates",
    )


def cmd_revoke(args: argparse.Namespace) -> int:
    """Idempotent, as 'as revoke' is: a script that revokes twice has what it asked for."""
    with _desk(args) as desk:
        already = desk.node(args.node).revoked
        node = desk.node(args.node) if already else desk.revoke(args.node, now=_now())
    return _emit(
        args,
        {"id": node.identity, "revoked": True, "already": already},
        f"{node.identity} was already revoked: nothing changed"
        if already
        else f"revoked {node.identity}: no further keysets; re-export its mates' bundles",
    )


# -- parser -----------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    desk = commands.add_parser(
        "desk",
        help="provisioning desk: missions, nodes, keysets, bundles",
        description=DESK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = desk.add_subparsers(title="desk commands", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dir", metavar="DIR", help="desk directory (holds desk.sqlite)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument(
        "--seed-file",
        metavar="FILE",
        help="external seed mixed (HKDF) into new token keys; can only add entropy",
    )

    def add(
        name: str,
        handler: Handler,
        help_text: str,
        *parents: argparse.ArgumentParser,
        description: str | None = None,
        example: str | None = None,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[common, *parents],
            help=help_text,
            description=description or help_text,
            epilog=example and f"example: snrmesh desk {name} desk {example}",
        )
        p.set_defaults(func=handler)
        return p

    p = add(
        "init",
        cmd_init,
        "create a desk and its mission",
        description="Create a desk in DIR for one mission: a validity window split into "
        "epochs. Every CK is valid for exactly one epoch, so keys change routinely.",
        example="--mission op-dawn --hours 24 --epoch-hours 6",
    )
    p.add_argument("--mission", required=True, metavar="NAME", help="mission name")
    p.add_argument(
        "--start",
        metavar="ISO8601",
        help="mission start, e.g. 2026-12-01T06:00:00Z (default: now; no zone = UTC)",
    )
    p.add_argument(
        "--hours", type=float, required=True, metavar="H", help="mission length in hours"
    )
    p.add_argument(
        "--epoch-hours",
        type=float,
        metavar="E",
        help="epoch length in hours, at most --hours; one CK per pair per epoch "
        "(default: 6, or the mission's length if shorter)",
    )

    p = add(
        "enrol",
        cmd_enrol,
        "enrol a node and personalise its software token",
        seed,
        description="Enrol NODE with a role, generate its token keys and write its "
        "software token (sealed under a PIN from SNRMESH_PIN or a prompt) to --token, or "
        "personalise the blank card in --token pcsc:READER with them.",
        example="alpha-1 --role soldier --token alpha-1.token",
    )
    p.add_argument("node", metavar="NODE", help="node identity, e.g. alpha-1")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--token", required=True, metavar="FILE|pcsc:READER", help=_NEW_TOKEN_HELP)

    p = add(
        "personalise",
        cmd_personalise,
        "write the token of a node enrolled by 'apply'",
        example="uav-2 --token uav-2.token",
    )
    p.add_argument("node", metavar="NODE", help="a node enrolled by 'apply', without a token")
    p.add_argument("--token", required=True, metavar="FILE|pcsc:READER", help=_NEW_TOKEN_HELP)

    p = add(
        "group",
        cmd_group,
        "add nodes to a group (every member pairs with every other)",
        example="squad gs-1 alpha-1",
    )
    p.add_argument("group", metavar="GROUP", help="group name, e.g. squad (created if new)")
    p.add_argument("nodes", metavar="NODE", nargs="*", help="enrolled nodes to add to it")

    p = add("pair", cmd_pair, "make two nodes dialogue mates", example="gs-1 uav-1")
    p.add_argument("node_a", metavar="NODE_A", help="an enrolled node")
    p.add_argument("node_b", metavar="NODE_B", help="another enrolled node")

    p = add(
        "apply",
        cmd_apply,
        "enrol nodes and add groups and pairs from a mission file",
        seed,
        description="Apply a TOML mission file ([[node]] id/role, [groups], pairs) in one "
        "transaction. Nodes already enrolled with the same role are kept. See docs/keysets.md.",
        example="mission.toml --tokens tokens/",
    )
    p.add_argument("mission_file", metavar="MISSION.toml")
    p.add_argument(
        "--tokens",
        metavar="TOKEN_DIR",
        help="also write a token per new node as TOKEN_DIR/NODE.token "
        "(one PIN for all, from SNRMESH_PIN or a prompt)",
    )

    p = add(
        "issue",
        cmd_issue,
        "issue CKs for every permitted pair and remaining epoch",
        description="Issue a Communication Keyset for every permitted pair and every epoch "
        "not yet over. Idempotent: existing CKs are kept.",
        example="--workers 4",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="worker processes, 1..64 (default: cores)"
    )

    p = add("export", cmd_export, "write a node's bundle", example="alpha-1 --out alpha-1.bundle")
    p.add_argument("node", metavar="NODE", help="an enrolled node")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="bundle file to write (replaced atomically if it is a bundle; anything else, "
        "such as the token or the desk's database, is refused)",
    )

    add("show", cmd_show, "show the mission, nodes, groups, pairs and keyset counts")
    p = add("audit", cmd_audit, "print the append-only audit log", example="--limit 20")
    p.add_argument("--limit", type=int, metavar="N", help="only the last N entries (default: all)")

    p = add(
        "rekey",
        cmd_rekey,
        "refresh every key of a node's token (key change)",
        seed,
        description="Replace every key of NODE's token through a key change wrapped under "
        "its current key, and re-wrap its CKs. Its old bundle stops working.",
        example="alpha-1 --token alpha-1.token",
    )
    p.add_argument("node", metavar="NODE", help="the node whose token it is")
    p.add_argument(
        "--token",
        required=True,
        metavar="FILE|pcsc:READER",
        help="the node's token file, or its card in a PC/SC reader",
    )

    p = add(
        "import-meters",
        cmd_import_meters,
        "enrol a fleet of smart meters in bulk (factory keys, no token files)",
        description="Enrol --count meters whose keys are diversified from --factory-seed "
        "(created if missing), streamed in chunks. See docs/authentication-server.md.",
        example="--count 10000 --factory-seed fleet.seed --head-end head-end",
    )
    add_import_meters_arguments(p)

    p = add(
        "revoke",
        cmd_revoke,
        "revoke a node: no further CKs; later exports exclude it (again: nothing changes, exit 0)",
        example="uav-1",
    )
    p.add_argument("node", metavar="NODE", help="an enrolled node")
