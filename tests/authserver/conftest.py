"""A desk with a squad, a UAV and a small meter fleet, built once and copied per test.

Desk ``grid`` (30 days, 1-day epochs). Nodes with software tokens: gs-1
(ground-station), alpha-1 and alpha-2 (soldiers), uav-1 (uav). Group
``squad`` = gs-1, alpha-1; pairs gs-1/uav-1 and gs-1/alpha-2 (so alpha-1 and
uav-1 are *not* mates). 20 meters (``meter-0000001``...) from a fixed factory
seed, each paired with gs-1.

The ``store`` fixture runs each test twice: on the desk's SQLite file and on a
PostgreSQL database imported from it (``as import-desk``), cloned per test from
a template on a private server (``pgserver.py``); the PostgreSQL run skips, with
the reason, where no PostgreSQL can run.

``pair`` drives a :class:`ClientSession` against a :class:`ServerSession` in
memory (``transfer``), with an optional hook to drop or alter bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from mesh.crypto import random_bytes
from mesh.token import SecureElement
from mesh.token.software import SoftwareToken
from provisioning.authserver.cookies import AdmissionConfig
from provisioning.authserver.desk_import import import_desk
from provisioning.authserver.keystate import KeyPolicy
from provisioning.authserver.messages import BundleRequest, KeysetRequest
from provisioning.authserver.meters import import_meters
from provisioning.authserver.postgres import PostgresKeyStateStore
from provisioning.authserver.protocol import AuthService, ClientEvent, ClientSession, ServerSession
from provisioning.authserver.store import KeyStateStore, SqliteKeyStateStore, SqlKeyStateStore
from provisioning.desk import Desk
from provisioning.store import Store
from tests.authserver.pgserver import PostgresServer, unavailable_reason

PASSPHRASE = "correct horse battery"
PIN = "1357"
SEED = bytes(range(32))
METERS = 20
NODES = {"gs-1": "ground-station", "alpha-1": "soldier", "alpha-2": "soldier", "uav-1": "uav"}
NOW = int(time.time())
T = TypeVar("T")


@dataclass(frozen=True)
class Site:
    root: Path

    @property
    def desk_dir(self) -> Path:
        return self.root / "desk"

    def token(self, node: str) -> SoftwareToken:
        token = SoftwareToken(self.root / f"{node}.token")
        token.verify_pin(PIN)
        return token

    def open(self) -> Desk:
        return Desk.open(self.desk_dir, passphrase=PASSPHRASE)


def cli_env() -> dict[str, str]:
    """The environment of a ``snrmesh`` subprocess: the site's passphrase and PIN."""
    return {**os.environ, "SNRMESH_DESK_PASSPHRASE": PASSPHRASE, "SNRMESH_PIN": PIN}


@dataclass
class ServedCli:
    """A running ``snrmesh as serve``; its exit status and output once the block is left."""

    address: str  # HOST:PORT it listens on
    returncode: int | None = None
    out: str = ""
    err: str = ""


@contextlib.contextmanager
def as_serve(*args: str, files: int | None = None) -> Iterator[ServedCli]:
    """``snrmesh as serve ARGS --listen 127.0.0.1:0``, stopped by SIGTERM when the block ends.

    ``files``: the server's descriptor limit (soft and hard), if not this process's.
    """

    def limit() -> None:
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    server = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "as", "serve", *args, "--listen", "127.0.0.1:0"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )
    served = ServedCli("")
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening on" in line, server.stderr.read() if server.stderr else ""
        served.address = line.split()[4]
        yield served
    finally:
        server.send_signal(signal.SIGTERM)
        served.out, served.err = server.communicate(timeout=30)
        served.returncode = server.returncode


