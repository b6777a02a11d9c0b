"""Every bad input through the real command line: one line, exit 1, no traceback, no file changed.

Each case runs ``python -m mesh.cli`` in a copy of the provisioned site, with
the secrets in the environment and stdin not a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh.token.software import SoftwareToken
from tests.provisioning.conftest import (
    PASSPHRASE,
    PIN,
    Site,
    assert_refused,
    refused_without_change,
    snapshot,
    snrmesh,
)

Prepare = Callable[[Site], object]


def _corrupt_audit_row(site: Site) -> None:
    with contextlib.closing(sqlite3.connect(site.desk_dir / "desk.sqlite")) as db:
        db.execute("INSERT INTO audit (at, op, detail) VALUES (1, 'x', 'not json')")
        db.commit()


def _factory_seed_file(site: Site) -> None:
    (site.root / "f.seed").write_bytes(bytes(32))


def _garble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap_b64_middle(path: Path) -> None:
    """Change the middle character of a JOSE file into another base64url character.

    The file still parses, so only the MAC (not the base64 decoder) can catch it.
    """
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle] = ord("B") if raw[middle] == ord("A") else ord("A")
    path.write_bytes(bytes(raw))


def _flip_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def _garble_table(site: Site, table: str) -> None:
    """Overwrite the root page of one table, leaving the file header and schema intact."""
    path = site.desk_dir / "desk.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
    raw = bytearray(path.read_bytes())
    raw[(root - 1) * page_size : root * page_size] = os.urandom(page_size)
    path.write_bytes(bytes(raw))


def _nothing(site: Site) -> None:
    pass


def _mission_file(text: str) -> Prepare:
    def prepare(site: Site) -> None:
        (site.root / "mission.toml").write_text(text)
        (site.root / "toks").mkdir()  # a failed apply must not leave token files in it

    return prepare


LATE_FAILING_PLAN = """\
[[node]]
id = "bravo-1"
role = "soldier"

[[node]]
id = "bravo-2"
role = "uav"

