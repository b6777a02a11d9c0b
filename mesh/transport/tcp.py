"""A link: one TCP connection carrying one stream session (a thin pump, aioquic-style).

The session logic is :class:`mesh.protocol.Connection`; this adapter only
moves bytes between it and an asyncio stream, drives its timer, and hands its
events to the owner (the agent). One refused byte ends a stream session
(``docs/protocol.md``), so any :class:`RemoteProtocolError` closes the link.

Before the session, the accepting side sends a short **preamble**: ``SNRM``,
a version byte and its 20-character discovery tag for the current epoch (the
same tag it advertises over mDNS). A dialer that only knows an address
(``--peer HOST:PORT``) maps the tag to a dialogue mate, which tells it which CK
to use; an outsider learns nothing it could not hear on the LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from mesh.discovery import TAG_LENGTH
from mesh.protocol import Connection, ProtocolError, RemoteProtocolError, Role
from mesh.protocol.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    FrameRejected,
    HandshakeCompleted,
    HandshakeRefused,
)

__all__ = ["PREAMBLE_SIZE", "Link", "LinkOwner", "read_preamble", "write_preamble"]

log = logging.getLogger("snrmesh.link")

PREAMBLE_MAGIC = b"SNRM\x01"
PREAMBLE_SIZE = len(PREAMBLE_MAGIC) + TAG_LENGTH
READ_SIZE = 64 * 1024
HIGH_WATER = 1 << 20  # bytes buffered for the socket before we wait for it


class LinkOwner(Protocol):
    def link_up(self, link: Link, event: HandshakeCompleted) -> None: ...
    def link_data(self, link: Link, data: list[bytes]) -> None: ...
    def link_refused(self, link: Link, event: HandshakeRefused | FrameRejected) -> None: ...
    def link_closed(self, link: Link, event: ConnectionTerminated | None) -> None: ...


def write_preamble(writer: asyncio.StreamWriter, tag: str) -> None:
    writer.write(PREAMBLE_MAGIC + tag.encode("ascii")[:TAG_LENGTH].ljust(TAG_LENGTH, b"-"))


async def read_preamble(reader: asyncio.StreamReader, timeout: float) -> str | None:
    """The accepting side's tag, or None if what came is not a snrmesh preamble."""
    try:
        data = await asyncio.wait_for(reader.readexactly(PREAMBLE_SIZE), timeout)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return None
    if not data.startswith(PREAMBLE_MAGIC):
        return None
    try:
        return data[len(PREAMBLE_MAGIC) :].decode("ascii")
    except UnicodeDecodeError:
        return None


class Link:
    """Pumps one asyncio stream through one :class:`Connection`."""

    def __init__(
        self,
        connection: Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        owner: LinkOwner,
        address: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection = connection
        self.address = address
        self.established = False
        self.last_activity = clock()  # last byte read or written
        self.last_heard = self.last_activity  # last byte read
        self._reader = reader
        self._writer = writer
        self._owner = owner
        self._clock = clock
        self._closed = False
        self._flush_soon = False

    @property
    def peer(self) -> str | None:
        return self.connection.peer

    @property
    def dialled(self) -> bool:
        return self.connection.role is Role.INITIATOR

    def send(self, data: bytes) -> None:
        """Send one record (1 to 16 KiB); raises ``LocalProtocolError`` if the session is gone.

        The bytes reach the socket at the end of the current event-loop turn,
        so a burst of records costs one write.
        """
        self.connection.send_data(data, self._clock())
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def close(self) -> None:
        if not self._closed:
            with contextlib.suppress(ProtocolError):
                self.connection.close(self._clock())
            self._flush()
            self._finish(None)

    def _flush(self) -> None:
        self._flush_soon = False
        data = self.connection.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)
            self.last_activity = self._clock()

    def _dispatch(self) -> None:
        batch: list[bytes] = []
        while (event := self.connection.next_event()) is not None:
            batch = self._event(event, batch)
        if batch:
            self._owner.link_data(self, batch)

    def _event(self, event: Event, batch: list[bytes]) -> list[bytes]:
        if isinstance(event, DataReceived):
            batch.append(event.data)
            return batch
        if batch:  # keep order: deliver data received before this event first
            self._owner.link_data(self, batch)
            batch = []
        if isinstance(event, HandshakeCompleted):
            if not self.established:
                self.established = True
                self._owner.link_up(self, event)
        elif isinstance(event, HandshakeRefused | FrameRejected):
            self._owner.link_refused(self, event)
        elif isinstance(event, ConnectionTerminated):
            self._finish(event)
        return batch

    def _finish(self, event: ConnectionTerminated | None) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._writer.close()
        self._owner.link_closed(self, event)

    async def run(self) -> None:
        """Pump until the session ends or the socket closes."""
        try:
            self._flush()
            while not self._closed:
                timer = self.connection.get_timer()
                timeout = None if timer is None else max(0.0, timer - self._clock())
                try:
                    data = await asyncio.wait_for(self._reader.read(READ_SIZE), timeout)
                except TimeoutError:
                    self.connection.handle_timer(self._clock())
                    self._flush()
                    self._dispatch()
                    continue
                if not data:
                    break
                now = self._clock()
                self.last_activity = self.last_heard = now
                try:
                    self.connection.receive_data(data, now)
                except RemoteProtocolError as exc:
                    log.info("link %s: refused by protocol (%s)", self.address, exc)
                self._flush()
                self._dispatch()
                if self._writer.transport.get_write_buffer_size() > HIGH_WATER:
                    await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            log.info("link %s: %s", self.address, exc)
        finally:
            self._dispatch()
            self._finish(None)
