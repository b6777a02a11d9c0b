"""``snrmesh bundle inspect``: check a bundle with its token and list what it holds."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mesh.cli.node import unlock_node
from mesh.timefmt import utc_iso as _ts

__all__ = ["register"]


def cmd_inspect(args: argparse.Namespace) -> int:
    _, bundle = unlock_node(args.token, args.bundle)
    mates: list[dict[str, Any]] = []
    for mate in bundle.mates:
        windows = sorted((k.not_before, k.not_after) for k in bundle.keysets_with(mate.identity))
        mates.append(
            {
                "id": mate.identity,
                "role": mate.role,
                "keysets": len(windows),
                "from": _ts(windows[0][0]) if windows else None,
                "until": _ts(windows[-1][1]) if windows else None,
            }
        )
    m = bundle.mission
    data: dict[str, Any] = {
        "integrity": "ok",
        "node": bundle.identity,
        "role": bundle.role,
        "token": bundle.token_id.hex(),
        "issued": _ts(bundle.issued_at),
        "mission": {
            "name": m.name,
            "id": m.mission_id.hex(),
            "start": _ts(m.start),
            "end": _ts(m.end),
            "epoch_hours": m.epoch_seconds / 3600,
        },
        "mates": mates,
        "groups": {g: list(ms) for g, ms in bundle.groups.items()},
        "revoked": sorted(bundle.revoked),
    }
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"bundle {args.bundle}: integrity OK (checked with {bundle.identity}'s token)")
    print(
        f"node {bundle.identity} ({bundle.role}), mission {m.name}: {_ts(m.start)} to "
        f"{_ts(m.end)}, issued {_ts(bundle.issued_at)}"
    )
    print(f"dialogue mates ({len(mates)}):")
    for entry in mates:
        window = f"{entry['from']} to {entry['until']}" if entry["keysets"] else "no keysets"
        print(f"  {entry['id']:<20} {entry['role']:<15} {entry['keysets']:>4} keysets  {window}")
    for group, members in bundle.groups.items():
        print(f"group {group}: {', '.join(members)}")
    if bundle.revoked:
        print(f"revoked: {', '.join(sorted(bundle.revoked))}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = commands.add_parser(
        "bundle",
        help="inspect a node bundle",
        description="Node bundles, as exported by 'snrmesh desk export'.",
    )
    sub = bundle.add_subparsers(title="bundle commands", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "inspect",
        help="verify a bundle's integrity with its token and list mates and CK windows",
        description="Verify the bundle FILE with the node's token (PIN from SNRMESH_PIN or a "
        "prompt): a bundle for another token, made before a rekey, or with one flipped byte "
        "is refused.",
        epilog="example: snrmesh bundle inspect alpha-1.bundle --token alpha-1.token",
    )
    p.add_argument("bundle", metavar="FILE", help="the bundle file")
    p.add_argument(
        "--token",
        required=True,
        metavar="FILE|pcsc:READER",
        help="the node's token file, or its card in a PC/SC reader",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_inspect)