[groups]
bravo = ["bravo-1", "bravo-2", "ghost"]
"""


CASES: list[tuple[str, Prepare, tuple[object, ...], tuple[str, ...], dict[str, str | None]]] = [
    # the desk store and its passphrase
    ("wrong-passphrase-show", _nothing, ("desk", "show", "desk"), ("wrong desk passphrase",),
     {"passphrase": "not the passphrase"}),
    ("wrong-passphrase-export", _nothing,
     ("desk", "export", "desk", "alpha-1", "--out", "new.bundle"), ("wrong desk passphrase",),
     {"passphrase": "not the passphrase"}),
    ("garbage-store", lambda s: _garble(s.desk_dir / "desk.sqlite"), ("desk", "show", "desk"),
     ("corrupt",), {}),
    ("truncated-store", lambda s: _truncate(s.desk_dir / "desk.sqlite"), ("desk", "show", "desk"),
     ("corrupt",), {}),
    ("truncated-store-export", lambda s: _truncate(s.desk_dir / "desk.sqlite"),
     ("desk", "export", "desk", "alpha-1", "--out", "new.bundle"), ("corrupt",), {}),
    ("garbage-nodes-table-export", lambda s: _garble_table(s, "nodes"),
     ("desk", "export", "desk", "alpha-1", "--out", "new.bundle"), ("store is corrupt",), {}),
    ("no-desk", _nothing, ("desk", "show", "elsewhere"), ("no desk in elsewhere",), {}),
    # a mistyped folder is named before the passphrase is asked for (none given here)
    ("no-desk-before-passphrase", _nothing, ("desk", "show", "elsewhere"),
     ("no desk in elsewhere",), {"passphrase": None}),
    ("no-desk-before-passphrase-as", _nothing, ("as", "audit", "--store", "elsewhere"),
     ("no desk in elsewhere",), {"passphrase": None}),
    ("no-desk-before-passphrase-import", _nothing,
     ("as", "import-desk", "elsewhere", "--postgres", "host=/nonexistent"),
     ("no desk in elsewhere",), {"passphrase": None}),
    # tokens
    ("garbage-token", lambda s: _garble(s.token("alpha-1")),
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"),
     ("not a snrmesh token file",), {}),
    ("flipped-token", lambda s: _flip_middle(s.token("alpha-1")),
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"), ("corrupt",), {}),
    ("truncated-token", lambda s: _truncate(s.token("alpha-1")),
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"), ("token", "corrupt"),
     {}),
    ("flipped-token-rekey", lambda s: _flip_middle(s.token("alpha-1")),
     ("desk", "rekey", "desk", "alpha-1", "--token", "alpha-1.token"), ("corrupt",), {}),
    ("missing-token", _nothing,
     ("bundle", "inspect", "alpha-1.bundle", "--token", "nobody.token"), ("does not exist",), {}),
    ("another-nodes-token-rekey", _nothing,
     ("desk", "rekey", "desk", "alpha-1", "--token", "alpha-2.token"), ("belongs to alpha-2",),
     {}),
    # bundles
    ("flipped-bundle", lambda s: _swap_b64_middle(s.bundle("alpha-1")),
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"),
     ("bundle integrity check failed",), {}),
    ("truncated-bundle", lambda s: _truncate(s.bundle("alpha-1")),
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"),
     ("not a snrmesh bundle",), {}),
    ("truncated-bundle-signature", lambda s: s.bundle("alpha-1").write_bytes(
        s.bundle("alpha-1").read_bytes()[:-4]),
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"), ("bundle",), {}),
    ("garbage-bundle", lambda s: _garble(s.bundle("alpha-1")),
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"),
     ("not a snrmesh bundle",), {}),
    ("bundle-for-another-token", _nothing,
     ("bundle", "inspect", "alpha-1.bundle", "--token", "gs-1.token"),
     ("issued for another token", "gs-1"), {}),
    ("missing-bundle", _nothing,
     ("bundle", "inspect", "nothing.bundle", "--token", "alpha-1.token"), ("does not exist",),
     {}),
    # nodes, groups and pairs
    ("unknown-node-export", _nothing,
     ("desk", "export", "desk", "nobody", "--out", "nobody.bundle"), ("unknown node 'nobody'",),
     {}),
    ("unknown-node-pair", _nothing, ("desk", "pair", "desk", "gs-1", "nobody"),
     ("unknown node 'nobody'",), {}),
    ("unknown-node-group", _nothing, ("desk", "group", "desk", "squad", "gs-1", "nobody"),
     ("unknown node 'nobody'",), {}),
    ("unknown-node-revoke", _nothing, ("desk", "revoke", "desk", "nobody"),
     ("unknown node 'nobody'",), {}),
    ("unknown-node-personalise", _nothing,
     ("desk", "personalise", "desk", "nobody", "--token", "nobody.token"),
     ("unknown node 'nobody'",), {}),
    ("unknown-node-rekey", _nothing,
     ("desk", "rekey", "desk", "nobody", "--token", "alpha-1.token"), ("unknown node 'nobody'",),
     {}),
    ("duplicate-identity", _nothing,
     ("desk", "enrol", "desk", "alpha-1", "--role", "soldier", "--token", "again.token"),
     ("alpha-1 is already enrolled",), {}),
    ("token-file-exists", _nothing,
     ("desk", "enrol", "desk", "bravo-1", "--role", "soldier", "--token", "alpha-1.token"),
     ("already exists",), {}),
    ("token-file-a-folder", _nothing,
     ("desk", "enrol", "desk", "bravo-1", "--role", "soldier", "--token", "desk"),
     ("is a folder", "names the file to create"), {}),
    ("bad-identity", _nothing,
     ("desk", "enrol", "desk", "Bravo 1", "--role", "soldier", "--token", "b.token"),
     ("invalid identity",), {}),
    ("second-token-is-a-clone", _nothing,
     ("desk", "personalise", "desk", "alpha-1", "--token", "clone.token"), ("clone",), {}),
    ("empty-group", _nothing, ("desk", "group", "desk", "lonely"), ("lonely is empty",), {}),
    ("one-member-group", _nothing, ("desk", "group", "desk", "lonely", "gs-1"),
     ("at least two",), {}),
    ("self-pair", _nothing, ("desk", "pair", "desk", "gs-1", "gs-1"), ("its own dialogue mate",),
     {}),
    # missions
    ("window-in-the-past", _nothing,
     ("desk", "init", "new-desk", "--mission", "late", "--hours", "1", "--start",
      "2001-01-01T00:00:00Z"), ("ends in the past", "2001-01-01T01:00:00Z"), {}),
    ("zero-hours", _nothing, ("desk", "init", "new-desk", "--mission", "x", "--hours", "0"),
     ("more than 0",), {}),
    ("bad-start", _nothing,
     ("desk", "init", "new-desk", "--mission", "x", "--hours", "1", "--start", "tomorrow"),
     ("iso 8601",), {}),
    ("epoch-too-short", _nothing,
     ("desk", "init", "new-desk", "--mission", "x", "--hours", "1", "--epoch-hours", "0.001"),
     ("at least 60 s",), {}),
    ("desk-exists", _nothing, ("desk", "init", "desk", "--mission", "x", "--hours", "1"),
     ("already holds a desk",), {}),
    # a DIR that is a file, or inside one, was a FileExistsError traceback (CLI audit)
    ("init-over-a-file", _nothing,
     ("desk", "init", "alpha-1.token", "--mission", "x", "--hours", "1"),
     ("cannot create the desk folder alpha-1.token", "file exists"), {}),
    ("init-inside-a-file", _nothing,
     ("desk", "init", "alpha-1.token/desk", "--mission", "x", "--hours", "1"),
     ("cannot create the desk folder", "not a directory"), {}),
    ("missing-mission-file", _nothing, ("desk", "apply", "desk", "nothing.toml"),
     ("does not exist",), {}),
    ("mission-file-not-toml", _mission_file("[[node]\nid = 1\n"),
     ("desk", "apply", "desk", "mission.toml", "--tokens", "toks"), ("not valid TOML",), {}),
    ("mission-file-bad-role", _mission_file('[[node]]\nid = "b"\nrole = "general"\n'),
     ("desk", "apply", "desk", "mission.toml", "--tokens", "toks"), ("unknown role",), {}),
    ("mission-file-fails-after-tokens", _mission_file(LATE_FAILING_PLAN),
     ("desk", "apply", "desk", "mission.toml", "--tokens", "toks"), ("unknown node 'ghost'",),
     {}),
    # --tokens naming a file was a FileExistsError traceback (CLI audit)
    ("mission-file-tokens-into-a-file", _mission_file('[[node]]\nid = "b"\nrole = "uav"\n'),
     ("desk", "apply", "desk", "mission.toml", "--tokens", "alpha-1.token"),
     ("cannot create the token folder alpha-1.token",), {}),
    ("mission-file-changes-a-role", _mission_file('[[node]]\nid = "gs-1"\nrole = "uav"\n'),
     ("desk", "apply", "desk", "mission.toml"), ("already enrolled as ground-station",), {}),
    # -1 was a ValueError traceback from the pool; 100000 forked that many (CLI audit)
    *[(f"issue-workers-{n}", _nothing, ("desk", "issue", "desk", "--workers", n),
       ("--workers must be 1..64",), {}) for n in ("0", "-1", "100000")],
    ("audit-limit-zero", _nothing, ("desk", "audit", "desk", "--limit", "0"), ("--limit",), {}),
    ("audit-limit-huge", _nothing,
     ("desk", "audit", "desk", "--limit", "99999999999999999999"), ("--limit",), {}),
    ("as-audit-limit-huge", _nothing,
     ("as", "audit", "--store", "desk", "--limit", "99999999999999999999"), ("--limit",), {}),
    # the AS's commands (sweep of 2026-12-01): tracebacks, hangs and checks made too late
    # (a name under .invalid is refused before any lookup: the resolver sent a DNS query)
    ("as-serve-unknown-host", _nothing,
     ("as", "serve", "--store", "desk", "--listen", "nosuchhost.invalid:7451"),
     ("a name under .invalid never resolves",), {}),
    ("as-serve-address-not-ours", _nothing,
     ("as", "serve", "--store", "desk", "--listen", "192.0.2.1:7451"),
     ("cannot listen on 192.0.2.1:7451",), {}),
    ("as-serve-neither-store", _nothing, ("as", "serve"), ("give one of --store",), {}),
    ("as-import-no-dsn", _nothing, ("as", "import-desk", "desk"), ("--postgres DSN is needed",),
     {}),
    ("as-import-force-alone", _nothing,
     ("as", "import-desk", "desk", "--postgres", "host=/nonexistent", "--force"),
     ("--force only goes with --abandon",), {}),
    ("as-import-abandon-nothing", _nothing, ("as", "import-desk", "desk", "--abandon", "--force"),
     ("nothing to abandon",), {}),
    ("as-import-force-with-dsn", _nothing,
     ("as", "import-desk", "desk", "--abandon", "--force", "--postgres", "host=/nonexistent"),
     ("give no --postgres",), {}),
    ("as-import-meters-no-database", _nothing,
     ("as", "import-meters", "--postgres", "host=/nonexistent/pg dbname=x", "--count", "2",
      "--factory-seed", "f.seed"), ("cannot connect to PostgreSQL",), {}),
    ("as-serve-key-lifetime-nan", _nothing,
     ("as", "serve", "--store", "desk", "--key-lifetime", "nan"), ("--key-lifetime",), {}),
    ("as-serve-cookie-threshold-zero", _nothing,
     ("as", "serve", "--store", "desk", "--cookie-threshold", "0"), ("--cookie-threshold",), {}),
    ("as-serve-identity-rate-zero", _nothing,
     ("as", "serve", "--store", "desk", "--identity-rate", "0"), ("--identity-rate",), {}),
    ("as-serve-max-links-zero", _nothing,
     ("as", "serve", "--store", "desk", "--max-links", "0"), ("--max-links must be 1..",), {}),
    ("as-serve-max-links-over-the-descriptors", _nothing,
     ("as", "serve", "--store", "desk", "--max-links", "100000000"), ("descriptor limit",), {}),
    ("as-request-out-nowhere", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--out", "no/such/folder/k.json"), ("cannot write",), {}),
    ("as-request-out-a-folder", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--out", "desk"), ("not a regular file",), {}),
    # it replaced any file with the keyset's JSON, another node's token too (CLI audit)
    ("as-request-out-over-a-token", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--out", "gs-1.token"), ("not a keyset",), {}),
    ("as-request-out-over-the-desk", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--out", "desk/desk.sqlite"), ("not a keyset",), {}),
    ("as-request-attempts-huge", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--attempts", "1000000"), ("--attempts",), {}),
    ("as-bundle-ahead-too-far", _nothing,
     ("as", "bundle", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--out", "b",
      "--ahead", "5"), ("--ahead",), {}),
    ("import-meters-seed-nowhere", _nothing,
     ("desk", "import-meters", "desk", "--count", "5", "--factory-seed", "no/such/f.seed"),
     ("cannot write factory seed",), {}),
    ("meters-sim-spread-infinite", _factory_seed_file,
     ("meters", "sim", "--as", "127.0.0.1:9", "--count", "1", "--factory-seed", "f.seed",
      "--head-end", "gs-1", "--spread", "inf"), ("--spread",), {}),
    # sim took these and every wait timed out at once, or never (CLI audit)
    *[(f"sim-duration-{d}", _nothing, ("sim", "--nodes", "2", "--duration", d),
       ("--duration is a number of seconds",), {}) for d in ("0", "-1", "nan", "inf")],
    ("sim-cut-unknown-node", _nothing, ("sim", "--nodes", "3", "--cut", "node-01-node-09"),
     ("no node node-09 (the nodes are node-01..node-03)",), {}),  # it said "node-01.."
    ("sim-cut-itself", _nothing, ("sim", "--nodes", "3", "--cut", "node-02-node-02"),
     ("no link to itself",), {}),
    ("meters-sim-negative-first", _factory_seed_file,
     ("meters", "sim", "--as", "127.0.0.1:9", "--count", "2", "--factory-seed", "f.seed",
      "--head-end", "gs-1", "--first", "-1"), ("--first must be 0..",), {}),
    ("as-request-empty-target", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", ""),
     ("--target",), {}),
    ("as-request-empty-purpose", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--purpose", ""), ("--purpose",), {}),
    ("as-request-negative-epoch", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--epoch", "-1"), ("--epoch",), {}),
    ("import-meters-negative-first", _nothing,
     ("desk", "import-meters", "desk", "--count", "5", "--factory-seed", "new.seed",
      "--first", "-3"), ("--first",), {}),
    ("import-meters-no-desk-leaves-no-seed", _nothing,
     ("desk", "import-meters", "no-desk", "--count", "5", "--factory-seed", "new.seed"), (), {}),
    ("as-bundle-out-is-the-token", _nothing,
     ("as", "bundle", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--out",
      "alpha-1.token"), ("is the token file",), {}),
    ("as-bundle-out-a-device", _nothing,
     ("as", "bundle", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--out", "/dev/null"),
     ("not a regular file",), {}),
    ("as-bundle-out-the-desk", _nothing,
     ("as", "bundle", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--out",
      "desk/desk.sqlite"), ("not a bundle",), {}),
    # a typo in desk export's --out: it used to replace the token or the desk with a bundle
    ("export-over-the-token", _nothing,
     ("desk", "export", "desk", "alpha-1", "--out", "alpha-1.token"), ("not a bundle",), {}),
    ("export-over-the-desk", _nothing,
     ("desk", "export", "desk", "alpha-1", "--out", "desk/desk.sqlite"), ("not a bundle",), {}),
    ("export-over-a-device", _nothing,
     ("desk", "export", "desk", "alpha-1", "--out", "/dev/null"), ("not a regular file",), {}),
    ("export-into-a-folder", _nothing,
     ("desk", "export", "desk", "alpha-1", "--out", "desk"), ("not a regular file",), {}),
    # a heartbeat every mate would drop as malformed (ops review): refused before the PIN
    *[(f"agent-status-{name}", _nothing,
       ("agent", "--bundle", "alpha-1.bundle", "--token", "alpha-1.token", "--no-mdns",
        "--listen", "127.0.0.1:0", *extra), (needle,), {})
      for name, extra, needle in (
          # each names its own option first: all three were in every one of these messages
          ("battery", ("--battery", "150"), "error: --battery 0..100: battery out of range"),
          ("text", ("--status-text", "x" * 201), "error: --status-text up to 200"),
          ("position", ("--position", "91,0,0"), "error: --position LAT,LON,ALT in -90..90"),
          ("mdns", ("--mdns-interface", "127.0.0.1"), "--mdns-interface needs mDNS"),
          ("heartbeat-zero", ("--heartbeat", "0"), "--heartbeat is 1..3600"),
          ("heartbeat-nan", ("--heartbeat", "nan"), "--heartbeat is 1..3600"),
          # these two were FileExistsError / FileNotFoundError tracebacks (CLI audit)
          ("state-is-a-file", ("--state", "alpha-1.token"), "cannot create the state folder"),
          ("state-in-a-file", ("--state", "alpha-1.token/s"), "cannot create the state folder"),
          # an empty or mistyped node name was taken as no name, or blocked nothing
          ("peer-empty-name", ("--peer", "@127.0.0.1:5"), "--peer @127.0.0.1:5: identity"),
          ("peer-bad-name", ("--peer", "Gs 1@127.0.0.1:5"), "invalid identity 'Gs 1'"),
          ("block-bad-name", ("--block", "ALPHA-2"), "--block ALPHA-2: invalid identity"),
      )],
    # a mistyped address was refused only once the PIN had been typed (doc walk)
    *[(f"agent-address-{name}", _nothing,
       ("agent", "--bundle", "alpha-1.bundle", "--token", "alpha-1.token", "--no-mdns", *extra),
       (needle,), {"pin": None})
      for name, extra, needle in (
          ("listen-port", ("--listen", "127.0.0.1:70000"), "--listen 127.0.0.1:70000: bad"),
          ("peer-port", ("--peer", "127.0.0.1:70000"), "the port 1..65535"),
          ("named-peer-port", ("--peer", "gs-1@127.0.0.1:x"), "--peer gs-1@127.0.0.1:x: bad"),
          ("as-no-port", ("--as", "127.0.0.1"), "--as '127.0.0.1': expected HOST:PORT"),
      )],
    ("as-request-out-empty", _nothing,
     ("as", "request", "--as", "127.0.0.1:9", "--token", "alpha-1.token", "--target", "gs-1",
      "--out", ""), ("--out needs a file name",), {}),
    ("as-serve-max-pending-zero", _nothing,
     ("as", "serve", "--store", "desk", "--max-pending", "0"), ("--max-pending",), {}),
    ("import-meters-unknown-head-end-leaves-no-seed", _nothing,
     ("desk", "import-meters", "desk", "--count", "5", "--factory-seed", "new.seed",
      "--head-end", "nosuch"), ("head-end nosuch",), {}),
    # it ran without a terminal, drawing for nobody and waiting for keys (CLI audit)
    ("tui-without-a-terminal", _nothing, ("tui", "--control", "nowhere.sock"),
     ("snrmesh tui needs a terminal",), {}),
    # secrets nobody can type: no variable, no terminal
    ("no-passphrase", _nothing, ("desk", "show", "desk"), ("SNRMESH_DESK_PASSPHRASE",),
     {"passphrase": None}),
    *[(f"init-{name}", _nothing,
       ("desk", "init", "new-desk", "--mission", "x", *extra), (needle,), {})
      for name, extra, needle in (
          ("hours-nan", ("--hours", "nan"), "--hours is a number of hours"),  # was a traceback
          ("hours-inf", ("--hours", "inf"), "--hours is a number of hours"),
          ("epoch-nan", ("--hours", "5", "--epoch-hours", "nan"), "--epoch-hours is a number"),
          ("epoch-longer", ("--hours", "5", "--epoch-hours", "10"), "longer than the mission"),
          ("under-a-minute", ("--hours", "0.01"), "a mission lasts at least 60 s"),
          # was a traceback that left a desk no command could open (CLI audit)
          ("past-year-9999", ("--hours", "24", "--start", "9999-12-31T23:00:00Z"),
           "before the year 10000"),
      )],
    ("no-passphrase-init", _nothing, ("desk", "init", "new-desk", "--mission", "x", "--hours", "1"),
     ("SNRMESH_DESK_PASSPHRASE",), {"passphrase": None}),
    ("no-pin-enrol", _nothing,
     ("desk", "enrol", "desk", "bravo-1", "--role", "soldier", "--token", "b.token"),
     ("SNRMESH_PIN",), {"pin": None}),
    ("no-pin-inspect", _nothing,
     ("bundle", "inspect", "alpha-1.bundle", "--token", "alpha-1.token"), ("SNRMESH_PIN",),
     {"pin": None}),
    ("no-pin-rekey", _nothing,
     ("desk", "rekey", "desk", "alpha-1", "--token", "alpha-1.token"), ("SNRMESH_PIN",),
     {"pin": None}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("prepare", "args", "needles", "secrets"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_is_refused_in_one_line_and_changes_nothing(
    site: Site,
    prepare: Prepare,
    args: tuple[object, ...],
    needles: tuple[str, ...],
    secrets: dict[str, str | None],
) -> None:
    prepare(site)
    refused_without_change(site, *args, needles=needles, **secrets)


def test_as_commands_on_the_desk_refuse_in_one_line(site: Site) -> None:
    """``as revoke``/``as audit`` add the AS's columns to a desk file (docs), so only the line."""
    assert_refused(snrmesh("as", "revoke", "ghost", "--store", "desk", cwd=site.root), "ghost")
    with contextlib.closing(sqlite3.connect(site.desk_dir / "desk.sqlite")) as db:
        # a detail naming the columns cannot pass for another entry
        db.execute("""INSERT INTO audit (at, op, detail) VALUES (1, 'x', '{"op": "fake"}')""")
        db.commit()
    shown = snrmesh("as", "audit", "--store", "desk", "--limit", "1", cwd=site.root)
    assert shown.returncode == 0 and " x " in shown.stdout and "fake" not in shown.stdout.split()[2]
    _corrupt_audit_row(site)
    assert_refused(snrmesh("as", "audit", "--store", "desk", cwd=site.root), "corrupt")
    assert_refused(snrmesh("desk", "audit", "desk", cwd=site.root), "corrupt")
    first = snrmesh("as", "revoke", "alpha-2", "--store", "desk", cwd=site.root)
    again = snrmesh("as", "revoke", "alpha-2", "--store", "desk", "--json", cwd=site.root)
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert '"already": true' in again.stdout


