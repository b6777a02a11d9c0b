"""Crash-safe file writes and bounded reads.

Token files, bundles and exports are replaced atomically (temporary file in
the same folder, fsync, rename, fsync of the folder), so a crash or a full
disk leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mesh.errors import MeshError

__all__ = ["FileTooLarge", "read_bounded", "write_atomic"]


class FileTooLarge(MeshError):
    """A file is larger than the format it claims to be allows."""


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_bounded(path: str | os.PathLike[str], max_size: int, *, what: str) -> bytes:
    """Read a whole file, refusing one larger than ``max_size`` before reading it."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_size:
            raise FileTooLarge(f"{what} {os.fspath(path)} is too large ({size} > {max_size} bytes)")
        return handle.read(max_size + 1)[: max_size + 1]
