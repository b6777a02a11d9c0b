"""Times as operators read them: ISO 8601 in UTC, to the second."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc_iso"]


def utc_iso(posix_seconds: float) -> str:
    return datetime.fromtimestamp(posix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