def test_agent_control_socket_is_never_a_file_nor_a_running_agents(
    site: Site, tmp_path: Path
) -> None:
    """--control naming a token deleted it; a second agent on a state folder took the running
    agent's socket (which then answered nobody); a folder or a missing one was a traceback."""
    agent = ("agent", "--bundle", "alpha-1.bundle", "--token", "alpha-1.token", "--no-mdns",
             "--listen", "127.0.0.1:0", "--state", tmp_path / "state")  # fmt: skip
    for control, needle in (
        ("gs-1.token", "exists and is not a socket"),
        ("desk", "exists and is not a socket"),
        ("no/such/folder/c.sock", "cannot create the control socket"),
        ("x" * 200 + ".sock", "cannot create the control socket"),
    ):
        refused_without_change(site, *agent, "--control", control, needles=(needle,))
    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.closing(listener):
        listener.bind(str(live))
        listener.listen()
        result = snrmesh(*agent, "--control", live, cwd=site.root)
        assert_refused(result, "another agent is running on the control socket")
        assert live.is_socket()  # still the running one's
    stale = tmp_path / "stale.sock"  # an agent killed with its socket left behind
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as dead:
        dead.bind(str(stale))
    with subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", *map(str, agent), "--control", str(stale)],
        cwd=site.root,
        env={**os.environ, "SNRMESH_PIN": PIN},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            assert "listening on 127.0.0.1" in proc.stderr.readline()
        finally:
            proc.terminate()
    assert proc.returncode == 0


