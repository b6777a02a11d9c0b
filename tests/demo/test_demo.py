"""``snrmesh demo`` end to end: headless, and the TUI driven inside tmux like an operator would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sim_dirs() -> set[Path]:
    return set(Path(os.environ.get("TMPDIR", "/tmp")).glob("snrmesh-sim-*"))


def test_headless_demo_reports_relay_and_replies_then_cleans_up() -> None:
    before = _sim_dirs()
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "demo", "--headless", "--duration", "9", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["peers"] == {
        "alpha-1": "direct",
        "alpha-2": "direct",
        "uav-1": "relayed via alpha-1",
    }
    texts = [m["text"] for m in report["messages"]]
    assert "gs-1, uav-1: on station, camera up (via alpha-1)" in texts
    assert "all stations, alpha-2: road clear, moving up" in texts
    assert _sim_dirs() <= before  # the demo's files are gone


@pytest.mark.parametrize("duration", ["-5", "nan", "inf", "1e12"])
def test_a_duration_no_clock_can_wait_is_refused_before_anything_starts(duration: str) -> None:
    """These were tracebacks from time.sleep, once the four agents were running."""
    before = _sim_dirs()
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "demo", "--headless", "--duration", duration],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == "snrmesh: error: --duration is a number of seconds, 0..86,400\n"
    assert _sim_dirs() <= before


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux (scripts/setup installs it when run as root)")
    server = ["tmux", "-L", f"snrmesh-test-{os.getpid()}"]
    yield server
    subprocess.run([*server, "kill-server"], capture_output=True, timeout=10)


def _pane(tmux: list[str]) -> str:
    return subprocess.run(
        [*tmux, "capture-pane", "-p", "-t", "demo"], capture_output=True, text=True, timeout=10
    ).stdout


def _wait_pane(tmux: list[str], *needles: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        pane = _pane(tmux)
        if all(n in pane for n in needles):
            return pane
        if time.monotonic() > deadline:
            raise AssertionError(f"pane never showed {needles!r}; last pane:\n{pane}")
        time.sleep(0.3)


def test_operator_chats_from_the_tui_and_sees_the_delivered_tick_and_reply(
    tmux: list[str],
) -> None:
    before = _sim_dirs()
    command = f"cd {ROOT} && exec {sys.executable} -m mesh.cli demo"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "demo", "-x", "120", "-y", "40", command],
        check=True,
        timeout=10,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    _wait_pane(tmux, "gs-1 (ground-station)", "via alpha-1", "● alpha-1")
    subprocess.run([*tmux, "send-keys", "-t", "demo", "F2"], check=True, timeout=10)
    time.sleep(0.5)
    subprocess.run([*tmux, "send-keys", "-t", "demo", "Enter"], check=True, timeout=10)
    _wait_pane(tmux, "alpha-1 (soldier)")
    subprocess.run(
        [*tmux, "send-keys", "-t", "demo", "radio check from the test", "Enter"],
        check=True,
        timeout=10,
    )
    pane = _wait_pane(tmux, "copy that: radio check from the test", timeout=30)
    mine = next(line for line in pane.splitlines() if "me " in line and "radio check" in line)
    assert "✓✓" in mine  # delivered (and here read: the mate's script marks it read)
    subprocess.run([*tmux, "send-keys", "-t", "demo", "C-q"], check=True, timeout=10)
    deadline = time.monotonic() + 30
    while (
        subprocess.run(
            [*tmux, "has-session", "-t", "demo"], capture_output=True, timeout=10
        ).returncode
        == 0
    ):
        assert time.monotonic() < deadline, "the demo did not quit"
        time.sleep(0.3)
    time.sleep(0.5)
    assert _sim_dirs() <= before  # every process stopped, every file removed
