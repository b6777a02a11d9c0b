"""Minting Communication Keysets in bulk, streamed and spread over the CPU cores.

A 1,000-node mission has ~300 k CKs (600 k JWE copies). Jobs are cut into
chunks; worker processes mint and wrap each chunk and hand back rows that the
caller writes to the store, so memory holds a few chunks, never the mission.
The slot keys reach the workers once, through the pool initializer.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import random_bytes
from mesh.keyset import CK_ID_SIZE, PAIR_KEY_SIZE, CommunicationKeyset, wrap_copy

__all__ = ["CHUNK", "CkJob", "CkRow", "WrapTarget", "mint_keysets"]

CHUNK = 500
INLINE_LIMIT = 2 * CHUNK  # below this, a pool costs more than it saves


@dataclass(frozen=True, slots=True)
class WrapTarget:
    """A party's current ``WRAP`` slot key and its ``kid``."""

    kid: str
    key: bytes


# (party_a, party_b, epoch index, not_before, not_after)
CkJob = tuple[str, str, int, int, int]
# (ck_id, a, b, epoch, not_before, not_after, copy_a, copy_b)
CkRow = tuple[bytes, str, str, int, int, int, str, str]

_targets: dict[str, tuple[str, jwk.JWK]] = {}
_mission_id = b""


def _init(targets: dict[str, WrapTarget], mission_id: bytes) -> None:
    global _mission_id
    _targets.clear()
    _targets.update(
        {
            name: (t.kid, jwk.JWK(kty="oct", k=base64url_encode(t.key)))
            for name, t in targets.items()
        }
    )
    _mission_id = mission_id


def _worker_init(targets: dict[str, WrapTarget], mission_id: bytes) -> None:
    """A pool worker leaves ctrl-C to the parent (which ends the pool), so one key press is
    one line, not a ``KeyboardInterrupt`` traceback from every worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init(targets, mission_id)


def _mint(chunk: list[CkJob]) -> list[CkRow]:
    rows: list[CkRow] = []
    for a, b, epoch, nbf, exp in chunk:
        ck = CommunicationKeyset(
            ck_id=random_bytes(CK_ID_SIZE),
            pair_key=random_bytes(PAIR_KEY_SIZE),
            mission_id=_mission_id,
            party_a=a,
            party_b=b,
            not_before=nbf,
            not_after=exp,
        )
        kid_a, key_a = _targets[a]
        kid_b, key_b = _targets[b]
        rows.append(
            (
                ck.ck_id,
                a,
                b,
                epoch,
                nbf,
                exp,
                wrap_copy(ck, holder=a, kid=kid_a, wrap_key=key_a),
                wrap_copy(ck, holder=b, kid=kid_b, wrap_key=key_b),
            )
        )
    return rows


def _chunks(jobs: Iterable[CkJob]) -> Iterator[list[CkJob]]:
    it = iter(jobs)
    while chunk := list(islice(it, CHUNK)):
        yield chunk


def mint_keysets(
    jobs: Iterable[CkJob],
    targets: dict[str, WrapTarget],
    mission_id: bytes,
    *,
    expected: int,
    workers: int | None = None,
    on_chunk: Callable[[int], None] = lambda n: None,
) -> Iterator[list[CkRow]]:
    """Yield minted rows chunk by chunk; ``expected`` (the job count) picks inline vs pool."""
    processes = workers or os.cpu_count() or 1
    if expected <= INLINE_LIMIT or processes == 1:
        _init(targets, mission_id)
        try:
            for chunk in _chunks(jobs):
                rows = _mint(chunk)
                on_chunk(len(rows))
                yield rows
        finally:
            _targets.clear()
        return
    ctx = multiprocessing.get_context("fork")
    with (
        ctx.Pool(processes, initializer=_worker_init, initargs=(targets, mission_id)) as pool,
        _ctrl_c_deferred() as check,
    ):
        results = pool.imap(_mint, _chunks(jobs))
        while True:
            try:
                rows = results.next(timeout=POLL)
            except multiprocessing.TimeoutError:
                check()
                continue
            except StopIteration:
                return
            check()
            on_chunk(len(rows))
            yield rows


POLL = 0.1  # seconds between two looks at a ctrl-C while the pool works


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[Callable[[], None]]:
    """While the pool's results are waited for, ctrl-C only sets a flag: ``check()`` raises it.

    The wait is a ``threading.Condition``; a KeyboardInterrupt raised inside its
    lock bookkeeping can come out as "RuntimeError: release unlocked lock", a
    traceback for one key press (seen once in CI). Raised from ``check()``, it is
    the plain KeyboardInterrupt the command line reports in one line.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    pressed = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal pressed
        pressed = True

    def check() -> None:
        if pressed:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
