"""The ``snrmesh`` command line (entry point: :func:`run`, the work: :func:`mesh.cli.main.main`)."""

from __future__ import annotations

import sys


def run() -> int:
    """The console script: :func:`mesh.cli.main.main`, with ctrl-C during its imports handled.

    Importing the command line takes a few tenths of a second (``cryptography``, the stores, the
    parsers); a ctrl-C in that window would otherwise end in a ``KeyboardInterrupt`` traceback.
    This module imports nothing heavy, so the window left is the interpreter's own start-up.
    """
    try:
        from mesh.cli.main import main
    except KeyboardInterrupt:
        print("snrmesh: interrupted", file=sys.stderr)
        return 130
    return main()
