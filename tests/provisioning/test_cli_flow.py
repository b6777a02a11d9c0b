"""The command line end to end: --help everywhere, --json that parses, no key ever printed."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mesh.cli.main import build_parser, main
from mesh.token.software import SoftwareToken
from provisioning.desk import Desk
from tests.provisioning.conftest import (
    EPOCHS,
    PASSPHRASE,
    Site,
    assert_no_key_in,
    assert_refused,
    desk_secrets,
    snrmesh,
)


def _desk_commands() -> list[str]:
    def sub(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action

    return sorted(sub(sub(build_parser()).choices["desk"]).choices)


DESK_COMMANDS = _desk_commands()


def test_the_desk_commands_are_the_documented_ones() -> None:
    assert sorted(
        ["init", "enrol", "personalise", "group", "pair", "apply", "issue", "export", "show",
         "audit", "rekey", "revoke", "import-meters"]
    ) == DESK_COMMANDS  # fmt: skip


def test_the_console_script_prints_help(tmp_path: Path) -> None:
    script = shutil.which("snrmesh")
    if script is None:
        pytest.skip("snrmesh is not installed on PATH")
    result = subprocess.run(
        [script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: snrmesh")
    assert "desk" in result.stdout and "bundle" in result.stdout


@pytest.mark.parametrize(
    "command",
    [("--help",), ("desk", "--help"), ("bundle", "inspect", "--help")]
    + [("desk", name, "--help") for name in DESK_COMMANDS],
    ids=lambda c: " ".join(c[:-1]) or "snrmesh",
)
def test_help_exits_0(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(list(command))
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: snrmesh") and err == ""
    if len(command) == 3 and command[0] == "desk":
        assert f"snrmesh desk {command[1]} [-h] [--json]" in out.replace("\n", " ")


class Operator:
    """Runs commands in one folder and keeps everything they printed."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.printed: list[str] = []

    def run(self, *args: object, **secrets: str | None) -> subprocess.CompletedProcess[str]:
        result = snrmesh(*args, cwd=self.cwd, **secrets)
        self.printed += [result.stdout, result.stderr]
        assert "Traceback" not in result.stderr
        return result

    def ok(self, *args: object) -> str:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def json(self, *args: object) -> Any:
        return json.loads(self.ok(*args, "--json"))


MISSION = """\
pairs = [["drone-7", "bravo-1"]]

[[node]]
id = "bravo-1"
role = "soldier"

[[node]]
id = "bravo-2"
role = "soldier"

[[node]]
id = "drone-7"
role = "uav"

[groups]
bravo = ["bravo-1", "bravo-2", "gs-1"]
"""

PLAN = """\
pairs = [["gs-1", "uav-1"]]

[[node]]
id = "uav-1"
role = "uav"

[groups]
squad = ["gs-1", "alpha-1"]
"""


