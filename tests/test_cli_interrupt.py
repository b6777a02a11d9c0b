"""A ctrl-C is one line and exit status 130 at any point of a command, its imports included.

Importing the command line takes a few tenths of a second; a SIGINT then used to end in a
``KeyboardInterrupt`` traceback from the import machinery.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

# The child sends itself a real SIGINT while ``mesh.cli.main`` is being imported (a meta-path
# hook that fires when the import system looks for it), then runs the console script's target.
CHILD = """
import os, signal, sys

class SigintOnImport:
    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SigintOnImport({name!r}))
from mesh.cli import run
sys.exit(run())
"""


def _interrupted_at(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD.format(name=name), "desk", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_ctrl_c_while_the_command_line_is_imported_prints_one_line() -> None:
    result = _interrupted_at("mesh.cli.main")
    assert "Traceback" not in result.stderr
    assert result.stderr == "snrmesh: interrupted\n"
    assert result.returncode == 130


def test_ctrl_c_while_a_library_of_the_command_line_is_imported_prints_one_line() -> None:
    result = _interrupted_at("mesh.keyset.bundle")  # deep in main's imports
    assert "Traceback" not in result.stderr
    assert (result.stderr, result.returncode) == ("snrmesh: interrupted\n", 130)


def test_the_console_script_runs_the_guarded_entry_point() -> None:
    (script,) = entry_points(group="console_scripts", name="snrmesh")
    assert script.value == "mesh.cli:run"
