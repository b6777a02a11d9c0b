"""Simulated missions: a throwaway desk and N real agent processes on loopback.

Used by ``snrmesh sim``, the multi-node tests and the mesh benchmark. Every
agent is a separate process (``python -m mesh.cli agent``) listening on
127.0.0.1, with mDNS off unless asked (and then bound to 127.0.0.1), so nothing
leaves the machine. Reachability follows a topology: each agent is given the
addresses of the mates it may reach (``--peer``, dialled by the lower identity
of each pair) and told to refuse links with the others (``--block``), so
traffic between unreachable mates must be relayed. Processes are stopped by
PID when the simulation closes, even after a test failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.agent.client import ControlClient
from mesh.errors import MeshError
from mesh.keyset.bundle import Bundle, open_bundle
from mesh.sim.topology import reachable_pairs, squads_of
from mesh.token.software import SoftwareToken
from provisioning.desk import Desk
from provisioning.plan import MissionPlan, PlannedNode

__all__ = ["SimError", "SimNode", "Simulation", "free_ports"]

PIN = "2468"
MAX_RUN_SECONDS = 86_400.0  # a demo's or a sim's wait: time.sleep cannot take much more
PASSPHRASE = "simulation desk (throwaway)"


class SimError(MeshError):
    """A simulated mission did not behave as expected in time."""


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held open together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class SimNode:
    identity: str
    role: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"  # where it listens (and announces, with mDNS)
    defaults: bool = False  # listen on 0.0.0.0, announce on every interface (the agent's defaults)
    wrapper: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "ns1"]
    token_spec: str | None = None  # e.g. "pcsc:READER" for a card; None: the token file below

    @property
    def token(self) -> Path:
        return self.folder / "node.token"

    @property
    def bundle(self) -> Path:
        return self.folder / "node.bundle"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def control(self) -> Path:
        return self.folder / "state" / "control.sock"

    @property
    def log(self) -> Path:
        return self.folder / "agent.log"

    def client(self, timeout: float = 10.0) -> ControlClient:
        return ControlClient(str(self.control), timeout=timeout)

    def unlock(self) -> tuple[SoftwareToken, Bundle]:
        """Its token, PIN verified, and its bundle opened: to run its agent in this process."""
        token = SoftwareToken(self.token)
        token.verify_pin(PIN)
        return token, open_bundle(self.bundle.read_bytes(), token)

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        with self.client() as client:
            return client.request(op, **args)


class Simulation:
    """A provisioned mission whose agents run as local processes."""

    def __init__(
        self,
        identities: Sequence[str] | int,
        *,
        topology: str = "full",
        cuts: Sequence[tuple[str, str]] = (),
        groups: dict[str, Sequence[str]] | None = None,
        roles: dict[str, str] | None = None,
        workdir: str | Path | None = None,
        mdns: bool = False,
        hours: float = 24.0,
        epoch_hours: float = 6.0,
        heartbeat: float = 30.0,
    ) -> None:
        if isinstance(identities, int):
            identities = [f"node-{i:02d}" for i in range(1, identities + 1)]
        self.identities = list(identities)
        self.topology = topology
        self.reach = reachable_pairs(topology, self.identities, cuts)
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="snrmesh-sim-"))
        self.mdns = mdns
        self.heartbeat = heartbeat
        roles = roles or {}
        ports = free_ports(len(self.identities))
        self.nodes = {
            name: SimNode(name, roles.get(name, "soldier"), port, self.workdir / name)
            for name, port in zip(self.identities, ports, strict=True)
        }
        if groups is None:
            groups = {"all": self.identities}
            if topology == "squads":
                for i, squad in enumerate(squads_of(self.identities)):
                    if len(squad) > 1:
                        groups[f"squad-{i + 1}"] = squad
        self.groups = groups
        self._hours = hours
        self._epoch_hours = epoch_hours
        self.desk_dir = self.workdir / "desk"

    def _mates(self, a: str, b: str) -> bool:
        """Dialogue mates: the mission has no explicit pairs, so a shared group."""
        return any(a in m and b in m for m in self.groups.values())

    # -- provisioning -------------------------------------------------------------------------

    def provision(self, *, now: float | None = None) -> None:
        now_s = int(now if now is not None else time.time())
        plan = MissionPlan(
            nodes=tuple(PlannedNode(n.identity, n.role) for n in self.nodes.values()),
            groups=tuple((g, tuple(m)) for g, m in self.groups.items() if len(m) >= 2),
            pairs=(),
        )
        with Desk.init(
            self.desk_dir,
            passphrase=PASSPHRASE,
            name="simulation",
            start=now_s - 60,
            end=now_s + int(self._hours * 3600),
            epoch_seconds=int(self._epoch_hours * 3600),
            now=now_s,
        ) as desk:
            desk.apply(plan, now=now_s)
            for node in self.nodes.values():
                node.folder.mkdir(parents=True, exist_ok=True)
                desk.personalise(node.identity, token_path=node.token, pin=PIN, now=now_s)
            desk.issue(now=now_s)
            for node in self.nodes.values():
                desk.export(node.identity, node.bundle, now=now_s)

    def desk(self) -> Desk:
        return Desk.open(self.desk_dir, passphrase=PASSPHRASE)

    # -- processes -----------------------------------------------------------------------------

    def agent_args(self, node: SimNode, *, topology: bool = True) -> list[str]:
        args = [
            *node.wrapper,
            *(sys.executable, "-m", "mesh.cli", "agent"),
            *("--bundle", str(node.bundle), "--token", node.token_spec or str(node.token)),
            *("--state", str(node.state)),
            *("--listen", f"{'0.0.0.0' if node.defaults else node.host}:{node.port}"),
            *("--heartbeat", str(self.heartbeat)),
        ]
        if not self.mdns:
            args += ["--no-mdns"]
        elif not node.defaults:
            args += ["--mdns-interface", node.host]
        for other in self.nodes.values():
            if other is node or not topology:
                continue
            if frozenset((node.identity, other.identity)) in self.reach:
                if not self.mdns and node.identity < other.identity:
                    args += ["--peer", f"{other.identity}@{other.host}:{other.port}"]
            elif self._mates(node.identity, other.identity):  # (no link to cut otherwise)
                args += ["--block", other.identity]
        return args + node.extra

    def start(
        self,
        *names: str,
        extra: Sequence[str] = (),
        topology: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start agents (all by default); ``topology=False`` leaves out its --peer/--block."""
        for name in names or list(self.nodes):
            node = self.nodes[name]
            if node.process is not None and node.process.poll() is None:
                continue
            node.extra = list(extra)
            node.folder.mkdir(parents=True, exist_ok=True)
            log = open(node.log, "ab")  # noqa: SIM115 - handed to the child process
            node.process = subprocess.Popen(
                self.agent_args(node, topology=topology),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SNRMESH_PIN": PIN, **(env or {})},
            )
            log.close()
        for name in names or list(self.nodes):
            self.wait_for(functools.partial(self._answers, name), 20.0, f"{name}'s control socket")

    def _answers(self, name: str) -> bool:
        node = self.nodes[name]
        if node.process is not None and node.process.poll() is not None:
            raise SimError(
                f"agent {name} exited with {node.process.returncode}: "
                f"{node.log.read_text()[-2000:]}"
            )
        try:
            node.request("hello")
        except MeshError:
            return False
        return True

    def stop(self, name: str, *, kill: bool = False) -> None:
        node = self.nodes[name]
        process = node.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def close(self) -> None:
        for name in self.nodes:
            with contextlib.suppress(Exception):
                self.stop(name)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observing ----------------------------------------------------------------------------

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``predicate`` until true; return the seconds it took, or raise SimError."""
        start = time.monotonic()
        while True:
            try:
                if predicate():
                    return time.monotonic() - start
            except SimError:
                raise
            except (MeshError, OSError):
                pass
            if time.monotonic() - start > timeout:
                raise SimError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def peer_states(self, name: str) -> dict[str, str]:
        return {p["identity"]: p["state"] for p in self.nodes[name].request("peers")["peers"]}

    def expected_links(self, name: str) -> set[str]:
        return {other for pair in self.reach if name in pair for other in pair if other != name}

    def links_up(self) -> bool:
        return all(
            {p for p, s in self.peer_states(n).items() if s == "direct"} >= self.expected_links(n)
            for n in self.nodes
            if self.nodes[n].process is not None
        )

    def history(self, name: str, **args: Any) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.nodes[name].request("history", **args)["messages"]
        return messages

    def rss_mib(self, name: str) -> float | None:
        process = self.nodes[name].process
        if process is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return None
