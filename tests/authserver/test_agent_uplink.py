"""``snrmesh agent --as``: an agent that reaches an AS fetches its bundle live, and follows it.

The site's desk issued no CKs, so the agents' desk bundles name their mates
but carry no keyset: every CK these agents use comes from the AS, over the
authenticated link that also changes their tokens' keys (``key_lifetime=0``:
a key change at every link).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.agent.agent import Agent, AgentConfig
from mesh.agent.control import ControlError
from mesh.agent.refresh import RefreshPolicy, RefreshSchedule, UplinkError
from mesh.cli import agent as cli_agent
from mesh.errors import MeshError
from mesh.keyset import KeysetError
from mesh.keyset.bundle import Bundle, open_bundle
from mesh.keyset.errors import BundleError
from mesh.token import Slot
from mesh.token.software import SoftwareToken
from provisioning.authserver.client import agent_bundle_source
from provisioning.authserver.errors import Refusal, RemoteAuthError
from provisioning.authserver.protocol import AuthService
from provisioning.authserver.server import AuthServer
from provisioning.authserver.store import (
    CLONE_ALERT,
    KeyStateStore,
    SqliteKeyStateStore,
    SqlKeyStateStore,
)
from tests.authserver.conftest import (
    NOW,
    PASSPHRASE,
    PIN,
    Site,
    as_serve,
    cli_env,
    make_service,
)


def _desk_bundle(site: Site, node: str, path: Path) -> Bundle:
    with site.open() as desk:
        bundle = desk.export(node, path, now=NOW)
    assert bundle.keysets == ()  # every CK below comes from the AS
    return bundle


def _agent(
    site: Site,
    tmp_path: Path,
    node: str,
    *,
    address: tuple[str, int] | None,
    peers: tuple[str, ...] = (),
    source: Callable[[], Awaitable[bytes]] | None = None,
    mdns: bool = False,
) -> tuple[Agent, Path]:
    path = tmp_path / f"{node}.bundle"
    bundle = _desk_bundle(site, node, path)
    token = site.token(node)
    if source is None and address is not None:
        source = agent_bundle_source(*address, token, ahead=1)
    config = AgentConfig(
        state_dir=tmp_path / node,
        listen=("127.0.0.1", 0),
        mdns=mdns,
        mdns_interfaces=("127.0.0.1",),  # never beyond loopback
        peers=peers,
        bundle_path=path,
    )
    return Agent(config, bundle, token, bundle_source=source), path  # type: ignore[arg-type]


async def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _dialling(gs: Agent) -> tuple[str]:
    """``--peer`` for an agent that dials gs-1 where it listens."""
    return (f"gs-1@127.0.0.1:{gs.listen_address[1]}",)


@contextlib.asynccontextmanager
async def _linked(
    site: Site, tmp_path: Path, service: AuthService
) -> AsyncIterator[tuple[Agent, Agent]]:
    """An AS on ``service``; gs-1 and alpha-1 (which dials it) fetching from it, linked."""
    server = AuthServer(service)
    address = await server.start("127.0.0.1", 0)
    gs, _ = _agent(site, tmp_path, "gs-1", address=address)
    await gs.start()
    alpha, _ = _agent(
        site,
        tmp_path,
        "alpha-1",
        address=address,
        peers=_dialling(gs),
    )
    await alpha.start()
    try:
        await _until(lambda: "gs-1" in alpha.links and "alpha-1" in gs.links, "the link")
        yield gs, alpha
    finally:
        await alpha.stop()
        await gs.stop()
        await server.stop()


def test_agents_fetch_their_keysets_from_the_as_live_and_chat(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    old = {}

    async def main() -> None:
        server = AuthServer(make_service(store))
        address = await server.start("127.0.0.1", 0)
        gs, gs_path = _agent(site, tmp_path, "gs-1", address=address)
        old["gs-1"] = gs_path.read_bytes()
        assert gs.keys.keyset_for("alpha-1", time.time()) is None  # nothing to dial with yet
        await gs.start()
        alpha, alpha_path = _agent(
            site,
            tmp_path,
            "alpha-1",
            address=address,
            peers=_dialling(gs),
        )
        old["alpha-1"] = alpha_path.read_bytes()
        await alpha.start()
        try:
            for agent in (gs, alpha):  # a fetch at start, without a restart
                await _until(lambda a=agent: a.refresh.last_success > -math.inf, "a bundle")
            await _until(lambda: "gs-1" in alpha.links and "alpha-1" in gs.links, "the link")
            await alpha._op_send({"to": "gs-1", "text": "keys from the AS"})
            await _until(lambda: alpha.store.counts().get("delivered") == 1, "delivery")
            assert [m.text for m in gs.store.history(peer="alpha-1")] == ["keys from the AS"]
            hello = alpha._op_hello({})
            assert hello["uplink"]["failures"] == 0 and hello["uplink"]["last_bundle"] > 0
        finally:
            await alpha.stop()
            await gs.stop()
            await server.stop()

    asyncio.run(main())
    assert isinstance(store, SqlKeyStateStore)
    for node in ("gs-1", "alpha-1"):
        # a new process: the token file moved on, and the bundle file with it
        token = SoftwareToken(site.root / f"{node}.token")
        token.verify_pin(PIN)
        assert token.info().generation(Slot.MAC) == 2
        with pytest.raises(KeysetError, match="older key generation"):
            open_bundle(old[node], token)
        bundle = open_bundle((tmp_path / f"{node}.bundle").read_bytes(), token)
        mission = bundle.mission
        epochs = {(k.not_before - mission.start) // mission.epoch_seconds for k in bundle.keysets}
        assert epochs == {0, 1}  # this epoch and the next (--as-ahead 1)
    (row,) = [r for r in store.audit_log("as-bundle") if r["node"] == "alpha-1"]
    assert row["generation"] == 2


def test_a_mate_revoked_at_the_as_is_dropped_at_the_next_fetch(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    assert isinstance(store, SqlKeyStateStore)

    async def main() -> None:
        service = make_service(store, identity_burst=100.0)
        async with _linked(site, tmp_path, service) as (gs, alpha):
            store.revoke("alpha-1", int(time.time()))
            emitted: list[str] = []
            emit = gs._emit
            gs._emit = lambda event, **fields: (emitted.append(event), emit(event, **fields))  # type: ignore[method-assign,assignment,func-returns-value]
            gs.refresh.started()
            await gs._fetch_bundle()  # what the schedule does every --as-refresh seconds
            gs._tick(time.time())
            assert "bundle" in emitted and "epoch" not in emitted  # same epoch: no event
            assert "alpha-1" not in gs.peers and "alpha-1" not in gs.links
            with pytest.raises(ControlError, match="alpha-1 is revoked"):
                await gs._op_send({"to": "alpha-1", "text": "still there?"})
            assert "alpha-1" in gs.bundle.revoked
            assert any(a.kind == "revoked" and a.peer == "alpha-1" for a in gs.store.alerts())
            assert gs.keys.keyset_for("alpha-1", time.time()) is None
            # alpha-1's own fetch is refused for good: it runs on what it holds, and says so
            alpha.refresh.started()
            await alpha._fetch_bundle()
            assert alpha.refresh.failures == 0 and alpha.refresh.running is False
            (alert,) = [a for a in alpha.store.alerts() if a.kind == "uplink"]
            assert "refused: revoked (the desk revoked this node)" in alert.message
            assert "running on the keysets held" in alert.message
            # and its next handshake with gs-1 is refused
            await _until(lambda: "gs-1" not in alpha.links, "the link to close")
            ck = alpha.keys.keyset_for("gs-1", time.time())
            assert ck is not None  # it still holds the CK, but gs-1 no longer takes it
            assert not await alpha._dial("127.0.0.1", gs.listen_address[1], expect="gs-1")

    asyncio.run(main())


def test_an_unreachable_as_or_a_foreign_bundle_leaves_the_agent_on_its_keysets(
    site: Site, tmp_path: Path
) -> None:
    with site.open() as desk:
        desk.export("alpha-1", tmp_path / "other.bundle", now=NOW)
    foreign = (tmp_path / "other.bundle").read_bytes()
    calls: list[str] = []

    async def unreachable() -> bytes:
        calls.append("unreachable")
        raise UplinkError("no answer from the Authentication Server after 1 attempt")

    async def wrong() -> bytes:
        calls.append("wrong")
        return foreign

    async def main() -> None:
        gs, path = _agent(site, tmp_path, "gs-1", address=None, source=unreachable)
        before = path.read_bytes()
        gs.refresh = RefreshSchedule(RefreshPolicy(base=0.5, cap=0.5))
        await gs.start()
        try:
            await _until(lambda: gs.refresh.failures == 1, "a failed fetch")
            assert [a for a in gs.store.alerts() if a.kind == "uplink"] == []  # one: logged
            await _until(lambda: gs.refresh.failures == 2, "a second one")
            (alert,) = [a for a in gs.store.alerts() if a.kind == "uplink"]
            assert "no answer" in alert.message and "next try in" in alert.message
            gs.refresh.started()
            gs.refresh.failed(
                time.time(), UplinkError("no answer", retry_after=600), random.Random()
            )
            count = calls.count("unreachable")
            await asyncio.sleep(1.0)
            assert calls.count("unreachable") == count  # backing off: no retry storm
            gs._bundle_source = wrong
            gs.refresh = RefreshSchedule(RefreshPolicy())
            await _until(lambda: "wrong" in calls and not gs.refresh.running, "the wrong one")
            assert gs.refresh.failures == 1 and gs.refresh.state == "retrying"
            assert gs.bundle.identity == "gs-1" and path.read_bytes() == before
            assert gs._op_hello({})["uplink"]["last_bundle"] is None
        finally:
            await gs.stop()

    asyncio.run(main())


def test_a_stop_lets_a_fetch_end_so_the_bundle_file_matches_the_token(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    """SIGTERM in the middle of a fetch: the token's keys changed, the bundle must follow."""

    async def main() -> None:
        server = AuthServer(make_service(store))
        address = await server.start("127.0.0.1", 0)
        fetched = asyncio.Event()

        async def slow() -> bytes:  # the key change is made; the bundle is still on its way
            data = await agent_bundle_source(*address, gs.token, ahead=1)()
            fetched.set()
            await asyncio.sleep(0.5)
            return data

        gs, _ = _agent(site, tmp_path, "gs-1", address=None, source=slow)
        await gs.start()
        try:
            await asyncio.wait_for(fetched.wait(), 20)
        finally:
            await gs.stop()
            await server.stop()

    asyncio.run(main())
    token = site.token("gs-1")
    assert token.info().generation(Slot.MAC) == 2
    assert open_bundle((tmp_path / "gs-1.bundle").read_bytes(), token).keysets != ()