def test_a_revoked_node_cannot_be_exported(site: Site) -> None:
    assert snrmesh("desk", "revoke", "desk", "uav-1", cwd=site.root).returncode == 0
    refused_without_change(
        site, "desk", "export", "desk", "uav-1", "--out", "u.bundle", needles=("uav-1 is revoked",)
    )
    before = snapshot(site.root)  # revoking again, as 'as revoke': exit 0, nothing changed
    again = snrmesh("desk", "revoke", "desk", "uav-1", cwd=site.root)
    assert (again.returncode, again.stdout) == (0, "uav-1 was already revoked: nothing changed\n")
    assert snapshot(site.root) == before


def _token_state(path: Path) -> tuple[object, ...]:
    info = SoftwareToken(path).info()
    return (info.token_id, info.identity, info.role, info.slots, path.stat().st_size)


def test_wrong_pins_lock_the_token_and_change_nothing_else(site: Site) -> None:
    token = "alpha-1.token"
    inspect = ("bundle", "inspect", "alpha-1.bundle", "--token", token)
    others = {k: v for k, v in snapshot(site.root).items() if k != token}
    state = _token_state(site.token("alpha-1"))
    for left in (4, 3, 2, 1):
        line = assert_refused(snrmesh(*inspect, cwd=site.root, pin="0000"), "wrong PIN")
        assert f"{left} {'try' if left == 1 else 'tries'} left" in line
        assert SoftwareToken(site.token("alpha-1")).info().pin_tries_left == left
    assert_refused(snrmesh(*inspect, cwd=site.root, pin="0000"), "locked")
    assert_refused(snrmesh(*inspect, cwd=site.root, pin=PIN), "locked")  # right PIN, too late
    rekey = ("desk", "rekey", "desk", "alpha-1", "--token", token)
    assert_refused(snrmesh(*rekey, cwd=site.root, pin=PIN), "locked")

    assert SoftwareToken(site.token("alpha-1")).info().locked
    assert _token_state(site.token("alpha-1")) == state  # only the counter moved
    assert {k: v for k, v in snapshot(site.root).items() if k != token} == others


