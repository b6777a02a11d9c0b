"""The root of every exception raised by the ``mesh`` package.

One root lets the command line and the agent catch "anything snrmesh
refused" in one place and turn it into a one-line message, while anything
else (a bug) still surfaces as a traceback in tests.
"""

from __future__ import annotations

import sqlite3

__all__ = ["MeshError", "sqlite_reason"]


class MeshError(Exception):
    """Base class of all errors raised on purpose by the ``mesh`` package."""


# SQLite result codes that are about where a store lives (its folder, its disk), not what it
# holds: an operator fixes these by freeing space or mounting read-write, not from a backup
_SQLITE_PLACES = (
    ("SQLITE_CANTOPEN", "cannot open it or its journal (a read-only or missing folder?)"),
    ("SQLITE_READONLY", "it is read-only here"),
    ("SQLITE_FULL", "the disk is full"),
    ("SQLITE_IOERR", "the disk failed a read or a write"),
    ("SQLITE_PERM", "no permission"),
    ("SQLITE_BUSY", "another process holds it locked"),
)


def sqlite_reason(exc: sqlite3.Error) -> str | None:
    """What an SQLite error says of the store's place (full, read-only...); None if not that.

    None leaves the error as what it may be: a corrupt file.
    """
    name = getattr(exc, "sqlite_errorname", None) or ""
    return next((why for prefix, why in _SQLITE_PLACES if name.startswith(prefix)), None)
