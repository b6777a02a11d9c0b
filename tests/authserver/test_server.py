"""The AS over real loopback sockets: the asyncio adapters, the command line, a small fleet."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from mesh.token import Slot
from provisioning.authserver import eventloop
from provisioning.authserver.client import Backoff, request_keysets
from provisioning.authserver.errors import AuthServerError, StoreUnavailable
from provisioning.authserver.meters import meter_identity, meter_token, simulate_fleet
from provisioning.authserver.protocol import ClientSession, Granted
from provisioning.authserver.server import SILENT_GRACE, AuthServer, bound_socket
from provisioning.authserver.store import (
    IssuedKeyset,
    KeyStateStore,
    SqliteKeyStateStore,
    SqlKeyStateStore,
)
from tests.authserver.conftest import (
    NOW,
    PASSPHRASE,
    SEED,
    Site,
    as_serve,
    cli_env,
    make_service,
    request,
)

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on asyncio's own loop or on uvloop (the one ``as serve`` picks)."""
    if loop == "asyncio":
        asyncio.run(main)
        return
    factory = eventloop.loop_factory()
    if factory is None:
        main.close()
        pytest.skip("uvloop is not installed")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def test_the_event_loop_is_uvloop_unless_asked_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV_VARIABLE, raising=False)
    assert eventloop.loop_name() == "uvloop"
    monkeypatch.setenv(eventloop.ENV_VARIABLE, "asyncio")
    assert eventloop.loop_name() == "asyncio"
    assert eventloop.run(asyncio.sleep(0, "done")) == "done"


@LOOPS
def test_asyncio_server_and_client_with_key_change(
    site: Site, store: KeyStateStore, loop: str
) -> None:
    async def main() -> None:
        server = AuthServer(make_service(store))
        host, port = await server.start("127.0.0.1", 0)
        try:
            token = site.token("uav-1")
            outcome = await request_keysets(host, port, token, [request("gs-1")])
            assert outcome.grants and outcome.authenticated is not None
            assert token.info().generation(Slot.AUTH) == 2
            ticks: list[int] = []
            report = await simulate_fleet(
                host,
                port,
                seed=SEED,
                count=10,
                head_end="gs-1",
                storm=True,
                sources=2,
                on_progress=ticks.append,
            )
            assert report["served"] == 10 and report["key_changes"] == 10
            assert ticks == list(range(1, 11))  # one tick per meter done, for the progress bar
            # meters the AS does not know: not served, and what they cost is counted all the same
            unknown = await simulate_fleet(
                host, port, seed=SEED, count=3, head_end="gs-1", first=5000, storm=True
            )
            assert unknown["served"] == 0 and unknown["failed"] == {"auth-failed": 3}
            assert unknown["attempts"] == 3  # refused for good at the first attempt each
        finally:
            await server.stop()

    run_on(loop, main())


@LOOPS
def test_no_answer_before_a_sync_covers_its_commit(
    site: Site, store: KeyStateStore, loop: str
) -> None:
    """Group commit: many requests share one sync (fsync, WAL flush), none is answered before it."""
    issued_at: dict[bytes, int] = {}
    real_issue = store.issue

    def issue(*args: object) -> IssuedKeyset:
        keyset = real_issue(*args)  # type: ignore[arg-type]
        issued_at[keyset.ck_id] = store.commits  # this commit's number
        return keyset

    store.issue = issue  # type: ignore[method-assign]

    async def one(n: int) -> None:
        token = meter_token(SEED, meter_identity("meter", n))
        outcome = await request_keysets(host, port, token, [request("gs-1")])
        (granted,) = outcome.grants
        assert store.synced >= issued_at[granted.grant.ck_id]  # durable before it arrived

    async def main() -> None:
        nonlocal host, port
        server = AuthServer(make_service(store, key_lifetime=1e9))
        host, port = await server.start("127.0.0.1", 0)
        try:
            await asyncio.gather(*(one(n) for n in range(1, 17)))
        finally:
            await server.stop()
        assert len(issued_at) == 16 and 0 < server.group.syncs < store.commits

    host, port = "", 0
    run_on(loop, main())