def test_a_wrong_pin_for_rekey_leaves_the_desk_as_it_was(site: Site) -> None:
    before = snapshot(site.desk_dir)
    rekey = ("desk", "rekey", "desk", "alpha-1", "--token", "alpha-1.token")
    assert_refused(snrmesh(*rekey, cwd=site.root, pin="0000"), "wrong PIN", "4 tries left")
    assert snapshot(site.desk_dir) == before


def test_with_json_an_error_is_also_one_json_object_on_stdout(site: Site) -> None:
    """A script that asked for --json reads JSON whatever happened (and the exit status)."""
    result = snrmesh("desk", "show", "nowhere", "--json", cwd=site.root)
    line = assert_refused(result, "nowhere")
    error = json.loads(result.stdout)
    assert error == {"error": line.removeprefix("snrmesh: error: "), "kind": error["kind"]}
    assert error["kind"] == "DeskNotFound"  # the error type, for a script to branch on
    assert snrmesh("desk", "show", "nowhere", cwd=site.root).stdout == ""  # without: stderr only


def test_usage_errors_exit_2_without_a_traceback(site: Site) -> None:
    for args in (
        ("desk", "enrol", "desk", "bravo-1", "--role", "general", "--token", "b.token"),
        ("desk", "export", "desk", "alpha-1"),
        ("history", "--peer", "gs-1", "--group", "squad"),  # was no output and exit 0
    ):
        before = snapshot(site.root)
        result = snrmesh(*args, cwd=site.root)
        assert result.returncode == 2, args
        assert "usage:" in result.stderr and "Traceback" not in result.stderr
        assert snapshot(site.root) == before