@pytest.fixture(scope="session")
def site_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("as-site")
    desk = Desk.init(
        root / "desk",
        passphrase=PASSPHRASE,
        name="grid",
        start=NOW - 60,
        end=NOW + 30 * 86400,
        epoch_seconds=86400,
        now=NOW,
    )
    with desk:
        for node, role in NODES.items():
            desk.enrol(node, role, token_path=root / f"{node}.token", pin=PIN, now=NOW)
        desk.group("squad", ["gs-1", "alpha-1"], now=NOW)
        desk.pair("gs-1", "uav-1", now=NOW)
        desk.pair("gs-1", "alpha-2", now=NOW)
        import_meters(desk.store, seed=SEED, count=METERS, now=NOW, head_end="gs-1")
    return root


@pytest.fixture
def site(site_template: Path, tmp_path: Path) -> Site:
    root = tmp_path / "site"
    shutil.copytree(site_template, root)
    return Site(root)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the session (skips with the reason if none can run)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_template(
    postgres: PostgresServer, site_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A database holding ``site_template``'s desk, cloned per test (CREATE ... TEMPLATE).

    Imported from a copy: an import marks its desk (whose export then refuses), and the
    ``site`` fixture's files are copies of the template's.
    """
    dsn = postgres.create_database("as_site")
    copy = tmp_path_factory.mktemp("imported") / "desk"
    shutil.copytree(site_template / "desk", copy)
    with contextlib.closing(Store.open(copy, PASSPHRASE)) as desk_store:
        import_desk(desk_store, dsn, now=NOW, source="site")
    return "as_site"


_databases = itertools.count()


@pytest.fixture
def postgres_dsn(request: pytest.FixtureRequest) -> str:
    """A fresh copy of the site's database; the ``site`` fixture's files match it."""
    postgres: PostgresServer = request.getfixturevalue("postgres")
    template: str = request.getfixturevalue("postgres_template")
    return postgres.create_database(f"as_test_{next(_databases)}", template=template)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, site: Site) -> Iterator[SqlKeyStateStore]:
    opened: SqlKeyStateStore
    if request.param == "sqlite":
        opened = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    else:
        opened = PostgresKeyStateStore.open(request.getfixturevalue("postgres_dsn"), PASSPHRASE)
    yield opened
    opened.close()


def in_threads(count: int, one: Callable[[int], T]) -> list[T]:
    """``one(i)`` for i in range(count), each in a thread of its own; their results in order.

    Any exception a call raised fails the caller's test, listed with the others.
    """
    results: list[T | BaseException] = [RuntimeError("not run")] * count

    def run(i: int) -> None:
        try:
            results[i] = one(i)
        except BaseException as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results  # type: ignore[return-value]


def make_service(
    store: KeyStateStore, *, key_lifetime: float = 0.0, **admission: float
) -> AuthService:
    return AuthService.create(
        store,
        now=NOW,
        policy=KeyPolicy(key_lifetime=key_lifetime),
        admission=AdmissionConfig(**admission),  # type: ignore[arg-type]
    )


def request(target: str, *, epoch: int | None = None, rid: bytes | None = None) -> KeysetRequest:
    return KeysetRequest(rid or random_bytes(16), target, "test", epoch)


Hook = Callable[[str, bytes], bytes | None]  # (direction, bytes) -> bytes to deliver (None: drop)


def transfer(
    client: ClientSession, server: ServerSession, *, now: float = NOW, hook: Hook | None = None
) -> list[ClientEvent]:
    """Move bytes both ways until both sides are quiet; return the client's events."""
    for _ in range(50):
        up = client.data_to_send()
        if up and hook is not None:
            up = hook("up", up) or b""
        if up:
            server.receive_data(up, now)
        down = server.data_to_send()
        if down and hook is not None:
            down = hook("down", down) or b""
        if down:
            client.receive_data(down, now)
        if not up and not down:
            break
    if server.closed and not client.finished:
        client.connection_lost()
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    return events


def run(
    service: AuthService,
    token: SecureElement,
    requests: Sequence[KeysetRequest | BundleRequest] | None = None,
    *,
    source: str = "127.0.0.1",
    now: float = NOW,
    hook: Hook | None = None,
) -> list[ClientEvent]:
    client = ClientSession(token, requests or [])
    return transfer(client, service.session(source, now), now=now, hook=hook)
