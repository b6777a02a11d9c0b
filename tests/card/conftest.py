"""Real PC/SC for the card tests: one private pcscd per session, virtual cards on demand.

The session's pcscd (:class:`mesh.sim.pcscd.PrivatePcscd`) runs in its own
mount namespace with two vpcd readers on private ports, and is stopped by PID
at the end. Every test that needs it skips, with the reason, where it cannot
run (pcscd or vsmartcard-vpcd not installed, no pyscard, not root and no user
namespaces). ``PCSCLITE_CSOCK_NAME`` is set for this process and inherited by
the CLI and agent processes the tests start.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh.sim.pcscd import PcscdUnavailable, PrivatePcscd, VirtualReader
from mesh.token import TokenAbsent
from mesh.token.emulator import Emulator, VirtualCard
from mesh.token.errors import CardError

PRESENCE_TIMEOUT = 10.0


@pytest.fixture(scope="session")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePcscd]:
    try:
        import smartcard.scard  # noqa: F401
    except ImportError:
        pytest.skip("pyscard is not installed (pip install 'snrmesh[card]')")
    daemon = PrivatePcscd(tmp_path_factory.mktemp("pcscd"))
    try:
        daemon.start()
    except PcscdUnavailable as exc:
        pytest.skip(f"no private pcscd here: {exc}")
    saved = os.environ.get("PCSCLITE_CSOCK_NAME")
    os.environ.update(daemon.env())
    yield daemon
    daemon.stop()
    if saved is None:
        os.environ.pop("PCSCLITE_CSOCK_NAME", None)
    else:
        os.environ["PCSCLITE_CSOCK_NAME"] = saved


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def card_present(reader: VirtualReader) -> bool:
    from mesh.token.pcsc import PcscChannel

    channel = PcscChannel(reader.name)
    try:
        with channel.transaction():
            return True
    except TokenAbsent:
        return False
    except CardError:  # a card half in or out: pcscd may answer "protocol mismatch" meanwhile
        return False
    finally:
        channel.close()


class CardSlot:
    """A virtual card that a test inserts into a reader and pulls out again (in this process)."""

    def __init__(self, reader: VirtualReader, state: Path) -> None:
        self.reader = reader
        self.state = state
        self._emulator: Emulator | None = None
        self._thread: threading.Thread | None = None

    @property
    def spec(self) -> str:
        return f"pcsc:{self.reader.name}"

    def insert(self, card: VirtualCard | None = None) -> None:
        assert self._emulator is None, "already inserted"
        self._emulator = Emulator(card or VirtualCard(self.state), port=self.reader.port)
        self._thread = threading.Thread(target=self._emulator.run, daemon=True)
        self._thread.start()
        wait_for(lambda: card_present(self.reader), PRESENCE_TIMEOUT, f"a card in {self.reader}")

    def pull(self) -> None:
        if self._emulator is None or self._thread is None:
            return
        self._emulator.stop()
        self._thread.join(5)
        self._emulator = self._thread = None
        wait_for(lambda: not card_present(self.reader), PRESENCE_TIMEOUT, "the card to go")


@pytest.fixture
def slots(pcscd: PrivatePcscd, tmp_path: Path) -> Iterator[list[CardSlot]]:
    """One empty slot per reader; each test's cards have fresh state files and are pulled after."""
    made = [CardSlot(r, tmp_path / f"card-{i}.state") for i, r in enumerate(pcscd.readers)]
    yield made
    for slot in made:
        with contextlib.suppress(Exception):
            slot.pull()
