"""Every snrmesh command builds the whole parser; the heavy libraries load only where used.

The agent must stay small (issue 4: < 60 MB per agent): loading Textual (the TUI),
psycopg/libpq (the AS on PostgreSQL), pyscard (cards) or uvloop (the AS's event loop)
in every process would cost memory for nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("textual", "psycopg", "smartcard", "rich", "uvloop")


def test_building_the_cli_loads_no_heavy_library() -> None:
    probe = (
        "import json, sys, mesh.cli.main as m; m.build_parser(); "
        f"print(json.dumps([n for n in {HEAVY!r} if n in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


def test_the_agents_uplink_loads_no_heavy_library() -> None:
    """``agent --as`` brings in the AS's client, not its server's event loop or database."""
    probe = (
        "import json, sys, mesh.agent.agent, provisioning.authserver.client; "
        f"print(json.dumps([n for n in {HEAVY!r} if n in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []
