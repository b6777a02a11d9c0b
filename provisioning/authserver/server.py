"""``snrmesh as serve``: the asyncio adapter around :class:`ServerSession` (a thin pump).

Each accepted connection gets one :class:`ServerSession`; this module only
moves bytes between it and the socket, drives its timer and closes the socket
when the session ends. Several worker processes share the port
(``SO_REUSEPORT``), each with its own store connection and caches; the store's
row locks keep them consistent.

Group commit: a store that can (SQLite, PostgreSQL) commits without waiting
for the disk, and no session's bytes are written to its socket before a sync
made every commit so far durable (:class:`GroupCommit`). So an answer still
never precedes the durable commit it reports, while one ``fsync`` or WAL flush
covers all the requests a worker served meanwhile (SQLite's runs in a thread,
so the worker's loop keeps serving).

Silent links: a connection costs a file descriptor from its accept on, before
it has sent a byte, and a flood of connections that never send one would run
a worker out of descriptors, so that nobody else gets in. A worker holds at
most ``max_links`` (its descriptor limit, raised to the hard one, less a
reserve); a link over that drops the oldest link that has not yet had a HELLO
admitted, if it has been silent for SILENT_GRACE, else the new link itself.
Clients send their HELLO as soon as they connect, so what gets dropped is
what sat silent longest, and a client whose HELLO is read within the grace is
never dropped for a newer link: not in a burst whose links the loop opens
before it reads any of them (asyncio's), nor under a flood faster than the
table turns over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import cast

from provisioning.authserver import eventloop
from provisioning.authserver.errors import AuthServerError
from provisioning.authserver.protocol import AuthService, ServerSession, ServerState
from provisioning.authserver.store import KeyStateStore

__all__ = [
    "IDLE_TIMEOUT",
    "AuthServer",
    "GroupCommit",
    "bound_socket",
    "link_capacity",
    "raise_file_limit",
    "serve_forever",
]

log = logging.getLogger("snrmesh.as")

IDLE_TIMEOUT = 10.0
DRAIN_TIMEOUT = 30.0  # what a stopping worker gives the sync in progress
BACKLOG = 4096
FD_RESERVE = 64  # descriptors a worker keeps for its store (and WAL), threads and pipes
SILENT_GRACE = 1.0  # seconds a new link may be silent before a newer one may take its place
MAX_LINKS = 65_536  # links per worker at most, whatever its descriptor limit
FILE_LIMIT_CAP = 1 << 20  # the descriptor limit asked for when the hard one is unlimited


def raise_file_limit() -> int:
    """Raise this process's descriptor limit to its hard limit (inherited by its workers).

    The usual soft limit (1,024) would cap a worker at some 960 links at once.
    Returns the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FILE_LIMIT_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # (a kernel cap below the hard one)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return int(soft)


