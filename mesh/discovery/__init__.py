"""Finding dialogue mates on the local network (mDNS/DNS-SD) without revealing them."""

from __future__ import annotations

from mesh.discovery.tags import TAG_LENGTH, discovery_tag, tag_map

__all__ = ["TAG_LENGTH", "discovery_tag", "tag_map"]
