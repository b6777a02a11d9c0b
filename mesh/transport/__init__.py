"""asyncio adapters that carry sessions over sockets."""

from __future__ import annotations

from mesh.transport.tcp import PREAMBLE_SIZE, Link, LinkOwner, read_preamble, write_preamble

__all__ = ["PREAMBLE_SIZE", "Link", "LinkOwner", "read_preamble", "write_preamble"]
