"""The ``snrmesh`` command: one entry point, one sub-command per job.

Every error snrmesh raises on purpose (a :class:`mesh.errors.MeshError`)
becomes one line on stderr and exit status 1 -- and, for a command run with
``--json``, also one JSON object on stdout (``{"error": ..., "kind": ...}``),
so a script reads JSON whatever happened. Usage errors exit 2 (argparse's
text). A traceback means a bug.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sqlite3
import sys
from collections.abc import Sequence

from mesh import __version__
from mesh.cli import agent as agent_cli
from mesh.cli import bundle as bundle_cli
from mesh.cli import card as card_cli
from mesh.cli import demo as demo_cli
from mesh.cli import sim as sim_cli
from mesh.errors import MeshError, sqlite_reason
from provisioning import cli as desk_cli
from provisioning.authserver import cli as as_cli
from tui import cli as tui_cli

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
snrmesh: serverless end-to-end encrypted mesh for squads, UAVs and IoT fleets.

Before a mission, the provisioning desk ('snrmesh desk ...') enrols every node,
personalises its token (its secure element), declares who may talk to whom and
issues a time-limited Communication Keyset for every such pair and epoch. Each
node then carries a bundle ('snrmesh desk export') into the field.
"""

EPILOG = """\
secrets: the desk passphrase comes from SNRMESH_DESK_PASSPHRASE or a prompt, a
token PIN from SNRMESH_PIN or a prompt -- never from the command line.

Start with:  snrmesh desk init --help      (see README.md for a walkthrough)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snrmesh",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"snrmesh {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    desk_cli.register(commands)
    as_cli.register(commands)
    bundle_cli.register(commands)
    card_cli.register(commands)
    agent_cli.register(commands)
    sim_cli.register(commands)
    demo_cli.register(commands)
    tui_cli.register(commands)
    return parser


# what writing to stdout raises when it goes to a full disk (`> report.json`) or a dead device
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as exc:  # --help into a full disk
        if not _is_output_error(exc):
            raise
        return _output_failed(exc)
    try:
        code: int = args.func(args)
    except MeshError as exc:
        return _failed(args, str(exc), type(exc).__name__)
    except sqlite3.DatabaseError as exc:
        why = sqlite_reason(exc) or "store is corrupt or unwritable"
        return _failed(args, f"{why} ({exc})", "StoreError")
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:  # the reader went away (`snrmesh desk show | head`): stop quietly
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a pipe closed under a writer
    except OSError as exc:
        if not _is_output_error(exc):
            raise
        return _output_failed(exc)
    return code


def _is_output_error(exc: OSError) -> bool:
    """A write to stdout that failed; a file's error names the file and is the command's own."""
    return exc.errno in _OUTPUT_ERRNOS and exc.filename is None


def _output_failed(exc: OSError) -> int:
    _quiet_stdout()  # the rest, and a --json error object, would fail the same way
    print(f"snrmesh: error: cannot write the output: {exc.strerror}", file=sys.stderr)
    return 1


def _interrupted() -> int:
    print("snrmesh: interrupted", file=sys.stderr)
    return 130  # 128 + SIGINT, what a shell reports for a command ended by ctrl-C


def _failed(args: argparse.Namespace, message: str, kind: str) -> int:
    print(f"snrmesh: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "kind": kind}), flush=True)
    return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: flushing the rest at exit would fail on the pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
