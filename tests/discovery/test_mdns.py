"""mDNS as a stranger on the LAN sees it: real zeroconf, bound to 127.0.0.1 only.

Other snrmesh agents may announce on this machine's loopback while the tests run, so each test
looks only at the tags it made (random keys).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

from mesh.discovery import discovery_tag
from mesh.discovery.mdns import SERVICE_TYPE, MdnsDiscovery

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
