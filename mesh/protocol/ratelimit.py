"""Token buckets per source, for work a stranger can make us do (ticket unwraps).

Opening a ticket goes through the secure element (on a smartcard, tens of
milliseconds) before anything proves the sender holds a key, so each source
gets a small bucket, and one shared bucket caps the total: source addresses
can be spoofed on datagrams, and a per-source limit alone would then not
bound the work. The table of sources is bounded too (least recently used go).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from mesh.protocol.errors import LocalProtocolError

__all__ = ["MAX_SOURCES", "RateLimiter", "TokenBucket"]

MAX_SOURCES = 4096


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; ``take`` spends one (or ``cost``)."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float, cost: float = 1.0) -> bool:
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class RateLimiter:
    """At most ``rate``/s per source (bursts of ``burst``), and ``total_rate``/s in all."""

    __slots__ = ("_buckets", "_burst", "_max_sources", "_rate", "_total")

    def __init__(
        self,
        *,
        rate: float = 1.0,
        burst: int = 4,
        total_rate: float = 20.0,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        if not (rate > 0 and burst >= 1 and total_rate > 0 and 0 < max_sources <= MAX_SOURCES):
            raise LocalProtocolError("rate limiter settings out of range")
        self._rate = rate
        self._burst = float(burst)
        self._max_sources = max_sources
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._total = TokenBucket(total_rate, total_rate, total_rate, float("-inf"))

    def allow(self, source: Hashable, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, self._burst, now)
            self._buckets[source] = bucket
            if len(self._buckets) > self._max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
        return bucket.take(now) and self._total.take(now)
