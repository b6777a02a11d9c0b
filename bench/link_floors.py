"""What an AS link must cost before any of the AS's own code runs: three floors, measured.

``bench/auth_server.py`` runs these in the same run as its sustained figures, so
the owner of the 1,200 keysets/s goal can see how much of the CPU a link spends
is the construction itself and how much is the protocol code around it:

* **handshake**: Noise_NNpsk0_25519_ChaChaPoly_SHA256 (``mesh.crypto.noise``,
  the spec's HandshakeState) both sides in memory, message 1, message 2 and one
  transport message each way of the link's sizes -- no framing, state machine,
  validation or token;
* **I/O**: TCP connections on loopback, on the AS's event loop, in as many
  server and client processes as the sustained run: each connection carries
  the link's six flights (three round trips, the link's byte counts) and
  closes -- a server that only echoes, a client that only counts;
* **store**: the AS store's own ``load`` (the HELLO's key lookup) and ``issue``
  (the durable write: key-state stamp, CK minted with its two JWE copies,
  audit row; a sync every 64 commits, as group commits do) on the bench's desk,
  one core.

Each is CPU time per link (user + system, every process involved).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from pathlib import Path
from typing import Any

from mesh.crypto import random_bytes
from mesh.crypto.noise import HandshakeState, NoiseProtocol
from provisioning.authserver import eventloop
from provisioning.authserver.meters import meter_identity
from provisioning.authserver.store import SqliteKeyStateStore

__all__ = ["handshake_floor", "io_floor", "store_floor"]

# one link's flights, measured on an in-memory link (HELLO, START, message 1, message 2 +
# CHALLENGE, confirmation + ANSWER + REQUEST, READY + KEYSET)
UP = (51, 75, 161)
DOWN = (26, 121, 1081)
NOISE = NoiseProtocol.from_name("Noise_NNpsk0_25519_ChaChaPoly_SHA256")


def handshake_floor(seconds: float = 1.0) -> float:
    """ms of CPU per link for the bare NNpsk0 handshake and two records, both sides."""
    psk, prologue = random_bytes(32), b"snrmesh as link floor"
    challenge, request, answer = bytes(93), bytes(113), bytes(1033)
    n, cpu0 = 0, time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        client = HandshakeState(NOISE, initiator=True, prologue=prologue, psks=[psk])
        server = HandshakeState(NOISE, initiator=False, prologue=prologue, psks=[psk])
        server.read_message(client.write_message(b""))
        client.read_message(server.write_message(challenge))
        assert client.cipher_states is not None and server.cipher_states is not None
        up, down = client.cipher_states
        server.cipher_states[0].decrypt_with_ad(b"", up.encrypt_with_ad(b"", request))
        down.decrypt_with_ad(b"", server.cipher_states[1].encrypt_with_ad(b"", answer))
        n += 1
    return (time.process_time() - cpu0) * 1000 / n


class _Echo(asyncio.Protocol):
    """The server's side: one flight back per flight received, then the client closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: Any = transport
        self._flight = 0

    def data_received(self, data: bytes) -> None:
        if self._flight < len(DOWN):
            self._transport.write(bytes(DOWN[self._flight]))
            self._flight += 1


class _Counter(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self._done = done
        self._flight = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: Any = transport
        transport.write(bytes(UP[0]))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._flight += 1
        if self._flight < len(UP):
            self._transport.write(bytes(UP[self._flight]))
        else:
            self._transport.close()
            if not self._done.done():
                self._done.set_result(None)


def _echo_server(sock: socket.socket, stop: Any, cpu: Any) -> None:
    """Serve until ``stop`` is set, then report this process's CPU seconds on ``cpu``."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Echo, sock=sock, backlog=4096)
        await loop.run_in_executor(None, stop.wait)
        server.close()

    cpu0 = time.process_time()
    eventloop.run(main())
    cpu.put(time.process_time() - cpu0)


def _clients(port: int, loops: int, seconds: float) -> tuple[int, float]:
    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        count, cpu0 = 0, time.process_time()
        deadline = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                done: asyncio.Future[None] = loop.create_future()
                await loop.create_connection(lambda d=done: _Counter(d), "127.0.0.1", port)
                await done
                count += 1

        await asyncio.gather(*(one() for _ in range(loops)))
        return count, time.process_time() - cpu0

    return eventloop.run(main())


def io_floor(workers: int, procs: int, loops: int, seconds: float = 3.0) -> float:
    """ms of CPU per connection, both sides, for a link's flights on loopback and nothing else."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    stop, cpu = fork.Event(), fork.Queue()
    servers = [fork.Process(target=_echo_server, args=(sock, stop, cpu)) for _ in range(workers)]
    for server in servers:
        server.start()
    try:
        with fork.Pool(procs) as pool:
            results = pool.starmap(_clients, [(port, max(1, loops // procs), seconds)] * procs)
    finally:
        stop.set()
        server_s = sum(cpu.get(timeout=30) for _ in servers)
        for server in servers:
            server.join()
        sock.close()
    links = sum(r[0] for r in results)
    return (server_s + sum(r[1] for r in results)) * 1000 / max(1, links)


def store_floor(
    desk: Path, passphrase: str, head_end: str, meters: int, first: int, links: int = 4000
) -> float:
    """ms of CPU per link for the store's lookup and durable issuance alone, one core.

    ``first``: where in the fleet its meters start, past those the runs before
    asked, so that it mints first keysets as they did.
    """
    store = SqliteKeyStateStore.open(desk, passphrase)
    try:
        store.group_commits()
        now = int(time.time())
        positions = ((first + k) * 7919 % meters for k in range(links))
        identities = [meter_identity("meter", 1 + p) for p in positions]
        cpu0 = time.process_time()
        for identity in identities:
            store.load(identity)
            store.issue(identity, head_end, "bench", None, now)
            if store.commits - store.synced >= 64:
                store.sync(store.commits)
        store.sync(store.commits)
        return (time.process_time() - cpu0) * 1000 / links
    finally:
        store.close()