def test_a_failed_sync_answers_nothing_and_forgets_the_caches(
    site: Site, store: KeyStateStore
) -> None:
    def sync(upto: int) -> None:
        raise StoreUnavailable("disk gone")

    store.sync = sync  # type: ignore[method-assign]
    service = make_service(store, key_lifetime=0.0)  # a key change: a cached message

    async def main() -> None:
        server = AuthServer(service)
        host, port = await server.start("127.0.0.1", 0)
        try:
            token = meter_token(SEED, meter_identity("meter", 1))
            with pytest.raises(AuthServerError):
                await request_keysets(
                    host, port, token, [request("gs-1")], backoff=Backoff(attempts=1)
                )
            assert token.info().generation(Slot.AUTH) == 1  # never saw the key change
        finally:
            await server.stop()

    asyncio.run(main())
    assert service.counters["sync_failed"] >= 1
    assert not service.key_changes


def test_a_silent_connection_is_closed_at_its_deadline(
    site: Site, store: KeyStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provisioning.authserver import server as server_module

    monkeypatch.setattr(server_module, "IDLE_TIMEOUT", 0.05)  # re-check often
    offset = 0.0

    def clock() -> float:
        return NOW + offset

    async def main() -> None:
        nonlocal offset
        server = AuthServer(make_service(store), clock=clock)
        host, port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            await asyncio.sleep(0.2)
            assert not reader.at_eof()  # still within the session's deadline
            offset = 3600.0  # past it: the next check closes the link
            assert await asyncio.wait_for(reader.read(), 2.0) == b""
            writer.close()
        finally:
            await server.stop()
        assert server.service.counters["timeout"] == 1

    asyncio.run(main())


def test_client_backs_off_with_full_jitter_within_bounds() -> None:
    import random

    backoff = Backoff(base=0.5, cap=4.0)
    rng = random.Random(1)
    delays = [backoff.delay(n, rng) for n in range(8) for _ in range(50)]
    assert all(0.0 <= d <= 4.0 for d in delays) and max(delays) > 3.0
    assert all(backoff.delay(0, rng) <= 0.5 for _ in range(50))


def test_a_seed_another_run_made_meanwhile_is_used_not_replaced(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches started at once with one new ``--factory-seed`` path share one seed.

    Both found no file; the second's seed replaced the first's, so the meters the
    first enrolled had keys no remaining file could derive.
    """
    from mesh.cli.main import main
    from provisioning.authserver import cli as as_cli

    seed_file = tmp_path / "fleet.seed"
    theirs = bytes(range(32))  # the other run's, written after this run looked
    real = as_cli.random_bytes

    def meanwhile(n: int) -> bytes:
        if not seed_file.exists():
            seed_file.write_bytes(theirs)
        return real(n)

    monkeypatch.setattr(as_cli, "random_bytes", meanwhile)
    monkeypatch.setenv("SNRMESH_DESK_PASSPHRASE", PASSPHRASE)
    args = ["desk", "import-meters", str(site.desk_dir), "--count", "2", "--first", "500"]
    assert main([*args, "--factory-seed", str(seed_file)]) == 0
    assert seed_file.read_bytes() == theirs
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)
    try:
        record = store.load(meter_identity("meter", 500))
    finally:
        store.close()
    assert record is not None
    assert record.token_id == meter_token(theirs, meter_identity("meter", 500)).token_id


def test_cli_serve_request_import_and_sim(site: Site, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "mesh.cli"]
    seed_file = tmp_path / "fleet.seed"
    done = subprocess.run(
        [
            *cli,
            "desk",
            "import-meters",
            str(site.desk_dir),
            "--count",
            "30",
            "--first",
            "100",
            "--factory-seed",
            str(seed_file),
            "--head-end",
            "gs-1",
            "--json",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imported"] == 30 and seed_file.stat().st_size == 32
    with as_serve("--store", str(site.desk_dir), "--key-lifetime", "0", "--json") as server:
        address = server.address
        got = subprocess.run(
            [
                *cli,
                "as",
                "request",
                "--as",
                address,
                "--token",
                str(site.root / "alpha-1.token"),
                "--target",
                "gs-1",
                "--json",
            ],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr
        answer = json.loads(got.stdout)
        assert answer["peer"] == "gs-1" and answer["key_changed"] and answer["generation"] == 2
        refused = subprocess.run(
            [
                *cli,
                "as",
                "request",
                "--as",
                address,
                "--token",
                str(site.root / "alpha-1.token"),
                "--target",
                "uav-1",
            ],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1 and "policy" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        sim = subprocess.run(
            [
                *cli,
                "meters",
                "sim",
                "--as",
                address,
                "--count",
                "30",
                "--first",
                "100",
                "--factory-seed",
                str(seed_file),
                "--head-end",
                "gs-1",
                "--spread",
                "0.2",
                "--json",
            ],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sim.returncode == 0, sim.stderr
        assert json.loads(sim.stdout)["served"] == 30
        # meters the desk never enrolled: none served, and the command says so and fails
        fleet = ["--factory-seed", str(seed_file), "--head-end", "gs-1", "--storm"]
        unserved = subprocess.run(
            [*cli, "meters", "sim", "--as", address, "--count", "2", "--first", "5000", *fleet],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert unserved.returncode == 1 and "0/2 meters served" in unserved.stdout
        assert "None" not in unserved.stdout  # no latency when none was served
        assert "not served: 2 auth-failed" in unserved.stdout  # the AS knows no such meter
    assert server.returncode == 0, server.err
    assert json.loads(server.out.strip().splitlines()[-1])["keysets"] == 31


@pytest.mark.parametrize("bad", ["nowhere", "host:99999"])
def test_cli_refuses_bad_address_in_one_line(bad: str, site: Site) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "as",
            "request",
            "--as",
            bad,
            "--token",
            str(site.root / "alpha-1.token"),
            "--target",
            "gs-1",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1


def test_sqlite_checkpoints_run_in_the_sync_not_in_a_commit(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grouped commits never checkpoint; the sync does, every CHECKPOINT_EVERY commits.

    Without those checkpoints the WAL would grow with every commit; with them a
    writer starts it over once everything was copied, so it stays as small as
    the commits between two checkpoints.
    """
    from provisioning.authserver import store as store_module

    def largest_wal(every: int) -> int:
        monkeypatch.setattr(store_module, "CHECKPOINT_EVERY", every)
        shutil.rmtree(site.root / "run", ignore_errors=True)
        shutil.copytree(site.desk_dir, site.root / "run")
        store = SqliteKeyStateStore.open(site.root / "run", PASSPHRASE)
        wal = site.root / "run" / "desk.sqlite-wal"
        try:
            assert store.group_commits()
            assert store.store.db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
            largest = 0
            for n in range(300):
                meter = meter_identity("meter", 1 + n % 20)
                store.issue(meter, "gs-1", "test", n % 5, NOW)
                if n % 10 == 9:  # a group sync every ten commits
                    store.sync(store.commits)
                largest = max(largest, wal.stat().st_size)
            return largest
        finally:
            store.close()

    assert largest_wal(20) * 3 < largest_wal(10**9)


@LOOPS
def test_stopping_waits_for_the_sync_in_progress(
    site: Site, store: KeyStateStore, loop: str
) -> None:
    """Shutdown closes the store only after the group sync running in its thread is done."""
    import threading

    started, release = threading.Event(), threading.Event()
    order: list[str] = []
    real_sync = store.sync
    store.sync_in_thread = True  # type: ignore[misc]

    def sync(upto: int) -> None:
        started.set()
        release.wait(10)
        real_sync(upto)
        order.append("synced")

    store.sync = sync  # type: ignore[method-assign]

    async def main() -> None:
        server = AuthServer(make_service(store, key_lifetime=1e9))
        host, port = await server.start("127.0.0.1", 0)
        token = meter_token(SEED, meter_identity("meter", 1))
        fetch = asyncio.ensure_future(request_keysets(host, port, token, [request("gs-1")]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        # drain() itself, then stop(): from Python 3.12.1 asyncio's Server.wait_closed also
        # waits for open links (so stop() alone would wait here anyway); uvloop's does not
        drained = asyncio.ensure_future(server.group.drain())
        stop = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.05)
        assert not drained.done() and not stop.done()  # held by the sync
        assert not await server.group.drain(timeout=0.05)  # bounded: it gives up, says so
        release.set()
        assert await drained
        await stop
        order.append("stopped")
        assert (await fetch).grants  # the link it held was answered

    run_on(loop, main())
    assert order == ["synced", "stopped"]


def test_a_cloned_token_file_raises_an_alert_in_the_log_and_in_as_audit(
    site: Site, tmp_path: Path
) -> None:
    """Copy a token file, let the original change its keys, then present the copy."""
    cli = [sys.executable, "-m", "mesh.cli"]
    original = site.root / "alpha-1.token"
    copy = tmp_path / "copy-of-alpha-1.token"
    shutil.copyfile(original, copy)

    def as_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, "as", *args], env=cli_env(), capture_output=True, text=True, timeout=60
        )

    with as_serve("--store", str(site.desk_dir), "--key-lifetime", "0") as server:
        address = server.address
        first = as_cli("request", "--as", address, "--token", str(original), "--target", "gs-1")
        assert first.returncode == 0 and "generation 2" in first.stdout, first.stderr
        cloned = as_cli("request", "--as", address, "--token", str(copy), "--target", "gs-1")
        assert cloned.returncode == 1 and "suspended" in cloned.stderr
        alerts = as_cli("audit", "--store", str(site.desk_dir), "--alerts", "--json")
        assert alerts.returncode == 0, alerts.stderr
        (alert,) = json.loads(alerts.stdout)["audit"]
        assert alert["op"] == "as-clone-alert" and alert["node"] == "alpha-1"
        assert alert["presented_generation"] == 1 and alert["current_generation"] == 2
        text = as_cli("audit", "--store", str(site.desk_dir), "--limit", "2")
        assert text.returncode == 0 and len(text.stdout.strip().splitlines()) == 2
        last = text.stdout.strip().splitlines()[-1]
        assert " as-clone-alert " in last and " node=alpha-1 " in last
        for bad in (["--limit", "0"], ["--limit", "99999999999999999999"], []):
            refused = as_cli("audit", *bad, *(["--store", str(site.desk_dir)] if bad else []))
            assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
        # the remedy the alert names: change the trusted token's keys; the copy is locked out
        lifted = as_cli(
            "reinstate", "alpha-1", "--store", str(site.desk_dir), "--token", str(original)
        )
        assert lifted.returncode == 0 and "generation 3" in lifted.stdout, lifted.stderr
        again = as_cli(
            "reinstate", "alpha-1", "--store", str(site.desk_dir), "--token", str(original)
        )
        assert again.returncode == 1 and "is not suspended" in again.stderr
        back = as_cli("request", "--as", address, "--token", str(original), "--target", "gs-1")
        assert back.returncode == 0, back.stderr
        locked_out = as_cli("request", "--as", address, "--token", str(copy), "--target", "gs-1")
        assert locked_out.returncode == 1 and "auth-failed" in locked_out.stderr
    assert server.returncode == 0, server.err
    (warning,) = [line for line in server.err.splitlines() if "CLONE ALERT" in line]
    assert "snrmesh as: WARNING CLONE ALERT: alpha-1 (token " in warning
    assert "suspended" in warning


def test_audit_text_shows_chosen_text_as_json_so_it_cannot_fake_fields() -> None:
    from provisioning.authserver.cli import audit_text

    entry = {"seq": 7, "at": "2026-12-01T10:00:00Z", "op": "as-keyset", "node": "meter-0000001"}
    line = audit_text([{**entry, "purpose": "x node=gs-1", "epoch": 3, "added": ["a", "b"]}])
    assert line == (
        '#7 2026-12-01T10:00:00Z as-keyset node=meter-0000001 purpose="x node=gs-1" epoch=3 '
        'added=["a", "b"]'
    )


class _RecordingTransport:
    """What _LinkProtocol needs of a transport; records what was written and when."""

    def __init__(self, store: SqlKeyStateStore) -> None:
        self.store = store
        self.writes: list[tuple[int, bytes]] = []  # (store.synced at the write, bytes)
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.writes.append((self.store.synced, data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def test_an_answer_read_while_a_sync_runs_waits_for_its_own_commit(
    site: Site, store: SqlKeyStateStore
) -> None:
    """Doc 'Durability': no answer leaves before the commits it reports are on disk.

    The client's ANSWER and REQUEST arrive in two reads (TCP splits them as it likes).
    The ANSWER's commit (the key change) starts a sync; while that sync runs the
    REQUEST is issued (a new commit, a minted CK). The KEYSET must wait for a sync
    covering *its* commit; it leaves with the READY, covered by the earlier sync only.
    """
    gate = threading.Event()
    gate.set()
    real_sync = store.sync
    store.sync_in_thread = True  # type: ignore[misc]

    def sync(upto: int) -> None:
        gate.wait(10)
        real_sync(upto)

    store.sync = sync  # type: ignore[method-assign]
    issued_at: list[int] = []
    real_issue = store.issue

    def issue(*args: Any) -> Any:
        keyset = real_issue(*args)
        issued_at.append(store.commits)  # the commit this KEYSET reports
        return keyset

    store.issue = issue  # type: ignore[method-assign]

    async def main() -> None:
        server = AuthServer(make_service(store, key_lifetime=0.0))  # a key change on the link
        transport = _RecordingTransport(store)
        link = server._protocol()
        link.connection_made(transport)  # type: ignore[arg-type]
        client = ClientSession(site.token("uav-1"), [request("gs-1")])

        async def written(before: int) -> None:
            for _ in range(500):
                if len(transport.writes) > before:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("nothing written")

        def deliver(start: int) -> None:
            for _, data in transport.writes[start:]:
                client.receive_data(data, 0)

        # HELLO -> START, message 1 -> message 2 + CHALLENGE (a key change: a commit, synced)
        for _ in range(2):
            before = len(transport.writes)
            link.data_received(client.data_to_send())
            await written(before)
            deliver(before)
        flight = client.data_to_send()  # confirmation + ANSWER + REQUEST
        assert flight
        gate.clear()  # the next sync takes a while (a slow disk)
        before = len(transport.writes)
        link.data_received(flight[:-1])  # every record but the last: ANSWER -> commit -> READY
        await asyncio.sleep(0.1)  # the sync for the ANSWER's commit is running now
        link.data_received(flight[-1:])  # the REQUEST: a CK minted, one commit more
        assert issued_at, "the request was not issued"
        gate.set()
        await written(before)
        await server.group.drain()
        deliver(before)
        granted = [e for e in iter(client.next_event, None) if isinstance(e, Granted)]
        synced_when_sent = [synced for synced, _ in transport.writes[before:]]
        assert granted, "the client got no KEYSET"
        # the KEYSET left the worker before any sync covered the commit that minted it
        assert min(synced_when_sent) >= issued_at[0], (synced_when_sent, issued_at)

    asyncio.run(main())


@LOOPS
def test_a_flood_of_silent_links_drops_the_oldest_silent_ones_not_the_clients(
    site: Site, store: KeyStateStore, loop: str
) -> None:
    """Connections that never send a byte, over ``max_links``: while the links held are
    younger than the grace, each new one is closed; once they have sat silent that long, the
    oldest makes room, and a client that sends its HELLO at once is served."""
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    async def main() -> None:
        nonlocal offset
        server = AuthServer(make_service(store, key_lifetime=1e9), clock=clock, max_links=8)
        host, port = await server.start("127.0.0.1", 0)
        silent = []
        try:
            for _ in range(20):
                silent.append(await asyncio.open_connection(host, port))
            for _ in range(100):  # until the server accepted all twenty
                if server.service.counters.get("silent_dropped", 0) >= 12:
                    break
                await asyncio.sleep(0.02)
            assert len(server.links) == 8
            for reader, _ in silent[8:]:  # the newest: closed, with nothing sent
                assert await asyncio.wait_for(reader.read(), 2.0) == b""
            offset = SILENT_GRACE  # the eight held have sat silent that long
            outcome = await request_keysets(host, port, site.token("uav-1"), [request("gs-1")])
            assert outcome.grants and len(server.links) <= 8
            assert await asyncio.wait_for(silent[0][0].read(), 2.0) == b""  # it made room
        finally:
            for _, writer in silent:
                writer.close()
            await server.stop()
        assert server.service.counters["silent_dropped"] == 13  # 12 new ones, then the oldest

    run_on(loop, main())


def test_as_serve_out_of_descriptors_still_serves_clients_through_a_silent_flood(
    site: Site,
) -> None:
    """``as serve`` under a 160-descriptor limit and 300 connections that never send a byte:
    a node's request is still answered (it failed after 6 attempts before silent links were
    dropped: the worker could no longer accept)."""
    import socket

    flood: list[socket.socket] = []
    request_cli = [sys.executable, "-m", "mesh.cli", "as", "request", "--as"]
    with as_serve("--store", str(site.desk_dir), "--json", files=160) as server:
        host, port = server.address.rsplit(":", 1)
        try:
            for _ in range(300):
                flood.append(socket.create_connection((host, int(port)), timeout=5))
            token = str(site.root / "alpha-1.token")
            got = subprocess.run(
                [*request_cli, server.address, "--token", token, "--target", "gs-1", "--json"],
                env=cli_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert got.returncode == 0, got.stderr
            assert json.loads(got.stdout)["peer"] == "gs-1"
        finally:
            for sock in flood:
                sock.close()
    assert server.returncode == 0, server.err
    counters = json.loads(server.out.strip().splitlines()[-1])
    assert counters["silent_dropped"] >= 300 - 160


@LOOPS
def test_a_client_whose_hello_waits_unread_in_a_burst_is_not_dropped(
    site: Site, store: KeyStateStore, loop: str
) -> None:
    """A client connects and sends its HELLO at once, then 19 silent connections arrive
    before the worker's loop runs (one accept batch, max_links 8): the client has not sat
    silent at all, the silent ones should go, not it."""
    import socket

    async def main() -> None:
        server = AuthServer(make_service(store, key_lifetime=1e9), max_links=8)
        host, port = await server.start("127.0.0.1", 0)
        session = ClientSession(site.token("uav-1"), [request("gs-1")])
        client = socket.create_connection((host, port), timeout=5)
        silent: list[socket.socket] = []
        try:
            client.sendall(session.data_to_send())
            silent = [socket.create_connection((host, port), timeout=5) for _ in range(19)]
            await asyncio.sleep(0.5)  # the worker accepts the batch, and reads what came
            client.setblocking(False)
            assert client.recv(4096)  # its START: admitted, not reset
        finally:
            client.close()
            for sock in silent:
                sock.close()
            await server.stop()

    run_on(loop, main())


def test_a_worker_on_the_shared_socket_keeps_its_backlog(store: KeyStateStore) -> None:
    """``serve_on`` let the event loop listen again with its default backlog of 100: with the
    loop busy, connections past 100 had their SYNs dropped and came back a second later (the
    p99 of the bench's 256 meter loops was 1.2 s, with the kernel's ListenOverflows rising)."""
    sock = bound_socket("127.0.0.1", 0)
    address = sock.getsockname()
    loop = asyncio.new_event_loop()
    server = AuthServer(make_service(store))
    clients: list[socket.socket] = []
    try:
        loop.run_until_complete(server.serve_on(sock))  # then the loop stands still: no accept
        completed = 0
        for _ in range(300):
            client = socket.socket()
            client.settimeout(0.5)
            clients.append(client)
            try:
                client.connect(address)  # completes in the kernel while the queue has room
                completed += 1
            except TimeoutError:
                break
        assert completed == 300
    finally:
        for client in clients:
            client.close()
        loop.run_until_complete(server.stop())
        loop.close()
        sock.close()
