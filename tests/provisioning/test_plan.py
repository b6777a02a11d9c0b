"""Mission files: untrusted TOML, every field checked before the desk changes anything."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning.errors import MissionError
from provisioning.plan import MAX_PLAN_SIZE, MissionPlan, PlannedNode, load_plan, parse_plan

GOOD = """\
pairs = [["gs-1", "uav-1"]]

[[node]]
id = "gs-1"
role = "ground-station"

[[node]]
id = "uav-1"
role = "uav"

[groups]
alpha = ["alpha-1", "alpha-2", "gs-1"]
"""


def test_a_mission_file_parses_to_its_plan(tmp_path: Path) -> None:
    path = tmp_path / "mission.toml"
    path.write_text(GOOD)
    assert load_plan(path) == MissionPlan(
        nodes=(PlannedNode("gs-1", "ground-station"), PlannedNode("uav-1", "uav")),
        groups=(("alpha", ("alpha-1", "alpha-2", "gs-1")),),
        pairs=(("gs-1", "uav-1"),),
    )


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"nodes": []}, "unknown key(s) nodes"),
        ({"node": {"id": "a"}}, "array of tables"),
        ({"node": [{"id": "a", "role": "uav", "pin": "1234"}]}, "only 'id' and 'role'"),
        ({"node": [{"id": "a", "role": "general"}]}, "unknown role 'general'"),
        ({"node": [{"id": "A 1", "role": "uav"}]}, "invalid identity"),
        ({"node": [{"id": 7, "role": "uav"}]}, "must be a string"),
        ({"node": [{"id": "a", "role": "uav"}, {"id": "a", "role": "uav"}]}, "declared twice"),
        ({"groups": ["a", "b"]}, "table of name"),
        ({"groups": {"g": ["a"]}}, "at least two members"),
        ({"groups": {"g": "a,b"}}, "at least two members"),
        ({"groups": {"Bad Name": ["a", "b"]}}, "group name"),
        ({"pairs": [["a", "b", "c"]]}, "each pair must be"),
        ({"pairs": {"a": "b"}}, "list of [a, b]"),
        ({"pairs": [["a", ""]]}, "identity must be"),
    ],
)
def test_bad_mission_documents_are_refused_by_name(doc: dict[str, Any], reason: str) -> None:
    with pytest.raises(MissionError, match=re.escape(reason)):
        parse_plan(doc)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[[node]\nid = 1", "not valid TOML"),
        (b"\xff\xfe not utf-8", "not valid TOML"),
        (b"x" * (MAX_PLAN_SIZE + 1), "too large"),
        # tomllib recurses once per level: a few thousand brackets, far below the size cap
        pytest.param(b"x = " + b"[" * 5000 + b"]" * 5000, "nested too deeply", id="arrays"),
        pytest.param(b"x = " + b"{a=" * 5000 + b"1" + b"}" * 5000, "too deeply", id="tables"),
    ],
)
def test_unreadable_mission_files_are_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "mission.toml"
    path.write_bytes(content)
    with pytest.raises(MissionError, match=reason):
        load_plan(path)
    with pytest.raises(MissionError, match="does not exist"):
        load_plan(tmp_path / "missing.toml")


toml_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=15,
)
documents = st.dictionaries(
    st.sampled_from(["node", "groups", "pairs", "other"]), toml_like, max_size=3
) | st.fixed_dictionaries(
    {},
    optional={
        "node": st.lists(st.dictionaries(st.sampled_from(["id", "role"]), toml_like), max_size=3),
        "groups": st.dictionaries(st.text(max_size=8), st.lists(toml_like, max_size=4)),
        "pairs": st.lists(st.lists(toml_like, max_size=3), max_size=3),
    },
)


@settings(max_examples=150, deadline=None)
@given(doc=documents)
def test_parse_plan_raises_only_mission_errors(doc: dict[str, Any]) -> None:
    try:
        plan = parse_plan(doc)
    except MissionError:
        return
    assert len({n.identity for n in plan.nodes}) == len(plan.nodes)
    assert all(len(members) >= 2 for _, members in plan.groups)
