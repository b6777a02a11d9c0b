"""Real multicast mDNS between three hosts: network namespaces on a bridge (root only).

The namespaces, the bridge and the veth pairs are created by this test inside
namespaces it owns (each veth is created directly in its namespace), and
deleted afterwards; no interface of the machine itself is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from mesh.sim import Simulation

MakeSim = Callable[..., Simulation]
SUBNET = "10.213.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip')"
    probe = f"snrm-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create network namespaces here: {exc}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    tag = f"snrm{os.getpid() % 100000}"
    bridge = f"{tag}-br"
    hosts = [f"{tag}-h{i}" for i in (1, 2, 3)]
    made: list[str] = []
    try:
        for ns in (bridge, *hosts):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(hosts, 1):
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                bridge,
            )
            _ip("-n", bridge, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_three_hosts_discover_each_other_by_multicast_mdns_and_chat(
    make_sim: MakeSim, namespaces: list[str]
) -> None:
    sim = make_sim(["gs-1", "alpha-1", "uav-1"], mdns=True)
    for i, (name, ns) in enumerate(zip(sim.nodes, namespaces, strict=True), 1):
        node = sim.nodes[name]
        node.host = f"{SUBNET}.{i}"
        node.wrapper = ["ip", "netns", "exec", ns]
    sim.provision()
    sim.start()
    sim.wait_for(sim.links_up, 60, "links found by multicast mDNS across the bridge")
    for name in sim.nodes:
        assert "--peer" not in sim.agent_args(sim.nodes[name])
    sent = sim.nodes["gs-1"].request("send", group="all", text="net check")
    for name in ("alpha-1", "uav-1"):
        sim.wait_for(
            lambda name=name: any(m["id"] == sent["message_id"] for m in sim.history(name)),
            20,
            f"{name} to receive over the bridge",
        )


def test_with_the_default_listen_and_interfaces_mates_on_other_hosts_link_up(
    make_sim: MakeSim, namespaces: list[str]
) -> None:
    """``--listen 0.0.0.0`` and no ``--mdns-interface``: each announces its own addresses.

    It announced 127.0.0.1 (the fallback for a wildcard listen without an interface), so a
    mate on another host dialled itself and no link ever came up.
    """
    sim = make_sim(["gs-1", "alpha-1", "uav-1"], mdns=True)
    for i, (name, ns) in enumerate(zip(sim.nodes, namespaces, strict=True), 1):
        node = sim.nodes[name]
        node.host, node.defaults = f"{SUBNET}.{i}", True
        node.wrapper = ["ip", "netns", "exec", ns]
    sim.provision()
    sim.start()
    args = sim.agent_args(sim.nodes["gs-1"])
    assert "--mdns-interface" not in args and f"0.0.0.0:{sim.nodes['gs-1'].port}" in args
    sim.wait_for(sim.links_up, 30, "links found by mDNS with the agent's defaults")
