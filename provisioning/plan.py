"""Mission files: nodes, groups and pairs declared in one TOML document.

Example (``docs/keysets.md`` has the full reference)::

    [[node]]
    id = "alpha-1"
    role = "soldier"

    [groups]
    alpha = ["alpha-1", "alpha-2", "alpha-3"]

    pairs = [["gs-1", "uav-1"]]      # top-level key, before any table

The file is untrusted input: size-bounded, every field typed and checked, and
the whole plan is validated before the desk changes anything.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.files import FileTooLarge, read_bounded
from mesh.keyset import KeysetError, check_identity
from provisioning.errors import MissionError

__all__ = [
    "MAX_PLAN_SIZE",
    "ROLES",
    "MissionPlan",
    "PlannedNode",
    "check_role",
    "load_plan",
    "parse_plan",
]

MAX_PLAN_SIZE = 4 * 1024 * 1024
ROLES = ("soldier", "uav", "ground-station", "authority")


def check_role(role: str) -> str:
    if role not in ROLES:
        raise MissionError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    return role


@dataclass(frozen=True, slots=True)
class PlannedNode:
    identity: str
    role: str


@dataclass(frozen=True, slots=True)
class MissionPlan:
    nodes: tuple[PlannedNode, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    pairs: tuple[tuple[str, str], ...]


def _identity(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MissionError(f"{where}: node identity must be a string")
    try:
        return check_identity(value)
    except KeysetError as exc:
        raise MissionError(f"{where}: {exc}") from None


def parse_plan(doc: dict[str, Any]) -> MissionPlan:
    unknown = set(doc) - {"node", "groups", "pairs"}
    if unknown:
        raise MissionError(f"mission file: unknown key(s) {', '.join(sorted(unknown))}")
    nodes_doc = doc.get("node", [])
    if not isinstance(nodes_doc, list):
        raise MissionError("mission file: [[node]] must be an array of tables")
    nodes: list[PlannedNode] = []
    for i, entry in enumerate(nodes_doc, 1):
        if not isinstance(entry, dict) or set(entry) - {"id", "role"}:
            raise MissionError(f"mission file: node #{i} must have only 'id' and 'role'")
        nodes.append(
            PlannedNode(
                _identity(entry.get("id"), f"node #{i}"), check_role(str(entry.get("role", "")))
            )
        )
    seen: set[str] = set()
    for node in nodes:
        if node.identity in seen:
            raise MissionError(f"mission file: node {node.identity} is declared twice")
        seen.add(node.identity)
    groups_doc = doc.get("groups", {})
    if not isinstance(groups_doc, dict):
        raise MissionError("mission file: [groups] must be a table of name = [members]")
    groups = []
    for name, members in groups_doc.items():
        group = _identity(name, "group name")
        if not isinstance(members, list) or len(members) < 2:
            raise MissionError(f"mission file: group {group} needs at least two members")
        groups.append((group, tuple(_identity(m, f"group {group}") for m in members)))
    pairs_doc = doc.get("pairs", [])
    if not isinstance(pairs_doc, list):
        raise MissionError("mission file: pairs must be a list of [a, b]")
    pairs = []
    for pair in pairs_doc:
        if not isinstance(pair, list) or len(pair) != 2:
            raise MissionError("mission file: each pair must be [a, b]")
        pairs.append((_identity(pair[0], "pair"), _identity(pair[1], "pair")))
    return MissionPlan(tuple(nodes), tuple(groups), tuple(pairs))


def load_plan(path: str | Path) -> MissionPlan:
    try:
        raw = read_bounded(path, MAX_PLAN_SIZE, what="mission file")
    except FileNotFoundError:
        raise MissionError(f"mission file {path} does not exist") from None
    except (OSError, FileTooLarge) as exc:
        raise MissionError(f"cannot read mission file {path}: {exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MissionError(f"mission file {path} is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays or tables
        raise MissionError(f"mission file {path} is nested too deeply") from None
    return parse_plan(doc)