def test_a_mission_through_the_command_line(tmp_path: Path) -> None:
    op = Operator(tmp_path)
    (tmp_path / "plan.toml").write_text(PLAN)

    mission = op.json("desk", "init", "desk", "--mission", "op-dawn", "--hours", "12",
                      "--epoch-hours", "3")  # fmt: skip
    assert (mission["name"], mission["epochs"], mission["epoch_hours"]) == ("op-dawn", 4, 3.0)
    enrolled = op.json("desk", "enrol", "desk", "gs-1", "--role", "ground-station",
                       "--token", "gs-1.token")  # fmt: skip
    assert enrolled["id"] == "gs-1" and len(bytes.fromhex(enrolled["token"])) == 16
    op.json("desk", "enrol", "desk", "alpha-1", "--role", "soldier", "--token", "alpha-1.token")
    assert op.json("desk", "apply", "desk", "plan.toml") == {
        "enrolled": ["uav-1"],
        "groups": 1,
        "pairs": 1,
    }
    assert not (tmp_path / "uav-1.token").exists()
    op.json("desk", "personalise", "desk", "uav-1", "--token", "uav-1.token")
    assert op.json("desk", "group", "desk", "squad", "gs-1", "alpha-1") == {
        "group": "squad",
        "members": ["alpha-1", "gs-1"],
    }
    assert op.json("desk", "pair", "desk", "uav-1", "alpha-1") == {"pair": ["alpha-1", "uav-1"]}

    issued = op.json("desk", "issue", "desk")
    assert (issued["pairs"], issued["epochs"], issued["issued"]) == (3, 4, 12)
    again = op.json("desk", "issue", "desk")
    assert (again["issued"], again["already_issued"]) == (0, 12)

    exported = op.json("desk", "export", "desk", "alpha-1", "--out", "alpha-1.bundle")
    assert (exported["mates"], exported["keysets"]) == (["gs-1", "uav-1"], 8)
    inspected = op.json("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token")
    assert inspected["integrity"] == "ok" and inspected["node"] == "alpha-1"
    assert [(m["id"], m["keysets"]) for m in inspected["mates"]] == [("gs-1", 4), ("uav-1", 4)]
    assert inspected["groups"] == {"squad": ["alpha-1", "gs-1"]}

    shown = op.json("desk", "show", "desk")
    assert [(n["id"], n["keysets"], n["token_written"]) for n in shown["nodes"]] == [
        ("alpha-1", 8, True),
        ("gs-1", 8, True),
        ("uav-1", 8, True),
    ]
    assert shown["permitted_pairs"] == 3 and shown["keysets"] == 12
    shown_text = op.ok("desk", "show", "desk")
    assert "permitted pairs: 3, keysets issued: 12" in shown_text
    assert "pairs (2): alpha-1 + uav-1, gs-1 + uav-1\n" in shown_text  # was "gs-1-uav-1"

    with Desk.open(tmp_path / "desk", passphrase=PASSPHRASE) as desk:
        old_secrets = desk_secrets(desk)  # before the rekey replaces alpha-1's slot keys

    assert op.json("desk", "rekey", "desk", "alpha-1", "--token", "alpha-1.token") == {
        "id": "alpha-1",
        "generation": 2,
    }
    stale = op.run("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token")
    assert_refused(stale, "older key generation", "rekeyed")
    op.ok("desk", "export", "desk", "alpha-1", "--out", "alpha-1.bundle")
    assert (
        op.json("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token")["integrity"]
        == "ok"
    )

    assert op.json("desk", "revoke", "desk", "uav-1") == {
        "id": "uav-1",
        "revoked": True,
        "already": False,
    }
    assert op.json("desk", "export", "desk", "alpha-1", "--out", "alpha-1.bundle")["mates"] == [
        "gs-1"
    ]
    inspected = op.json("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token")
    assert inspected["revoked"] == ["uav-1"]
    text = op.ok("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token")
    assert "integrity OK" in text and "revoked: uav-1" in text

    audit = op.json("desk", "audit", "desk")["audit"]
    ops = [entry["op"] for entry in audit]
    assert ops[0] == "init" and ops[-1] == "export"
    assert {"enrol", "personalise", "group", "pair", "issue", "rekey-prepare", "rekey",
            "revoke"} <= set(ops)  # fmt: skip
    assert [e["seq"] for e in audit] == sorted(e["seq"] for e in audit)
    assert len(op.json("desk", "audit", "desk", "--limit", "3")["audit"]) == 3
    op.ok("desk", "audit", "desk")

    with Desk.open(tmp_path / "desk", passphrase=PASSPHRASE) as desk:
        secrets = old_secrets + desk_secrets(desk)
    with contextlib.closing(sqlite3.connect(tmp_path / "desk" / "desk.sqlite")) as db:
        audit_rows = [repr(row).encode() for row in db.execute("SELECT * FROM audit")]
    assert len(audit_rows) == len(audit)
    assert_no_key_in([p.encode() for p in op.printed] + audit_rows, secrets)


def test_apply_with_tokens_enrols_the_whole_mission_file(site: Site) -> None:
    (site.root / "mission.toml").write_text(MISSION)
    op = Operator(site.root)
    result = op.json("desk", "apply", "desk", "mission.toml", "--tokens", "toks")
    assert result == {"enrolled": ["bravo-1", "bravo-2", "drone-7"], "groups": 1, "pairs": 1}
    for node in result["enrolled"]:
        assert SoftwareToken(site.root / "toks" / f"{node}.token").info().identity == node
    shown = op.json("desk", "show", "desk")
    assert {n["id"]: n["token_written"] for n in shown["nodes"]}["drone-7"] is True
    assert shown["groups"]["bravo"] == ["bravo-1", "bravo-2", "gs-1"]
    assert ["bravo-1", "drone-7"] in shown["pairs"]
    again = op.json("desk", "apply", "desk", "mission.toml", "--tokens", "toks")
    assert again["enrolled"] == []  # applying the same file again is harmless
    issued = op.json("desk", "issue", "desk")
    assert issued["pairs"] == 4 + 3 + 1 and issued["already_issued"] == 4 * EPOCHS