def test_a_key_change_made_beside_a_running_agent_is_followed_not_taken_for_a_clone(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    """``as request`` on the token file of a running agent, then the agent's own fetch."""
    assert isinstance(store, SqlKeyStateStore)

    async def main() -> None:
        server = AuthServer(make_service(store, identity_burst=100.0))
        address = await server.start("127.0.0.1", 0)
        gs, _ = _agent(site, tmp_path, "gs-1", address=address)
        await gs.start()
        try:
            await _until(lambda: gs.refresh.last_success > -math.inf, "a bundle")
            other = site.token("gs-1")  # another process's handle on the same file
            await agent_bundle_source(*address, other, ahead=0)()
            assert other.info().generation(Slot.MAC) == 3
            gs.refresh.started()
            await gs._fetch_bundle()
            assert gs.refresh.failures == 0, [a.message for a in gs.store.alerts()]
            assert gs.token.info().generation(Slot.MAC) == 4
        finally:
            await gs.stop()
            await server.stop()

    asyncio.run(main())
    assert store.audit_log(CLONE_ALERT) == []


def test_the_next_epochs_keysets_are_fetched_before_this_epoch_ends(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    async def main() -> None:
        server = AuthServer(make_service(store, identity_burst=100.0))
        address = await server.start("127.0.0.1", 0)
        gs, _ = _agent(site, tmp_path, "gs-1", address=None)
        gs._bundle_source = agent_bundle_source(*address, gs.token, ahead=0)
        try:
            gs.refresh.started()
            await gs._fetch_bundle()  # this epoch's CKs only
            now = time.time()
            epoch = gs.bundle.mission.epoch_at(now)
            assert epoch is not None and not gs._lacking(now)
            assert gs._lacking(epoch.end - 60)  # within the hour before the epoch ends
            assert not gs._lacking(epoch.end - 2 * 3600)
            gs._bundle_source = agent_bundle_source(*address, gs.token, ahead=1)
            gs.refresh.started()
            await gs._fetch_bundle()
            assert not gs._lacking(epoch.end - 60)
            assert gs.keys.keyset_for("alpha-1", epoch.end) is not None
        finally:
            gs.store.close()
            await server.stop()

    asyncio.run(main())


@given(
    failures=st.integers(min_value=0, max_value=40),
    retry_after=st.none() | st.floats(min_value=0, max_value=3600),
    seed=st.integers(),
)
def test_fetch_retries_back_off_with_full_jitter(
    failures: int, retry_after: float | None, seed: int
) -> None:
    policy = RefreshPolicy(every=3600.0, base=5.0, cap=600.0)
    schedule = RefreshSchedule(policy)
    rng = random.Random(seed)
    now = 1000.0
    for _ in range(failures):
        schedule.started()
        schedule.failed(now, UplinkError("x"), rng)
    schedule.started()
    retry = schedule.failed(now, UplinkError("x", retry_after=retry_after), rng)
    bound = min(policy.cap, policy.base * 2**failures)
    assert now <= retry <= now + max(bound, retry_after or 0.0)
    if retry_after is not None:
        assert retry >= now + retry_after
    assert not schedule.due(retry - 0.001, lacking=lambda: True) and schedule.due(
        retry, lacking=lambda: False
    )


def test_the_fetch_schedule_follows_the_period_the_lack_and_permanent_refusals() -> None:
    policy = RefreshPolicy(every=3600.0, lacking_gap=60.0)
    schedule = RefreshSchedule(policy)
    assert schedule.due(0.0, lacking=lambda: False)  # at start
    schedule.started()
    assert not schedule.due(0.0, lacking=lambda: True)  # one fetch at a time
    schedule.succeeded(0.0)
    assert not schedule.due(59.0, lacking=lambda: True) and schedule.due(60.0, lacking=lambda: True)
    assert not schedule.due(3599.0, lacking=lambda: False) and schedule.due(
        3600.0, lacking=lambda: False
    )
    schedule.started()
    schedule.failed(100.0, UplinkError("suspended", permanent=True), random.Random(1))
    assert not schedule.due(3699.0, lacking=lambda: True) and schedule.due(
        3700.0, lacking=lambda: False
    )
    with pytest.raises(Exception, match="positive"):
        RefreshPolicy(every=0)


def test_agent_as_bootstraps_a_missing_bundle_and_replaces_a_stale_one(
    site: Site, tmp_path: Path
) -> None:
    bundle = tmp_path / "alpha-1.bundle"
    token = str(site.root / "alpha-1.token")
    control = tmp_path / "control.sock"

    def agent(*extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mesh.cli",
                "agent",
                "--bundle",
                str(bundle),
                "--token",
                token,
                "--state",
                str(tmp_path / "state"),
                "--control",
                str(control),
                "--listen",
                "127.0.0.1:0",
                "--no-mdns",
                *extra,
            ],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def peers(process: subprocess.Popen[str]) -> list[dict[str, object]]:
        for _ in range(400):
            assert process.poll() is None, process.communicate()[1]
            if control.exists():
                result = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "mesh.cli",
                        "peers",
                        "--control",
                        str(control),
                        "--json",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if result.returncode == 0:
                    return json.loads(result.stdout)  # type: ignore[no-any-return]
            time.sleep(0.05)
        raise AssertionError("the agent's control socket never answered")

    def stop(process: subprocess.Popen[str]) -> str:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert "Traceback" not in err
        return err

    with as_serve("--store", str(site.desk_dir), "--key-lifetime", "0") as server:
        running = agent("--as", server.address)  # no bundle at all: the AS has it
        assert [p["identity"] for p in peers(running)] == ["gs-1"]
        err = stop(running)
        assert f"bundle from the AS written to {bundle}" in err
        with contextlib.closing(SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)) as audit:
            rows = [r for r in audit.audit_log("as-bundle") if r["node"] == "alpha-1"]
        assert len(rows) == 1  # the fetch before the start counts as the first one
        opened = SoftwareToken(token)
        opened.verify_pin(PIN)
        assert open_bundle(bundle.read_bytes(), opened).keysets != ()
        # another process changes the token's keys: the bundle file no longer opens
        asked = ["as", "request", "--as", server.address, "--token", token, "--target", "gs-1"]
        request = subprocess.run(
            [sys.executable, "-m", "mesh.cli", *asked],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert request.returncode == 0, request.stderr
        control.unlink(missing_ok=True)
        plain = agent()
        _, err = plain.communicate(timeout=30)
        assert plain.returncode == 1 and "Traceback" not in err
        assert "older key generation" in err and "--as" in err
        running = agent("--as", server.address)
        assert [p["identity"] for p in peers(running)] == ["gs-1"]
        err = stop(running)
        assert "fetching this node's bundle from the AS" in err
    no_as = agent("--as-refresh", "60")
    _, err = no_as.communicate(timeout=30)
    assert no_as.returncode == 1 and "--as-refresh needs --as" in err
    # a --bundle that is something else is never replaced
    control.unlink(missing_ok=True)
    bundle = Path(token)
    before = bundle.read_bytes()
    refused = agent("--as", "127.0.0.1:9")
    _, err = refused.communicate(timeout=30)
    assert refused.returncode == 1 and "is not a bundle: not replaced" in err
    assert bundle.read_bytes() == before


# -- found by the review of the first version ---------------------------------------------------


def _offline(site: Site, tmp_path: Path, node: str, source: BundleSourceT) -> Agent:
    """An agent built, not started, on its desk bundle, fetching from ``source``."""
    agent, _ = _agent(site, tmp_path, node, address=None, source=source)
    return agent


BundleSourceT = Callable[[], Coroutine[Any, Any, bytes]]


def test_startup_leaves_another_nodes_bundle_file_alone(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--bundle gs-1.bundle --token alpha-1.token --as ...``: only a stale bundle is replaced."""
    with site.open() as desk:
        desk.export("gs-1", tmp_path / "gs-1.bundle", now=NOW)
        desk.export("alpha-1", tmp_path / "alpha-1.bundle", now=NOW)
    before = (tmp_path / "gs-1.bundle").read_bytes()
    fetched: list[bool] = []

    def source(*_: object, **__: object) -> BundleSourceT:
        async def fetch() -> bytes:
            fetched.append(True)
            return (tmp_path / "alpha-1.bundle").read_bytes()

        return fetch

    monkeypatch.setattr("provisioning.authserver.client.agent_bundle_source", source)
    monkeypatch.setenv("SNRMESH_PIN", PIN)
    args = argparse.Namespace(
        as_address="127.0.0.1:7450",
        as_ahead=1,
        as_refresh=3600.0,
        token=str(site.root / "alpha-1.token"),
        bundle=str(tmp_path / "gs-1.bundle"),
    )
    with pytest.raises(BundleError, match="another token"):
        cli_agent._unlock_with_uplink(args, 1, 3600.0)
    assert (tmp_path / "gs-1.bundle").read_bytes() == before and fetched == []
    args.bundle = str(tmp_path / "missing" / "x.bundle")  # checked before any key change
    with pytest.raises(MeshError, match="cannot write"):
        cli_agent._unlock_with_uplink(args, 1, 3600.0)
    assert fetched == []
    for bad in ("127.0.0.1", "nonsense", "127.0.0.1:0", ":7450"):
        args.as_address = bad
        with pytest.raises(MeshError, match="expected HOST:PORT"):
            cli_agent._unlock_with_uplink(args, 1, 3600.0)


def test_a_permanent_refusal_is_reported_as_one_not_as_a_bundle(site: Site, tmp_path: Path) -> None:
    async def refused() -> bytes:
        raise UplinkError("the Authentication Server refused: suspended", permanent=True)

    async def main() -> None:
        gs = _offline(site, tmp_path, "gs-1", refused)
        try:
            for _ in range(2):
                gs.refresh.started()
                await gs._fetch_bundle()
            uplink = gs._op_hello({})["uplink"]
            assert uplink == {"state": "refused", "last_bundle": None, "failures": 0}
            assert len([a for a in gs.store.alerts() if a.kind == "uplink"]) == 1
        finally:
            gs.store.close()

    asyncio.run(main())


def test_no_fetch_starts_once_the_agent_stops(site: Site, tmp_path: Path) -> None:
    calls: list[str] = []

    async def unreachable() -> bytes:
        calls.append("fetch")
        raise UplinkError("no answer")

    async def main() -> None:
        gs = _offline(site, tmp_path, "gs-1", unreachable)
        await gs.start()
        await _until(lambda: calls == ["fetch"] and not gs.refresh.running, "the first fetch")
        gs.refresh._next = time.time() + 0.2  # the next try comes while stop() awaits
        assert gs.control is not None
        close = gs.control.close

        async def slow_close() -> None:  # as zeroconf's goodbyes, or any await in stop()
            await asyncio.sleep(1.0)
            await close()

        gs.control.close = slow_close  # type: ignore[method-assign]
        await gs.stop()

    asyncio.run(main())
    assert calls == ["fetch"]


def test_a_taken_bundle_stays_taken_when_its_alerts_fail(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alert table full (SQLite): the bundle is taken whole and fetching goes on."""

    async def source() -> bytes:
        with site.open() as desk:
            desk.revoke("alpha-1", now=NOW)
            desk.export("gs-1", tmp_path / "next.bundle", now=NOW)
        return (tmp_path / "next.bundle").read_bytes()

    async def main() -> None:
        gs = _offline(site, tmp_path, "gs-1", source)
        gs.refresh.started()
        gs.refresh.failed(time.time(), UplinkError("no answer"), random.Random(0))

        def full(*_: object, **__: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(gs, "_alert", full)
        try:
            gs.refresh.started()
            with pytest.raises(sqlite3.OperationalError):
                await gs._fetch_bundle()
            assert gs.keys.bundle is gs.bundle and "alpha-1" not in gs.keys.mates
            assert "alpha-1" not in gs.peers and "alpha-2" in gs.peers
            assert gs.refresh.state == "ok" and not gs.refresh.running
        finally:
            gs.store.close()

    asyncio.run(main())


def test_a_bundle_refused_after_the_key_change_says_the_file_is_stale_and_tries_again(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    """A bundle too large for a link is refused after the link changed the keys."""

    def too_large(*_: object, **__: object) -> bytes:
        raise RemoteAuthError(Refusal.POLICY, "bundle too large for a link")

    store.bundle = too_large  # type: ignore[method-assign]

    async def main() -> None:
        server = AuthServer(make_service(store))  # a key change at every link
        address = await server.start("127.0.0.1", 0)
        gs = _offline(site, tmp_path, "gs-1", None)  # type: ignore[arg-type]
        gs._bundle_source = agent_bundle_source(*address, gs.token, ahead=1)
        try:
            gs.refresh.started()
            await gs._fetch_bundle()
            assert gs.refresh.state == "retrying"  # not a period from now: the file is stale
            (alert,) = [a for a in gs.store.alerts() if a.kind == "uplink"]
            assert "no longer opens" in alert.message and "restart needs the AS" in alert.message
        finally:
            gs.store.close()
            await server.stop()

    asyncio.run(main())


def test_an_older_bundle_is_refused_and_a_revocation_is_never_undone(
    site: Site, tmp_path: Path
) -> None:
    with site.open() as desk:
        desk.export("gs-1", tmp_path / "before.bundle", now=NOW)  # alpha-2 a mate
        desk.export("gs-1", tmp_path / "old.bundle", now=NOW - 3600)
        desk.revoke("alpha-2", now=NOW)
    served = [tmp_path / "before.bundle", tmp_path / "old.bundle"]

    async def restored() -> bytes:  # an AS restored from a backup
        return served.pop(0).read_bytes()

    async def main() -> None:
        gs = _offline(site, tmp_path, "gs-1", restored)
        assert "alpha-2" in gs.bundle.revoked and "alpha-2" not in gs.peers
        try:
            gs.refresh.started()
            await gs._fetch_bundle()  # within the clock skew: taken, but alpha-2 stays out
            assert gs.refresh.state == "ok" and "alpha-2" in gs.bundle.revoked
            assert "alpha-2" not in gs.peers and "alpha-2" not in gs.keys.mates
            gs.refresh.started()
            await gs._fetch_bundle()  # an hour older than the one held: refused
            assert gs.refresh.state == "refused"
            (alert,) = [a for a in gs.store.alerts() if a.kind == "uplink"]
            assert "older than the one held" in alert.message
        finally:
            gs.store.close()

    asyncio.run(main())


def test_a_mate_newer_than_the_bundle_gets_it_fetched_and_is_linked(
    site: Site, tmp_path: Path
) -> None:
    """alpha-3, enrolled and paired with gs-1 after gs-1's agent took its bundle, dials it."""
    store = SqliteKeyStateStore.open(site.desk_dir, PASSPHRASE)

    async def main() -> None:
        server = AuthServer(make_service(store, identity_burst=100.0))
        address = await server.start("127.0.0.1", 0)
        gs, _ = _agent(site, tmp_path, "gs-1", address=address, mdns=True)
        gs.refresh = RefreshSchedule(RefreshPolicy(lacking_gap=0.5))
        await gs.start()
        try:
            await _until(lambda: gs.refresh.state == "ok", "gs-1's bundle")
            with site.open() as desk:
                desk.enrol(
                    "alpha-3", "soldier", token_path=site.root / "alpha-3.token", pin=PIN, now=NOW
                )
                desk.pair("gs-1", "alpha-3", now=NOW)
            assert "alpha-3" not in gs.peers
            alpha, _ = _agent(
                site,
                tmp_path,
                "alpha-3",
                address=address,
                peers=_dialling(gs),
            )
            await alpha.start()
            try:
                await _until(lambda: "alpha-3" in gs.links, "the link", timeout=40)
                assert gs.refresh.last_success > 0 and gs.keys.strangers == set()
                discovery = gs.discovery
                assert discovery is not None  # its mDNS knows alpha-3's tag from the next tick
                await _until(lambda: "alpha-3" in discovery._tags.values(), "alpha-3's tag")
            finally:
                await alpha.stop()
        finally:
            await gs.stop()
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_a_suspended_mate_that_keeps_dialling_is_no_reason_to_fetch_every_minute(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    """The AS leaves a suspended mate out of the bundle without revoking it: its ticket still
    opens, but a node a fetch left out does not ask for another one."""
    assert isinstance(store, SqlKeyStateStore)

    async def main() -> None:
        service = make_service(store, key_lifetime=1e9, identity_burst=100.0)
        async with _linked(site, tmp_path, service) as (gs, alpha):
            store.suspend("alpha-1", 1, int(time.time()))
            gs.refresh.started()
            await gs._fetch_bundle()  # alpha-1 left out: dropped, but not revoked
            assert "alpha-1" not in gs.peers and "alpha-1" not in gs.bundle.revoked
            # alpha-1 runs on the keysets it holds and dials again (a clone would too)
            await _until(lambda: "gs-1" not in alpha.links, "the link to close")
            assert not await alpha._dial("127.0.0.1", gs.listen_address[1], expect="gs-1")
            now = time.time()
            assert gs.keys.strangers == set(), "a suspended mate made a stranger"
            assert not gs._lacking(now)

    asyncio.run(main())


def test_a_stop_cut_while_the_keys_open_still_leaves_a_bundle_file_that_opens(
    site: Site, store: KeyStateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FETCH_STOP_WAIT bounds the wait, not the thread that opens the bundle after the key
    change (a card: one command per CK): the checked bundle is written before that."""
    from mesh.agent import agent as agent_module
    from mesh.agent.keyring import RingContents

    monkeypatch.setattr(agent_module, "FETCH_STOP_WAIT", 0.3)  # stands for 35 s vs a slow card
    slow_open = RingContents.open.__func__  # type: ignore[attr-defined]

    def slow(cls: type, *args: Any, **kwargs: Any) -> RingContents:
        time.sleep(1.0)
        return slow_open(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(RingContents, "open", classmethod(slow))

    async def main() -> None:
        server = AuthServer(make_service(store))
        address = await server.start("127.0.0.1", 0)
        fetched = asyncio.Event()

        async def source() -> bytes:
            data = await agent_bundle_source(*address, gs.token, ahead=1)()
            fetched.set()
            return data

        gs, _ = _agent(site, tmp_path, "gs-1", address=None, source=source)
        await gs.start()
        try:
            await asyncio.wait_for(fetched.wait(), 20)
        finally:
            await gs.stop()
            await server.stop()

    asyncio.run(main())
    token = site.token("gs-1")
    assert token.info().generation(Slot.MAC) == 2
    open_bundle((tmp_path / "gs-1.bundle").read_bytes(), token)


def test_the_stale_file_alert_is_followed_by_one_when_a_bundle_comes(
    site: Site, store: KeyStateStore, tmp_path: Path
) -> None:
    """The 'no longer opens / a restart needs the AS' alert comes at the first failure, and
    the next bundle says it is mended."""
    real = store.bundle

    def too_large(*_: object, **__: object) -> bytes:
        raise RemoteAuthError(Refusal.POLICY, "bundle too large for a link")

    store.bundle = too_large  # type: ignore[method-assign]

    async def main() -> None:
        server = AuthServer(make_service(store, identity_burst=100.0))
        address = await server.start("127.0.0.1", 0)
        gs = _offline(site, tmp_path, "gs-1", None)  # type: ignore[arg-type]
        gs._bundle_source = agent_bundle_source(*address, gs.token, ahead=1)
        try:
            gs.refresh.started()
            await gs._fetch_bundle()
            assert gs.refresh.state == "retrying"
            store.bundle = real  # type: ignore[method-assign]
            gs.refresh.started()
            await gs._fetch_bundle()
            assert gs.refresh.state == "ok"
            messages = [a.message for a in gs.store.alerts() if a.kind == "uplink"]
            assert any("fetched from the AS again" in m for m in messages), messages
        finally:
            gs.store.close()
            await server.stop()

    asyncio.run(main())


def test_a_second_stop_signal_abandons_a_fetch_in_progress(site: Site, tmp_path: Path) -> None:
    """ctrl-C twice: the first waits for the fetch (up to 35 s), the second cuts it short."""
    started = asyncio.Event()

    async def hanging() -> bytes:  # an AS that never answers
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    async def main() -> float:
        gs = _offline(site, tmp_path, "gs-1", hanging)
        await gs.start()
        await asyncio.wait_for(started.wait(), 20)
        began = time.monotonic()
        gs.request_stop()
        stopping = asyncio.ensure_future(gs.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done()  # waiting for the fetch
        gs.request_stop()
        await asyncio.wait_for(stopping, 10)
        assert gs.refresh.running is False
        return time.monotonic() - began

    assert asyncio.run(main()) < 10


def test_messages_to_a_mate_a_bundle_revokes_become_undeliverable_and_are_counted(
    site: Site, tmp_path: Path
) -> None:
    async def source() -> bytes:
        with site.open() as desk:
            desk.revoke("alpha-1", now=NOW)
            desk.export("gs-1", tmp_path / "next.bundle", now=NOW)
        return (tmp_path / "next.bundle").read_bytes()

    async def main() -> None:
        gs = _offline(site, tmp_path, "gs-1", source)
        try:
            for text in ("one", "two"):
                await gs._op_send({"to": "alpha-1", "text": text})  # not linked: pending
            gs.refresh.started()
            await gs._fetch_bundle()
            (alert,) = [a for a in gs.store.alerts() if a.kind == "revoked"]
            assert alert.peer == "alpha-1"
            assert "2 messages to it will not be delivered (undeliverable)" in alert.message
            history = gs.store.history(peer="alpha-1")
            assert [(m.text, m.state) for m in history] == [
                ("one", "undeliverable"),
                ("two", "undeliverable"),
            ]  # kept in the history, never sent, no longer retried
            assert gs.store.undelivered("alpha-1") == []
        finally:
            gs.store.close()

    asyncio.run(main())


def test_messages_kept_for_a_dropped_mate_become_undeliverable_when_it_is_revoked_later(
    site: Site, tmp_path: Path
) -> None:
    """Dropped (suspended, say): kept. Revoked by a later bundle: undeliverable, with an alert.
    (It used to stay pending until a restart: only peers were looked at.)"""
    import dataclasses

    from mesh.agent.keyring import RingContents

    async def never() -> bytes:
        raise AssertionError("not fetched")

    async def main() -> None:
        gs = _offline(site, tmp_path, "gs-1", never)
        try:
            await gs._op_send({"to": "alpha-1", "text": "kept for now"})
            held = gs.keys.bundle
            now = time.time()
            mates = tuple(m for m in held.mates if m.identity != "alpha-1")
            dropped = dataclasses.replace(held, mates=mates)
            gs._adopt(RingContents.open(dropped, gs.token, now=now), None, now)
            assert [m.state for m in gs.store.history(peer="alpha-1")] == ["pending"]
            revoked = dataclasses.replace(dropped, revoked=dropped.revoked | {"alpha-1"})
            alerts = gs._adopt(RingContents.open(revoked, gs.token, now=now), None, now)
            assert [m.state for m in gs.store.history(peer="alpha-1")] == ["undeliverable"]
            assert alerts == [
                (
                    "revoked",
                    "alpha-1",
                    "alpha-1 is revoked (bundle from the AS); 1 message to it will not be "
                    "delivered (undeliverable)",
                )
            ]
            again = gs._adopt(RingContents.open(revoked, gs.token, now=now), None, now)
            assert again == []  # once
        finally:
            gs.store.close()

    asyncio.run(main())


def test_a_revocation_the_as_forgot_is_still_held_after_a_restart(
    site: Site, tmp_path: Path
) -> None:
    """The bundle file holds what the AS sent, which may have forgotten a revocation (an AS
    restored from a backup): the agent's state keeps it, so a restart does not undo it."""
    with site.open() as desk:
        desk.export("gs-1", tmp_path / "before.bundle", now=NOW)  # alpha-2 a mate
        desk.revoke("alpha-2", now=NOW)

    async def restored() -> bytes:
        return (tmp_path / "before.bundle").read_bytes()

    async def main() -> None:
        gs = _offline(site, tmp_path, "gs-1", restored)
        await gs._op_send({"to": "alpha-1", "text": "a mate"})
        try:
            gs.refresh.started()
            await gs._fetch_bundle()
            assert gs.refresh.state == "ok" and "alpha-2" not in gs.peers
        finally:
            gs.store.close()
        assert gs.config.bundle_path is not None
        token = gs.token
        on_file = open_bundle(gs.config.bundle_path.read_bytes(), token)
        assert "alpha-2" not in on_file.revoked  # what the AS sent, as it sent it
        again = Agent(gs.config, on_file, token)  # a restart on the same state folder
        try:
            assert "alpha-2" in again.bundle.revoked
            assert "alpha-2" not in again.peers and "alpha-2" not in again.keys.mates
            assert "alpha-1" in again.peers
        finally:
            again.store.close()

    asyncio.run(main())
