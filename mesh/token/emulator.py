"""A virtual card: the applet, its state file, and a TCP link to vsmartcard's vpcd reader driver.

pcscd loads ``libifdvpcd.so`` (Debian package ``vsmartcard-vpcd``) for each
reader entry of its configuration; the driver listens on the entry's
``CHANNELID`` port (and the next one, for a second slot) and the card
connects to it. While connected the reader holds a card; when the connection
closes, the card has been pulled out. Frames both ways are ``uint16 length
(big-endian) || payload``. From the reader, a 1-byte payload is a control
(``00`` power off, ``01`` power on, ``02`` reset, ``04`` get ATR -- answered
with the ATR; the others are not answered), a longer one a command APDU,
answered with the response APDU.

The card's state lives in one file (:mod:`mesh.token.cardstate`), written
atomically by the applet's ``persist`` callback; a missing file is a blank
card. This module is the thin, blocking adapter; all decisions are the
applet's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from mesh.files import FileTooLarge, read_bounded, write_atomic
from mesh.token.applet import Applet
from mesh.token.cardstate import MAX_CARD_STATE_SIZE, CardState
from mesh.token.errors import TokenCorrupt, TokenError

__all__ = [
    "VPCD_DEFAULT_PORT",
    "Emulator",
    "FrameDecoder",
    "VirtualCard",
    "encode_frame",
]

log = logging.getLogger("snrmesh.card")

VPCD_DEFAULT_PORT = 0x8C7B  # Debian's /etc/reader.conf.d/vpcd: "Virtual PCD", slots 35963, 35964
LENGTH_SIZE = 2
MAX_FRAME = 0xFFFF
CTRL_POWER_OFF = 0x00
CTRL_POWER_ON = 0x01
CTRL_RESET = 0x02
CTRL_GET_ATR = 0x04
POLL = 0.2  # seconds between checks of the stop flag while waiting on the socket
RETRY = 0.5  # seconds between connection attempts while the reader is not there
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)  # Linux


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError("vpcd frame too large")
    return len(payload).to_bytes(LENGTH_SIZE, "big") + payload


class FrameDecoder:
    """Splits the byte stream from vpcd into frames (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= LENGTH_SIZE:
            size = int.from_bytes(self._buffer[:LENGTH_SIZE], "big")
            if len(self._buffer) < LENGTH_SIZE + size:
                break
            frames.append(bytes(self._buffer[LENGTH_SIZE : LENGTH_SIZE + size]))
            del self._buffer[: LENGTH_SIZE + size]
        return frames


class VirtualCard:
    """The applet and the file its state lives in."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.applet = Applet(self._load(), persist=self._persist)

    def _load(self) -> CardState:
        try:
            raw = read_bounded(self.path, MAX_CARD_STATE_SIZE, what="card state")
        except FileNotFoundError:
            return CardState()
        except OSError as exc:
            raise TokenError(f"cannot read card state {self.path}: {exc.strerror}") from None
        except FileTooLarge as exc:
            raise TokenCorrupt(str(exc)) from None
        return CardState.decode(raw)

    def _persist(self, data: bytes) -> None:
        write_atomic(self.path, data)

    def handle(self, payload: bytes) -> bytes | None:
        """One frame from the reader -> the frame payload to answer, if any."""
        if len(payload) != 1:
            return self.applet.process(payload)
        control = payload[0]
        if control == CTRL_GET_ATR:
            return self.applet.atr
        if control in (CTRL_POWER_OFF, CTRL_POWER_ON, CTRL_RESET):
            self.applet.reset()
        else:
            log.warning("vpcd sent an unknown control byte %02x", control)
        return None


class Emulator:
    """Keeps a :class:`VirtualCard` inserted in a vpcd reader until :meth:`stop`.

    ``run`` blocks: it connects (retrying while pcscd is not there yet),
    serves frames, and connects again if pcscd drops the link. ``stop`` may be
    called from any thread or a signal handler; the reader then sees the card
    pulled out.
    """

    def __init__(
        self,
        card: VirtualCard,
        host: str = "127.0.0.1",
        port: int = VPCD_DEFAULT_PORT,
        *,
        on_change: Callable[[bool], None] = lambda inserted: None,
    ) -> None:
        self.card = card
        self.address = (host, port)
        self._on_change = on_change
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        waiting = False  # said once per wait: it went on silently, as if it were plugged in
        while not self._stop.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=RETRY)
            except OSError as exc:
                if not waiting:
                    log.info(
                        "no vpcd reader at %s:%d yet (%s; is pcscd running, with "
                        "vsmartcard-vpcd?): trying again every %g s",
                        *self.address,
                        exc.strerror or exc,
                        RETRY,
                    )
                    waiting = True
                self._stop.wait(RETRY)
                continue
            waiting = False
            self._on_change(True)
            try:
                self._serve(sock)
            except OSError as exc:
                log.info("vpcd link lost: %s", exc)
            finally:
                sock.close()
                self.card.applet.reset()
                self._on_change(False)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(POLL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        decoder = FrameDecoder()
        while not self._stop.is_set():
            # vpcd writes a frame's length and payload separately; an immediate ACK keeps its
            # Nagle algorithm from holding the payload for our delayed ACK (40 ms per command).
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            try:
                data = sock.recv(MAX_FRAME)
            except TimeoutError:
                continue
            if not data:
                return  # pcscd closed the link (it stopped, or the reader was removed)
            for frame in decoder.feed(data):
                answer = self.card.handle(frame)
                if answer is not None:
                    sock.sendall(encode_frame(answer))
