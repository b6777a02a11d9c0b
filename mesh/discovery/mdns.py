"""mDNS/DNS-SD discovery with ``zeroconf``: advertise our tag, browse for mates' tags.

The service type is ``_snrmesh._tcp.local.``. The instance name and the host
name are the epoch's discovery tag (``mesh.discovery.tags``); the TXT record
carries only the protocol version. Nothing in the advertisement names the
node, its role or the mission. Browsing resolves every instance, maps its tag
through the caller's tag map and reports ``(identity, host, port)``; unknown
tags (other missions, strangers) are ignored.

``interfaces`` is passed to zeroconf as is: ``None`` means all interfaces
(the field default); tests and demos pass ``["127.0.0.1"]`` so that nothing
leaves the machine. All methods run on the event loop (``async_*``).

The address records say where to dial: the caller's, or for an agent listening
on every address, :func:`local_addresses` (a mate that dialled 127.0.0.1 would
reach itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = ["SERVICE_TYPE", "MdnsDiscovery", "local_addresses"]

SERVICE_TYPE = "_snrmesh._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
MAX_ADDRESSES = 16  # of one mate's, tried in turn (a stranger's record may list hundreds)
MAX_SEEN = 4096  # instance names remembered for rescans (a hostile LAN cannot grow us)

Found = Callable[[str, list[str], int], None]  # identity, its announced addresses, port


def local_addresses() -> list[str]:
    """This machine's IPv4 addresses, loopback only when it has no other."""
    found = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4}
    outside = sorted(str(a) for a in found if not ipaddress.IPv4Address(a).is_loopback)
    return outside or ["127.0.0.1"]


class MdnsDiscovery:
    def __init__(self, *, interfaces: list[str] | None, on_found: Found) -> None:
        self._interfaces = interfaces
        self._on_found = on_found
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        # one advertisement at a time: registering probes for a second or so, and one that
        # overlapped the next registered its tag after the next had unregistered it
        self._advertising = asyncio.Lock()
        self._tags: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: set[str] = set()

    async def async_start(self) -> None:
        kwargs: dict[str, object] = {"ip_version": IPVersion.V4Only}
        if self._interfaces is not None:
            kwargs["interfaces"] = self._interfaces
        self._zc = AsyncZeroconf(**kwargs)  # type: ignore[arg-type]
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )

    async def async_advertise(self, tag: str, addresses: list[str], port: int) -> None:
        """(Re-)advertise under ``tag`` (a new tag each epoch), reachable at ``addresses``."""
        async with self._advertising:
            if self._zc is None:
                return
            await self._async_unregister()
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{tag}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(address) for address in addresses],
                port=port,
                properties={"v": "1"},
                server=f"{tag}.local.",
            )
            await self._zc.async_register_service(self._info, allow_name_change=False)

    async def async_withdraw(self) -> None:
        """Announce nothing (no tag for now: the mission is over)."""
        async with self._advertising:
            await self._async_unregister()

    async def _async_unregister(self) -> None:
        if self._zc is not None and self._info is not None:
            with contextlib.suppress(Exception):
                await self._zc.async_unregister_service(self._info)
        self._info = None

    def set_tags(self, tags: dict[str, str]) -> None:
        """``{tag: identity}`` of the mates we recognise this epoch."""
        self._tags = dict(tags)

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._seen.discard(name)
            return
        if len(self._seen) < MAX_SEEN:
            self._seen.add(name)
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        tag, _, rest = name.partition(".")  # a stranger's pointer may name anything
        identity = self._tags.get(tag) if rest == service_type else None
        if identity is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if addresses and info.port:  # (a host on several networks announces each address)
            self._on_found(identity, addresses[:MAX_ADDRESSES], info.port)

    def rescan(self) -> None:
        """Resolve every instance seen so far again (after the tag map changed)."""
        if self._zc is None:
            return
        for name in list(self._seen):
            self._on_change(self._zc.zeroconf, SERVICE_TYPE, name, ServiceStateChange.Added)

    async def async_close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._zc is None:
            return
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        with contextlib.suppress(Exception):
            await self._zc.async_close()
        self._zc = None
