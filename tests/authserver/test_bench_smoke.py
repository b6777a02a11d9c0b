"""``bench/auth_server.py`` runs end to end at a toy size: every step completes, nothing fails.

No figure is asserted (the machines are shared and noisy: figures belong in the
closing note), only that each step ran and served every meter. The bench
broke once without a test noticing: it served a desk it had just imported
into PostgreSQL, which the import's mark now forbids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.authserver.conftest import cli_env
from tests.authserver.pgserver import unavailable_reason

BENCH = Path(__file__).resolve().parents[2] / "bench" / "auth_server.py"


def test_the_authentication_server_bench_runs_every_step() -> None:
    args = ["--meters", "2000", "--seconds", "1", "--storm", "50"]
    args += ["--baseline-seconds", "0.5", "--prefetch-seconds", "0.5", "--json"]
    done = subprocess.run(
        [sys.executable, str(BENCH), *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    stores = ["sqlite"] if unavailable_reason() else ["sqlite", "postgres"]
    runs = [f"sustained_{s}" for s in stores]
    runs += ["sustained_sqlite_asyncio_loop", "sustained_sqlite_prefetch"]
    for run in runs:
        assert figures[run]["keysets"] > 0 and figures[run]["failures"] == 0, (run, figures[run])
    for store in stores:
        storm = figures[f"storm_{store}"]
        assert storm["served"] == storm["meters"] == 50 and not storm["failed"], storm
    assert figures["enrolment"]["meters"] == 2000
    floors = figures["floors"]
    assert all(floors[f"{part}_ms"] > 0 for part in ("handshake", "io", "store")), floors
