"""The responder side of many peers: one :class:`Connection` per source.

A listener bounds what strangers can make a node hold: at most
``max_half_open`` connections without a confirmed session (START or
AWAIT_CONFIRM) and ``max_connections`` in all; a connection that did not
complete its handshake within ``handshake_timeout`` of being created is
closed; ticket unwraps share one per-source :class:`RateLimiter`. At a bound,
the oldest connection that has received nothing yet (START: on a stream, a
socket that never spoke) is closed to make room once it has sat silent for
``SILENT_GRACE``, since a peer sends its message 1 as soon as it is connected:
what goes is what sat silent longest, and a flood of silent connections cannot
keep peers out, nor push out a peer whose message 1 is on its way. Otherwise
the new connection is refused (``HALF_OPEN_LIMIT``).

Sources are whatever the transport adapter uses to tell peers apart (an
address tuple, a relayed mate's identity); they are opaque here, unless
``source_is_peer``: then a source *is* the identity its frames claim to come
from, and a connection for it takes a CK with that peer only. Refusals made
before any connection exists are logged as ``(source, HandshakeRefused)``
events on the listener.

A **restarted peer**: on datagrams a source can stay the same across a peer's
restart (a relayed mate, a fixed UDP port), so its new session's message 1
(INIT, not the REKEY_INIT of a rekey) meets our live session with its old
self. Once that message 1 authenticated and was fresh (above the CK's
high-water mark), and under a CK with the live session's peer (a source that
another mate of ours now holds gets nothing), it gets a *candidate* connection
beside the live one, and the
candidate replaces the live session only when the peer confirms its keys (a
record under them): a message 1 alone never authenticates a peer
(``docs/protocol.md``, key confirmation), so it does not end a session either.
An unconfirmed candidate times out; a forged, replayed or refused message 1
changes nothing and is not answered (the REFUSE would reach the live peer).
While a candidate waits, each record from its source is tried under the
candidate's keys first (one failed AEAD); only the CK's holder can make one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from contextlib import suppress

from mesh.protocol.config import Role, SessionConfig, Transport
from mesh.protocol.connection import Connection
from mesh.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from mesh.protocol.events import HandshakeRefused
from mesh.protocol.frames import FrameType, starts_session
from mesh.protocol.keysets import KeysetLookup
from mesh.protocol.ratelimit import RateLimiter
from mesh.protocol.state import CARRYING, TERMINAL, State

__all__ = ["DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_HALF_OPEN", "Listener"]

DEFAULT_MAX_HALF_OPEN = 64
DEFAULT_MAX_CONNECTIONS = 1024
_HALF_OPEN = (State.START, State.AWAIT_CONFIRM)
SILENT_GRACE = 1.0  # seconds a new connection may stay silent before a newer one takes its place


class Listener:
    """Creates responder connections on demand, within fixed bounds."""

    __slots__ = (
        "_born",
        "_candidates",
        "_config",
        "_connections",
        "_events",
        "_keys",
        "_limiter",
        "_max_connections",
        "_max_half_open",
        "_source_is_peer",
    )

    def __init__(
        self,
        *,
        config: SessionConfig,
        keys: KeysetLookup,
        max_half_open: int = DEFAULT_MAX_HALF_OPEN,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ticket_limiter: RateLimiter | None = None,
        source_is_peer: bool = False,
    ) -> None:
        if not 0 < max_half_open <= max_connections:
            raise LocalProtocolError("need 0 < max_half_open <= max_connections")
        self._config = config
        self._keys = keys
        self._max_half_open = max_half_open
        self._max_connections = max_connections
        self._source_is_peer = source_is_peer
        self._limiter = ticket_limiter if ticket_limiter is not None else RateLimiter()
        self._connections: dict[Hashable, Connection] = {}
        self._born: dict[Hashable, float] = {}
        self._candidates: dict[Hashable, Connection] = {}  # a restarted peer's, unconfirmed
        self._events: deque[tuple[Hashable, HandshakeRefused]] = deque()

    def connection(self, source: Hashable) -> Connection | None:
        return self._connections.get(source)

    def half_open(self) -> int:
        half_open = sum(c.state in _HALF_OPEN for c in self._connections.values())
        return half_open + len(self._candidates)

    def accept(self, source: Hashable, now: float) -> Connection | None:
        """A new responder connection for ``source``, or None (logged) when over a bound."""
        self._prune()
        full = self.half_open() >= self._max_half_open or len(self._connections) >= (
            self._max_connections
        )
        if full and not self._drop_oldest_silent(now):
            self._events.append((source, HandshakeRefused(Reason.HALF_OPEN_LIMIT)))
            return None
        expected: str | None = None
        if self._source_is_peer:
            if not isinstance(source, str):
                raise LocalProtocolError("with source_is_peer, a source is an identity")
            expected = source
        connection = self._new_connection(source, expected)
        self._connections[source] = connection
        self._born[source] = now
        return connection

    def _drop_oldest_silent(self, now: float) -> bool:
        """Close the oldest connection still in START, if it was silent for SILENT_GRACE
        (logged as HALF_OPEN_LIMIT); whether one was.

        Sources are kept in the order they were accepted, so the first one in
        START is the oldest.
        """
        for source, connection in self._connections.items():
            if connection.state is State.START:
                if now - self._born[source] < SILENT_GRACE:
                    return False
                connection.close(now)
                self._events.append((source, HandshakeRefused(Reason.HALF_OPEN_LIMIT)))
                self._prune()
                return True
        return False

    def _new_connection(self, source: Hashable, expected_peer: str | None) -> Connection:
        return Connection(
            config=self._config,
            keys=self._keys,
            role=Role.RESPONDER,
            ticket_limiter=self._limiter,
            source=source,
            expected_peer=expected_peer,
        )

    def datagram_received(self, data: bytes, source: Hashable, now: float) -> Connection | None:
        """Route a datagram; returns the connection that took it (to pull its output), if any.

        A datagram from an unknown source must be a message 1. Never raises on
        the peer's behalf: a refused first message leaves the connection in
        ERROR with its REFUSE frame to send. Pull a returned connection's output
        and events at once: finished connections are forgotten the next time the
        listener accepts one or handles its timer.
        """
        if self._config.transport is not Transport.DATAGRAM:
            raise LocalProtocolError("this listener serves streams: use accept()")
        connection = self._connections.get(source)
        if connection is not None and connection.state in TERMINAL:
            self._prune()  # (a restarted peer's candidate, if any, takes its place)
            connection = self._connections.get(source)
        new_session = starts_session(data)
        if connection is None or connection.state in TERMINAL:
            if not new_session:
                self._events.append((source, HandshakeRefused(Reason.UNEXPECTED_FRAME)))
                return None
            connection = self.accept(source, now)
            if connection is None:
                return None
        elif connection.state in CARRYING:
            if new_session:
                return self._restarted(source, connection, data, now)
            candidate = self._candidates.get(source)
            if (
                candidate is not None
                and data[0] & FrameType.RECORD
                and self._confirms(source, candidate, data, now)
            ):
                return candidate
        with suppress(RemoteProtocolError):  # logged on the connection, its REFUSE still to send
            connection.datagram_received(data, now)
        return connection

    def _restarted(
        self, source: Hashable, live: Connection, data: bytes, now: float
    ) -> Connection | None:
        """A new session's message 1 from a source whose session is live (module docstring).

        Returns the candidate that answered it (its message 2 to send), or None.
        """
        candidate = self._candidates.get(source)
        if candidate is None or candidate.state in TERMINAL:
            self._prune()
            if self.half_open() >= self._max_half_open:
                self._events.append((source, HandshakeRefused(Reason.HALF_OPEN_LIMIT)))
                return None
            candidate = self._new_connection(source, live.peer)
        with suppress(RemoteProtocolError):
            candidate.datagram_received(data, now)
        if candidate.state is not State.AWAIT_CONFIRM:  # refused: its REFUSE is not sent
            while (event := candidate.next_event()) is not None:
                if isinstance(event, HandshakeRefused):
                    self._events.append((source, event))
            self._candidates.pop(source, None)
            return None
        self._candidates[source] = candidate
        return candidate

    def _confirms(self, source: Hashable, candidate: Connection, data: bytes, now: float) -> bool:
        """Is this record the candidate's key confirmation? If so it takes the live one's place."""
        with suppress(RemoteProtocolError):
            candidate.datagram_received(data, now)
        if candidate.state is State.ESTABLISHED:
            del self._candidates[source]
            self._connections[source] = candidate  # the live one goes, with its keys
            self._born[source] = now
            return True
        while candidate.next_event() is not None:  # only this record's rejection: not its keys
            pass
        return False

    def next_event(self) -> tuple[Hashable, HandshakeRefused] | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        times = [
            t
            for source, c in self._connections.items()
            if (t := self._deadline(source, c)) is not None
        ]
        times += [t for c in self._candidates.values() if (t := c.get_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for source, connection in list(self._connections.items()):
            deadline = self._deadline(source, connection)
            if deadline is not None and now >= deadline:
                if connection.state is State.START:
                    connection.close(now)
                else:
                    connection.handle_timer(now)
        for candidate in self._candidates.values():  # unconfirmed: its handshake deadline
            deadline = candidate.get_timer()
            if deadline is not None and now >= deadline:
                candidate.handle_timer(now)
        self._prune()

    def _deadline(self, source: Hashable, connection: Connection) -> float | None:
        if connection.state is State.START:
            return self._born[source] + self._config.handshake_timeout
        return connection.get_timer()

    def _prune(self) -> None:
        for source in [s for s, c in self._connections.items() if c.state in TERMINAL]:
            candidate = self._candidates.pop(source, None)
            if candidate is not None and candidate.state not in TERMINAL:
                self._connections[source] = candidate  # what it would have replaced is gone
                continue
            del self._connections[source]
            del self._born[source]
        for source in [s for s, c in self._candidates.items() if c.state in TERMINAL]:
            del self._candidates[source]