def link_capacity() -> int:
    """The links a worker can hold at once under its descriptor limit, less the reserve."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_LINKS
    return max(1, min(MAX_LINKS, int(soft) - FD_RESERVE))


class GroupCommit:
    """One sync of the store at a time, shared by every link waiting for it (loop-only).

    A link that has bytes to send hands them over with :meth:`when_durable`:
    they are written once a sync covers the commits made so far (its own among
    them). The first waiter starts a sync, after letting the rest of this loop
    iteration's links join it; commits made while it runs wait for the next.
    """

    def __init__(self, store: KeyStateStore) -> None:
        self._store = store
        self._waiting: list[tuple[int, Callable[[bool], None]]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0

    def when_durable(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(True)`` once every commit made until now is durable, now if it is.

        ``callback(False)`` if the sync failed: nothing may be sent then.
        """
        store = self._store
        if store.synced >= store.commits:
            callback(True)
            return
        self._waiting.append((store.commits, callback))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().call_soon(self._start)  # this iteration's links join

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._sync())

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Wait until no sync runs or is due, at most ``timeout`` s; whether that happened.

        Shutdown needs it: a sync runs in a thread on connections of the store's
        (SQLite's checkpointer, PostgreSQL's sync connection), which closing the
        store mid-sync would pull from under it, failing the links it held. The
        bound keeps a sync stuck on a dead database from blocking the shutdown.
        """
        try:
            async with asyncio.timeout(timeout):
                while self._running:
                    task = self._task
                    if task is None or task.done():
                        await asyncio.sleep(0)  # the next sync is scheduled (_start): let it run
                    else:
                        await asyncio.wait([task])
        except TimeoutError:
            log.warning("AS store sync still running after %g s: closing anyway", timeout)
            return False
        return True

    async def _sync(self) -> None:
        store = self._store
        ok = True
        try:
            upto = store.commits
            if store.sync_in_thread:
                await asyncio.get_running_loop().run_in_executor(None, store.sync, upto)
            else:
                store.sync(upto)
            self.syncs += 1
        except AuthServerError as exc:
            log.warning("AS store sync failed: %s", exc)
            ok = False
        finally:
            self._running = False
        done = [w for w in self._waiting if not ok or w[0] <= store.synced]
        self._waiting = [w for w in self._waiting if ok and w[0] > store.synced]
        for _, callback in done:
            callback(ok)
        if self._waiting and not self._running:
            self._running = True
            asyncio.get_running_loop().call_soon(self._start)


class AuthServer:
    """One worker: an asyncio server whose connections each run a :class:`ServerSession`."""

    def __init__(
        self,
        service: AuthService,
        *,
        clock: Callable[[], float] = time.time,
        max_links: int | None = None,
    ) -> None:
        self.service = service
        self._clock = clock
        self._server: asyncio.Server | None = None
        self.max_links = link_capacity() if max_links is None else max_links
        self.links: set[_LinkProtocol] = set()
        self._silent: dict[_LinkProtocol, float] = {}  # no HELLO admitted yet: since when
        service.store.group_commits()  # every answer waits for self.group (see the module doc)
        self.group = GroupCommit(service.store)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, host, port, reuse_port=reuse_port or None, backlog=BACKLOG
        )
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def serve_on(self, sock: socket.socket) -> None:
        """Accept on an already listening socket (a forked worker's share of the port).

        ``backlog`` again: the event loop listens on the socket anew, with its default of 100
        unless told (asyncio's and uvloop's alike), which undid :func:`bound_socket`'s.
        """
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, sock=sock, backlog=BACKLOG
        )

    async def stop(self) -> None:
        """Stop accepting, then let the sync in progress finish (the store stays open)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.group.drain()

    def _protocol(self) -> _LinkProtocol:
        return _LinkProtocol(self)

    def opened(self, link: _LinkProtocol, now: float) -> None:
        """A new link, silent so far; over ``max_links``, the oldest silent one goes if it
        was silent for SILENT_GRACE, else this one (module doc)."""
        self.links.add(link)
        self._silent[link] = now
        if len(self.links) > self.max_links:
            oldest, since = next(iter(self._silent.items()))  # (this one, if none is older)
            victim = oldest if now - since >= SILENT_GRACE else link
            self.service.count("silent_dropped")
            self.forget(victim)
            victim.drop()

    def admitted(self, link: _LinkProtocol) -> None:
        """Its HELLO was admitted (or it is closing): it is no longer dropped for silence."""
        self._silent.pop(link, None)

    def forget(self, link: _LinkProtocol) -> None:
        self.links.discard(link)
        self._silent.pop(link, None)

    def sync_failed(self) -> None:
        """A group sync failed: what the caches hold may not be durable."""
        self.service.count("sync_failed")
        self.service.forget_unsynced()


class _LinkProtocol(asyncio.Protocol):
    """The pump of one connection: bytes in to its session, its bytes out after the sync.

    An ``asyncio.Protocol`` rather than streams: no reader, writer or future per
    read, and one timer per link instead of one per read: with streams, the
    event loop's bookkeeping was some 40 % of a worker's time per link.
    """

    def __init__(self, server: AuthServer) -> None:
        self._server = server
        self._clock = server._clock
        self._transport: asyncio.Transport | None = None
        self._session: ServerSession | None = None
        self._held: list[bytes] = []  # bytes waiting for the group sync, in order
        self._holding = False
        self._need = 0  # the store's commit count the held bytes wait for
        self._closing = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses)
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        now = self._last = self._clock()
        self._session = self._server.service.session(source, now)
        self._arm(now)
        self._server.opened(self, now)

    def drop(self) -> None:
        """Close at once, sending nothing: a silent link dropped for a newer one."""
        self._closing = True
        self._held.clear()
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        session = self._session
        if session is None or self._closing:
            return
        now = self._last = self._clock()
        session.receive_data(data, now)
        if session.state is not ServerState.AWAIT_HELLO:
            self._server.admitted(self)
        self._send()

    def eof_received(self) -> bool:
        self._end()
        return True  # closed by _end once the held bytes are out

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("AS link: %s", exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._session is not None:
            self._session.connection_lost()
        self._transport = None
        self._held.clear()
        self._server.forget(self)

    # -- output, after the group sync -----------------------------------------------------

    def _send(self) -> None:
        session = self._session
        assert session is not None
        out = session.data_to_send()
        if out:
            self._hold(out)
        if session.closed:
            self._end()

    def _hold(self, out: bytes) -> None:
        """Hold ``out`` until every commit made so far -- those it reports -- is durable.

        Bytes added while an earlier sync runs (a request read after the answer's
        key change) may report a later commit: ``_release`` waits for that too.
        """
        self._held.append(out)
        self._need = self._server.service.store.commits
        if not self._holding:
            self._holding = True
            self._server.group.when_durable(self._release)

    def _release(self, durable: bool) -> None:
        self._holding = False
        transport = self._transport
        if transport is None:
            return
        if not durable:
            self._server.sync_failed()
            self._held.clear()
            transport.abort()  # nothing leaves that the store may not hold
            return
        if self._server.service.store.synced < self._need:  # held more since: its commits
            self._holding = True
            self._server.group.when_durable(self._release)
            return
        transport.write(b"".join(self._held))
        self._held.clear()
        if self._closing:
            transport.close()

    def _end(self) -> None:
        """Close once the held bytes are written (the session ended, or the client left)."""
        self._closing = True
        out = b"" if self._session is None else self._session.data_to_send()
        if out:
            self._hold(out)  # _release closes
        elif not self._holding and self._transport is not None:
            self._transport.close()

    # -- timers: the session's deadline, and the idle timeout ------------------------------

    def _arm(self, now: float) -> None:
        session = self._session
        assert session is not None
        timer = session.get_timer()
        idle_end = self._last + IDLE_TIMEOUT
        at = idle_end if timer is None else min(timer, idle_end)
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        session = self._session
        if session is None or self._transport is None or self._closing:
            return
        now = self._clock()
        timer = session.get_timer()
        if timer is not None and now >= timer:
            session.handle_timer(now)
            self._send()
        elif timer is None and now - self._last >= IDLE_TIMEOUT:
            self._end()  # an idle authenticated link
        if not self._closing and not session.closed:
            self._arm(now)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket made before forking, so every worker accepts on the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:  # unknown host, an address not ours, a port in use
        sock.close()
        reason = exc.strerror or str(exc)
        raise AuthServerError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.setblocking(False)
    return sock


async def _run_worker(
    make_service: Callable[[], AuthService],
    sock: socket.socket,
    stop: asyncio.Event,
    max_links: int | None,
) -> AuthService:
    service = make_service()
    server = AuthServer(service, max_links=max_links)
    await server.serve_on(sock)
    await stop.wait()
    await server.stop()
    service.store.close()
    return service


def serve_forever(
    make_service: Callable[[], AuthService],
    host: str,
    port: int,
    *,
    workers: int = 1,
    on_ready: Callable[[str, int], None] = lambda host, port: None,
    sock: socket.socket | None = None,
    max_links: int | None = None,
) -> dict[str, int]:
    """Run ``workers`` processes (forked, one shared socket) until SIGTERM/SIGINT.

    Returns the counters of this (parent) worker. The store is opened in each
    worker after the fork (``make_service``), never shared across processes.
    ``sock``: a socket from :func:`bound_socket` already (else one is bound here).
    ``max_links``: links per worker at once (default: :func:`link_capacity`).
    """
    sock = sock or bound_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    children: list[int] = []
    for _ in range(max(1, workers) - 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                _worker_main(make_service, sock, max_links)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    on_ready(bound_host, bound_port)
    try:
        counters = _worker_main(make_service, sock, max_links)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return counters


def _worker_main(
    make_service: Callable[[], AuthService], sock: socket.socket, max_links: int | None
) -> dict[str, int]:
    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        service = await _run_worker(make_service, sock, stop, max_links)
        return dict(service.counters)

    return eventloop.run(main())
