"""Crash-safe file writes and bounded reads.

Token files, bundles and exports are replaced atomically (a temporary file
made anew in the same folder, fsync, rename, fsync of the folder), so a crash
or a full disk leaves either the old file or the new one, never a mix. Files
that hold secrets or history are created private (mode 0600) even in a folder
that others may read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from mesh.errors import MeshError

__all__ = [
    "FileTooLarge",
    "UnsafeOutput",
    "check_replaceable",
    "create_private",
    "read_bounded",
    "sync_folder",
    "write_atomic",
]


class FileTooLarge(MeshError):
    """A file is larger than the format it claims to be allows."""


class UnsafeOutput(MeshError):
    """A file a command was told to write is one it must not replace, or cannot write."""


def check_replaceable(
    path: str,
    *,
    option: str,
    token: str | None = None,
    looks_like: tuple[bytes, str] | None = None,
) -> None:
    """Before the work: a bundle exported over a token, or keys changed with nowhere to write
    the result, is lost for good, so refuse at once what :func:`write_atomic` must not replace.

    That is anything but a regular file (a folder, a device, a symlink: replaced, not
    followed), the ``token`` file itself, and -- with ``looks_like`` (magic, "a bundle") -- an
    existing file of another kind (a desk's database, a token). Then a file is made (and
    removed) beside ``path``: the write will work.
    """
    if not path:
        raise UnsafeOutput(f"{option} needs a file name")
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isfile(path):
            raise UnsafeOutput(f"{option} {path} exists and is not a regular file")
        if token is not None and os.path.exists(token) and os.path.samefile(path, token):
            raise UnsafeOutput(f"{option} {path} is the token file")
        if looks_like is not None:
            magic, kind = looks_like
            try:
                with open(path, "rb") as f:
                    head = f.read(len(magic))
            except OSError as exc:
                raise UnsafeOutput(f"cannot read {path}: {exc.strerror}") from None
            if head != magic:
                raise UnsafeOutput(f"{option} {path} exists and is not {kind}: not replaced")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".snrmesh-check-"):
            pass
    except OSError as exc:
        raise UnsafeOutput(f"cannot write {path}: {exc.strerror}") from None


def sync_folder(directory: str | os.PathLike[str]) -> None:
    """``fsync`` a folder, so that a file just created or renamed in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: str | os.PathLike[str], data: bytes, mode: int, *, sync: bool) -> None:
    """Create ``path`` (never one already there, nor through a symlink) holding ``data``.

    Raises ``FileExistsError`` if something is there; any other failure removes it again.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def create_private(path: str | os.PathLike[str], data: bytes = b"") -> bool:
    """Create ``path`` with ``data``, of mode 0600, unless something is there already; True if made.

    For SQLite files (an empty file is an empty database): ``sqlite3.connect`` creates a
    missing one with mode 0644, and its ``-wal`` and ``-shm`` files take the database's mode,
    so an agent's history or a desk's sealed keys in a folder of mode 0755 were readable by
    every user of the machine. ``O_NOFOLLOW``: a symlink planted there is refused, not followed.
    With ``data`` (a secret that must not replace one another process made meanwhile): written
    and synced, the file and its folder; a failure removes it again. A reader meanwhile may see
    it short, so its reader must check the length.
    """
    try:
        _write_new(path, data, 0o600, sync=bool(data))
    except FileExistsError:
        return False
    if data:
        sync_folder(Path(path).parent)
    return True


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` through a temporary file of ``mode`` made anew beside it.

    Anew: a random name opened with ``O_EXCL | O_NOFOLLOW``, so a file or symlink already there
    (planted, or left by a killed process of the same pid) is never written through, nor its
    owner and mode given to ``path``.
    """
    target = Path(path)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    _write_new(tmp, data, mode, sync=True)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sync_folder(target.parent)


def read_bounded(path: str | os.PathLike[str], max_size: int, *, what: str) -> bytes:
    """Read a whole file, refusing one larger than ``max_size`` before reading it."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_size:
            raise FileTooLarge(f"{what} {os.fspath(path)} is too large ({size} > {max_size} bytes)")
        return handle.read(max_size + 1)[: max_size + 1]
