"""``snrmesh as serve``: the asyncio adapter around :class:`ServerSession` (a thin pump).

Each accepted connection gets one :class:`ServerSession`; this module only
moves bytes between it and the socket, drives its timer and closes the socket
when the session ends. Several worker processes share the port
(``SO_REUSEPORT``), each with its own store connection and caches; the store's
row locks keep them consistent.

Group commit: a store that can (SQLite) commits without waiting for the disk,
and no session's bytes are written to its socket before a sync made every
commit so far durable (:class:`GroupCommit`). So an answer still never
precedes the durable commit it reports, while one ``fsync`` covers all the
requests a worker served meanwhile -- and, run in a thread, it no longer
stalls the worker's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from provisioning.authserver.errors import AuthServerError
from provisioning.authserver.protocol import AuthService, ServerSession
from provisioning.authserver.store import KeyStateStore

__all__ = ["IDLE_TIMEOUT", "AuthServer", "GroupCommit", "serve_forever"]

log = logging.getLogger("snrmesh.as")

READ_SIZE = 16 * 1024
IDLE_TIMEOUT = 10.0
BACKLOG = 4096


class GroupCommit:
    """One sync of the store at a time, shared by every session waiting for it (loop-only).

    A session that has bytes to send waits for :meth:`durable`: the commits made
    so far (its own among them) must be covered by a sync. The first waiter
    starts one, after letting the rest of this loop iteration's sessions join
    it; commits made while it runs wait for the next one.
    """

    def __init__(self, store: KeyStateStore) -> None:
        self._store = store
        self._running: asyncio.Future[None] | None = None
        self.syncs = 0

    async def durable(self) -> None:
        """Return once every commit made until now is durable; raises if the sync failed."""
        store = self._store
        target = store.commits
        while store.synced < target:
            if self._running is None:
                self._running = asyncio.ensure_future(self._sync())
            await asyncio.shield(self._running)

    async def _sync(self) -> None:
        store = self._store
        try:
            await asyncio.sleep(0)  # the sessions served in this iteration join this sync
            upto = store.commits
            if store.sync_in_thread:
                await asyncio.get_running_loop().run_in_executor(None, store.sync, upto)
            else:
                store.sync(upto)
            self.syncs += 1
        finally:
            self._running = None


class AuthServer:
    """One worker: an asyncio server whose connections each run a :class:`ServerSession`."""

    def __init__(self, service: AuthService, *, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self._clock = clock
        self._server: asyncio.Server | None = None
        service.store.group_commits()  # every answer waits for self.group (see the module doc)
        self.group = GroupCommit(service.store)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._handle, host, port, reuse_port=reuse_port or None, backlog=BACKLOG
        )
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        session = self.service.session(source, self._clock())
        try:
            await self._pump(session, reader, writer)
        except (ConnectionError, OSError) as exc:
            log.debug("AS link %s: %s", source, exc)
        except AuthServerError as exc:  # the sync failed: close without answering
            log.warning("AS store sync failed: %s", exc)
            self.service.count("sync_failed")
            self.service.forget_unsynced()
        finally:
            session.connection_lost()
            with contextlib.suppress(Exception):
                writer.close()

    async def _pump(
        self, session: ServerSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while not session.closed:
            timer = session.get_timer()
            timeout = IDLE_TIMEOUT if timer is None else max(0.0, timer - self._clock())
            try:
                # ``asyncio.timeout``, not ``wait_for``: the latter wraps every read in a new
                # task, a measurable share of a worker's time at a dozen reads per link
                async with asyncio.timeout(min(timeout, IDLE_TIMEOUT)):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                if timer is None:
                    break  # an idle authenticated link
                session.handle_timer(self._clock())
                continue
            if not data:
                break
            session.receive_data(data, self._clock())
            out = session.data_to_send()
            if out:
                await self.group.durable()  # no answer before its commit is durable
                writer.write(out)
                await writer.drain()
        out = session.data_to_send()
        if out:
            await self.group.durable()
            writer.write(out)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()


def _bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket made before forking, so every worker accepts on the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def _run_worker(
    make_service: Callable[[], AuthService], sock: socket.socket, stop: asyncio.Event
) -> AuthService:
    service = make_service()
    server = AuthServer(service)
    server._server = await asyncio.start_server(server._handle, sock=sock)
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
) -> dict[str, int]:
    """Run ``workers`` processes (forked, one shared socket) until SIGTERM/SIGINT.

    Returns the counters of this (parent) worker. The store is opened in each
    worker after the fork (``make_service``), never shared across processes.
    """
    sock = _bound_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    children: list[int] = []
    for _ in range(max(1, workers) - 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                _worker_main(make_service, sock)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    on_ready(bound_host, bound_port)
    try:
        counters = _worker_main(make_service, sock)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return counters


def _worker_main(make_service: Callable[[], AuthService], sock: socket.socket) -> dict[str, int]:
    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        service = await _run_worker(make_service, sock, stop)
        return dict(service.counters)

    return asyncio.run(main())