def test_a_reader_that_stops_early_ends_the_command_quietly(site: Site) -> None:
    """``snrmesh desk show | head -1``: exit 141 (SIGPIPE's), no traceback."""
    seed = site.root / "fleet.seed"
    enrolled = snrmesh(
        "desk", "import-meters", "desk", "--count", "3000", "--factory-seed", seed, cwd=site.root
    )
    assert enrolled.returncode == 0, enrolled.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNRMESH_")}
    env["SNRMESH_DESK_PASSPHRASE"] = PASSPHRASE
    show = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "desk", "show", "desk"],
        cwd=site.root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert show.stdout is not None and show.stderr is not None
    assert show.stdout.readline().startswith(b"mission ")
    show.stdout.close()  # the reader goes away; some 200 KB are still to come
    assert show.wait(60) == 141
    assert show.stderr.read() == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "args", [("desk", "show", "desk"), ("desk", "show", "desk", "--json"), ("--help",)]
)
def test_output_to_a_full_disk_is_one_line_not_a_traceback(
    site: Site, args: tuple[str, ...]
) -> None:
    """``snrmesh desk show --json > state.json`` on a full disk (here /dev/full)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNRMESH_")}
    env["SNRMESH_DESK_PASSPHRASE"] = PASSPHRASE
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "mesh.cli", *args],
            cwd=site.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr == "snrmesh: error: cannot write the output: No space left on device\n"


def _at_a_prompt(site: Site, keys: bytes) -> tuple[int, str]:
    """Run ``bundle inspect`` on a terminal (a pty) with no SNRMESH_PIN; type ``keys`` at the
    PIN prompt; return the exit status and all the terminal showed."""
    import pty
    import select
    import time

    env = {k: v for k, v in os.environ.items() if k != "SNRMESH_PIN"}
    argv = [sys.executable, "-m", "mesh.cli", "bundle", "inspect", "alpha-1.bundle"]
    argv += ["--token", "alpha-1.token"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.chdir(site.root)
        os.execve(sys.executable, argv, env)
    shown, deadline, typed = b"", time.monotonic() + 60, False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed its terminal
                    break
                if not chunk:
                    break
                shown += chunk
            if not typed and b"PIN" in shown:
                os.write(fd, keys)
                typed = True
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_ctrl_d_at_a_pin_prompt_is_one_line_not_a_traceback(site: Site) -> None:
    code, shown = _at_a_prompt(site, b"\x04")
    assert "Traceback" not in shown and "EOFError" not in shown
    assert "none given (end of input)" in shown and code == 1


def test_ctrl_c_at_a_pin_prompt_ends_the_prompt_line_first(site: Site) -> None:
    code, shown = _at_a_prompt(site, b"\x03")
    assert "Traceback" not in shown
    assert "\nsnrmesh: interrupted" in shown.replace("\r\n", "\n") and code == 130


def test_a_rekey_cut_short_by_ctrl_c_says_how_to_finish_it(
    site: Site, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during 'desk rekey' may leave the change half way (docs/keysets.md): the one
    line says to run it again, which finishes it (test_rekey.py covers the resume)."""
    from mesh.cli.main import main
    from provisioning.desk import Desk

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Desk, "rekey", interrupted)
    monkeypatch.setenv("SNRMESH_DESK_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("SNRMESH_PIN", PIN)
    monkeypatch.chdir(site.root)
    assert main(["desk", "rekey", "desk", "alpha-1", "--token", "alpha-1.token"]) == 130
    err = capsys.readouterr().err
    assert "may be half done: run the same 'snrmesh desk rekey' again" in err
    assert err.endswith("snrmesh: interrupted\n") and "Traceback" not in err
