"""mDNS as a stranger on the LAN sees it: real zeroconf, bound to 127.0.0.1 only.

Other snrmesh agents may announce on this machine's loopback while the tests run, so each test
looks only at the tags it made (random keys).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh.agent.agent import Agent, AgentConfig
from mesh.discovery import discovery_tag
from mesh.discovery.mdns import SERVICE_TYPE, MdnsDiscovery
from mesh.sim import Simulation, free_ports

LOOPBACK = ["127.0.0.1"]


class Observer:
    """A stranger browsing for the service type: the instance names announced right now."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self._zc = AsyncZeroconf(interfaces=LOOPBACK)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self.names.discard(name)
        else:
            self.names.add(name)

    @property
    def zeroconf(self) -> Zeroconf:
        return self._zc.zeroconf

    async def close(self) -> None:
        await self._browser.async_cancel()
        await self._zc.async_close()


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _tags(count: int) -> list[str]:
    return [discovery_tag(os.urandom(32), "alpha-1") for _ in range(count)]


def test_an_advertisement_that_overlaps_the_previous_one_leaves_only_the_last_tag() -> None:
    """Two advertisements at once (an epoch roll and a new bundle within a second).

    The second unregistered the first before the first's probing ended and registered it, so
    the first tag stayed announced (and linkable to the next) for the rest of the run.
    """

    async def main() -> None:
        old, first, last = _tags(3)
        mine = {f"{tag}.{SERVICE_TYPE}" for tag in (old, first, last)}
        observer = Observer()
        discovery = MdnsDiscovery(interfaces=LOOPBACK, on_found=lambda *found: None)
        await discovery.async_start()
        try:
            await discovery.async_advertise(old, LOOPBACK, 7)
            one = asyncio.ensure_future(discovery.async_advertise(first, LOOPBACK, 7))
            await asyncio.sleep(0.1)
            await asyncio.gather(one, discovery.async_advertise(last, LOOPBACK, 7))
            expected = {f"{last}.{SERVICE_TYPE}"}
            await _until(lambda: observer.names & mine == expected, "only the last tag")
            await asyncio.sleep(1.5)  # (a late registration would show up by now)
            assert observer.names & mine == expected
        finally:
            await discovery.async_close()
            await observer.close()

    asyncio.run(main())


def test_an_agent_announces_a_tag_that_names_nothing_a_new_one_each_epoch_none_after(
    tmp_path: Path,
) -> None:
    """What a stranger resolves holds no identity, role or mission; at the epoch boundary the
    tag changes and the old one is withdrawn; past the mission's end nothing is announced.

    Past the end the last epoch's tag stayed announced for as long as the agent ran (and its
    preamble said it had no tag at all)."""
    with Simulation(["alpha-1", "gs-1"], workdir=tmp_path, hours=2, epoch_hours=1) as sim:
        sim.provision()
        node = sim.nodes["alpha-1"]
        token, bundle = node.unlock()
    mission = bundle.mission
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    async def main() -> None:
        nonlocal offset
        observer = Observer()
        config = AgentConfig(
            state_dir=node.state,
            listen=("127.0.0.1", 0),
            mdns_interfaces=("127.0.0.1",),  # never beyond loopback
        )
        agent = Agent(config, bundle, token, clock=clock)
        await agent.start()
        try:
            tags = [agent._tag(clock())]
            name = f"{tags[0]}.{SERVICE_TYPE}"
            await _until(lambda: name in observer.names, "the first epoch's tag")
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            assert await info.async_request(observer.zeroconf, 3000)
            assert info.properties == {b"v": b"1"}
            assert info.server == f"{tags[0]}.local."
            assert info.port == agent.listen_address[1]
            announced = repr((info.name, info.server, info.properties, info.text)).lower()
            for secret in ("alpha", "gs-1", "soldier", "simulation", mission.mission_id.hex()):
                assert secret not in announced

            offset = mission.epoch_at(clock()).end + 1 - time.time()  # type: ignore[union-attr]
            tags.append(agent._tag(clock()))
            assert tags[1] != tags[0]
            announced_now = {f"{tag}.{SERVICE_TYPE}" for tag in tags}
            new = {f"{tags[1]}.{SERVICE_TYPE}"}
            await _until(lambda: observer.names & announced_now == new, "the tag to change")

            offset = mission.end + 1 - time.time()
            await _until(lambda: not observer.names & announced_now, "nothing past the end")
        finally:
            await agent.stop()
            await observer.close()

    asyncio.run(main())


def test_a_pointer_to_a_name_outside_the_service_type_is_ignored_without_an_error() -> None:
    """A stranger's PTR record may point anywhere: at a bare mate's tag, say. That reached
    zeroconf's ``ServiceInfo``, whose ``BadTypeInNameException`` escaped the resolving task
    (a traceback in the agent's log for each such packet)."""

    async def main() -> None:
        found: list[tuple[str, str, int]] = []
        discovery = MdnsDiscovery(interfaces=LOOPBACK, on_found=lambda *seen: found.append(seen))
        await discovery.async_start()
        try:
            tag = _tags(1)[0]
            discovery.set_tags({tag: "alpha-1"})
            assert discovery._zc is not None
            for name in (tag, f"{tag}.local.", f"x.{tag}.{SERVICE_TYPE}"):
                discovery._on_change(
                    discovery._zc.zeroconf, SERVICE_TYPE, name, ServiceStateChange.Added
                )
            tasks = list(discovery._tasks)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert results == [None] * len(tasks)
            assert found == []
        finally:
            await discovery.async_close()

    asyncio.run(main())


def test_every_announced_address_is_passed_on_and_a_failed_dial_tries_the_next(
    tmp_path: Path,
) -> None:
    """A host on several networks announces each of its addresses, not all reachable from a
    given mate (a container bridge, another LAN); only the first was ever dialled."""

    async def main() -> None:
        (tag,) = _tags(1)
        found: list[tuple[str, list[str], int]] = []
        announcer = MdnsDiscovery(interfaces=LOOPBACK, on_found=lambda *seen: None)
        browser = MdnsDiscovery(interfaces=LOOPBACK, on_found=lambda *seen: found.append(seen))
        await announcer.async_start()
        await browser.async_start()
        try:
            browser.set_tags({tag: "b"})
            await announcer.async_advertise(tag, ["127.0.0.9", "127.0.0.1"], 7717)
            browser.rescan()
            await _until(lambda: bool(found), "b's announcement")
            identity, addresses, port = found[0]  # (in the order the records came)
            assert (identity, sorted(addresses), port) == ("b", ["127.0.0.1", "127.0.0.9"], 7717)
        finally:
            await announcer.async_close()
            await browser.async_close()

    asyncio.run(main())

    (port,) = free_ports(1)  # nothing listens there, on either address
    with Simulation(["a", "b"], workdir=tmp_path / "sim") as sim:
        sim.provision()
        node = sim.nodes["a"]
        token, bundle = node.unlock()
        agent = Agent(AgentConfig(state_dir=node.state, mdns=False), bundle, token)
        try:
            agent._discovered("b", ["127.0.0.9", "127.0.0.1"], port)
            info = agent.peers["b"]
            assert info.address == ("127.0.0.9", port)

            async def dial() -> None:
                await agent._dial_mate(info, *info.address)  # refused: the next address

            asyncio.run(dial())
            assert info.address == ("127.0.0.1", port) and info.failures == 1
            asyncio.run(dial())
            assert info.address == ("127.0.0.9", port)  # round again
        finally:
            agent.store.close()
