"""The software token: a secure element emulated by one PIN-sealed file.

For laptops without a smartcard. The file holds the identity in the clear
(like a card answers GET IDENTITY without a PIN) and the slot keys sealed
under a key derived from the PIN (scrypt, N >= 2^15, then ChaCha20-Poly1305).

Layout (``docs/keysets.md``): ``MAGIC || CBOR(header) || SHA-256(both)``. The
trailing digest detects accidental corruption (a flipped byte reports
"corrupt", not "wrong PIN"); the AEAD's associated data is the header minus
the PIN counter, so editing the identity or generations breaks the seal.

The retry counter lives in the file and is decremented *before* a wrong PIN
is reported. Honest limit: someone who copies the file can restore the counter
and guess offline; scrypt makes each guess cost ~0.1 s and a card (PC/SC
backend) removes that limit. Writes are atomic (:func:`mesh.files.write_atomic`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
import time
from collections.abc import Iterator, Sequence

from mesh.crypto import Sealer
from mesh.files import FileTooLarge, read_bounded, write_atomic
from mesh.token import ops
from mesh.token.errors import TokenCorrupt, TokenError, TokenNotReady
from mesh.token.image import TokenImage, check_pin
from mesh.token.interface import SecureElement, Slot, TokenInfo

__all__ = ["MAX_TOKEN_FILE_SIZE", "SoftwareToken", "check_pin"]

MAX_TOKEN_FILE_SIZE = 16 * 1024
LOCK_WAIT = 30.0  # seconds another process's link may hold the file (see ``exclusive``)


class SoftwareToken(SecureElement):
    """A :class:`SecureElement` backed by one file.

    Each process reads the file into memory: operations that may change its keys
    run under :meth:`exclusive`, which serialises them across processes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._image = self._load()
        self._sealer: Sealer | None = None
        self._keys: tuple[bytes, ...] | None = None
        self._exclusive = False  # this handle holds the file (``exclusive``)

    # -- personalisation (desk only) ---------------------------------------------------------

    @classmethod
    def personalise(
        cls,
        path: str | os.PathLike[str],
        *,
        pin: str,
        token_id: bytes,
        identity: str,
        role: str,
        keys: Sequence[bytes],
        generations: Sequence[int],
    ) -> SoftwareToken:
        """Create a new token file. Refuses to overwrite an existing file."""
        check_pin(pin)
        if os.path.exists(path):
            raise TokenError(f"token file {os.fspath(path)} already exists; refusing to overwrite")
        image = TokenImage.create(
            pin=pin,
            token_id=token_id,
            identity=identity,
            role=role,
            keys=keys,
            generations=generations,
        )
        write_atomic(path, image.encode())
        return cls(path)

    # -- SecureElement ----------------------------------------------------------------------------

    def _load(self) -> TokenImage:
        try:
            raw = read_bounded(self.path, MAX_TOKEN_FILE_SIZE, what="token file")
        except FileNotFoundError:
            raise TokenError(f"token file {self.path} does not exist") from None
        except OSError as exc:
            raise TokenError(f"cannot read token file {self.path}: {exc.strerror}") from None
        except FileTooLarge as exc:
            raise TokenCorrupt(str(exc)) from None
        return TokenImage.decode(raw)

    def info(self) -> TokenInfo:
        return self._image.info()

    def _store(self, image: TokenImage) -> None:
        try:
            write_atomic(self.path, image.encode())
        except OSError as exc:
            raise TokenError(f"cannot write token file {self.path}: {exc.strerror}") from None
        self._image = image

    @contextlib.contextmanager
    def exclusive(self, *, wait: float | None = None) -> Iterator[None]:
        """Lock ``<file>.lock`` (for up to ``wait`` s or ``LOCK_WAIT``), then read the file again.

        A lock file beside the token, not the token itself: writes replace the
        token file (a new inode), which would leave a waiter holding a lock on
        the old one. The holder removes the lock file before it lets go, and a
        waiter that then holds a removed file tries again, so no file is left
        behind and at most one process holds the one at the path. Keys unlocked
        before and since changed by another process are opened again with the
        sealer the PIN gave (a key change reseals under the same PIN), so a
        long-running agent follows an ``as request`` made beside it; if they do
        not open, they are dropped and the PIN is needed again.
        """
        if self._exclusive:  # held already, by this handle (the agent's one fetch at a time)
            yield
            return
        lock_path = self.path + ".lock"
        wait = LOCK_WAIT if wait is None else wait
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise TokenError(f"cannot lock token file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, lock_path):
                    break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise TokenError(
                        f"token file {self.path} is in use by another process (waited {wait:g} s)"
                    ) from None
                time.sleep(0.05)
            except OSError as exc:  # a file system that cannot lock, say
                os.close(fd)
                raise TokenError(f"cannot lock token file {self.path}: {exc.strerror}") from None
            os.close(fd)  # held by another, or removed by its last holder: again
        try:
            image = self._load()
            if image.generations != self._image.generations:
                keys = None if self._sealer is None else image.open_keys(self._sealer)
                if keys is None:
                    self._sealer = None
                self._keys = keys
            self._image = image
            self._exclusive = True
            yield
        finally:
            self._exclusive = False
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            os.close(fd)  # releases the lock

    def verify_pin(self, pin: str) -> None:
        # under the lock: the counter it may write back must not undo another process's key
        # change made while scrypt ran
        with contextlib.nullcontext() if self._exclusive else self.exclusive():
            self._image = self._load()  # another process may have counted tries
            self._sealer = self._keys = None  # a failed check ends the session, as on a card
            check = self._image.try_pin(pin)
            if check.changed:
                self._store(check.image)  # a wrong PIN is counted before it is reported
            check.raise_if_wrong()
            self._sealer, self._keys = check.sealer, check.keys

    def _key(self, slot: Slot) -> bytes:
        if self._keys is None:
            raise TokenNotReady("verify the PIN first")
        return self._keys[int(slot)]

    def unwrap(self, copy: str) -> bytes:
        return ops.unwrap(copy, key=self._key(Slot.WRAP), kid=self._image.kid(Slot.WRAP))

    def mac(self, slot: Slot, data: bytes) -> bytes:
        ops.check_mac_slot(slot)
        return ops.mac(slot, data, key=self._key(slot))

    def derive(self, slot: Slot, context: bytes) -> bytes:
        ops.check_derive(slot, context)
        return ops.derive_key(slot, context, key=self._key(slot))

    def verify_mac(self, slot: Slot, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(slot, data), tag)

    def key_change(self, message: str) -> None:
        current = self._key(Slot.KEY_CHANGE)
        sealer = self._sealer
        if sealer is None:  # pragma: no cover - set together with the keys
            raise TokenNotReady("verify the PIN first")
        change = ops.accept_key_change(
            message,
            current_key=current,
            kid=self._image.kid(Slot.KEY_CHANGE),
            token_id=self._image.token_id,
            generations=self._image.generations,
        )
        self._store(self._image.resealed(sealer, change.generations, change.keys))
        self._keys = change.keys


def _same_file(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one removed since it was opened)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
