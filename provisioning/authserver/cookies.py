"""Admission control: stateless cookies, pending-challenge caps, rate limits.

A HELLO costs the AS a store read, key unsealing, an HKDF and (if it goes on)
an X25519 handshake. To recover from a flood, without state per stranger:

* **cookie** -- from ``cookie_threshold`` pending challenges from one source on,
  a HELLO without a valid cookie gets ``COOKIE`` = HMAC-SHA256(secret, source ||
  client nonce) (16 bytes) and nothing is remembered; the client repeats its
  HELLO with it. The secret is rotated every ``cookie_lifetime`` seconds; the
  previous one is still accepted, so a cookie is good for one to two periods.
* **busy** -- at ``max_pending`` challenges in all, ``REFUSE busy`` with a
  ``retry-after`` of ``busy_retry_after`` (the clients' full jitter spreads the
  retries; the backlog cannot grow past the cap, so there is nothing to scale by).
* **rate limits** -- token buckets per source (HELLOs) and per identity (keyset
  requests, counted only once authenticated so that nobody can starve a meter
  by sending HELLOs in its name); refusals say when to retry.

Tables are bounded (least recently used sources go first). Pure: time is passed in.
"""

from __future__ import annotations

import hmac
import math
from collections import OrderedDict
from dataclasses import dataclass

from mesh.crypto import hmac_sha256, random_bytes
from mesh.protocol.ratelimit import TokenBucket
from provisioning.authserver.errors import LocalAuthError, Refusal
from provisioning.authserver.messages import MAX_RETRY_AFTER, CookieReply, Hello, Refuse

__all__ = ["COOKIE_SIZE", "Admission", "AdmissionConfig", "CookieJar", "KeyedLimiter"]

COOKIE_SIZE = 16
MAX_TRACKED = 65_536


class CookieJar:
    """Stateless cookies under a secret rotated every ``lifetime`` seconds."""

    __slots__ = ("_current", "_lifetime", "_previous", "_rotated")

    def __init__(self, *, lifetime: float = 120.0, now: float) -> None:
        if not lifetime > 0:
            raise LocalAuthError("cookie lifetime must be positive")
        self._lifetime = lifetime
        self._current = random_bytes(32)
        self._previous = self._current
        self._rotated = now

    def _rotate(self, now: float) -> None:
        if now - self._rotated >= self._lifetime:
            periods = (now - self._rotated) // self._lifetime
            # after two or more idle periods the previous secret is stale too
            self._previous = self._current if periods == 1 else random_bytes(32)
            self._current = random_bytes(32)
            self._rotated += periods * self._lifetime

    @staticmethod
    def _mac(secret: bytes, source: str, nonce: bytes) -> bytes:
        return hmac_sha256(secret, source.encode() + b"\x00" + nonce)[:COOKIE_SIZE]

    def make(self, source: str, nonce: bytes, now: float) -> bytes:
        self._rotate(now)
        return self._mac(self._current, source, nonce)

    def check(self, source: str, nonce: bytes, cookie: bytes, now: float) -> bool:
        self._rotate(now)
        return any(
            hmac.compare_digest(self._mac(secret, source, nonce), cookie)
            for secret in (self._current, self._previous)
        )


class KeyedLimiter:
    """A token bucket per key (bounded table); :meth:`wait` says how long until allowed."""

    __slots__ = ("_buckets", "_burst", "_rate")

    def __init__(self, *, rate: float, burst: float) -> None:
        if not (rate > 0 and burst >= 1):
            raise LocalAuthError("rate limits must be positive")
        self._rate, self._burst = rate, burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait(self, key: str, now: float, cost: float = 1.0) -> float | None:
        """None if allowed now (``cost`` tokens spent, a burst at most), else seconds to wait."""
        cost = min(cost, self._burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, self._burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > MAX_TRACKED:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if bucket.take(now, cost):
            return None
        return (cost - bucket.tokens) / self._rate


# a bundle weighs a burst of keysets: it mints a CK per mate and epoch and wraps a discovery
# key per epoch left (a year of daily epochs: ~35 ms of the AS's CPU, against ~2 for a keyset)
BUNDLE_COST = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionConfig:
    cookie_threshold: int = 500
    cookie_lifetime: float = 120.0
    max_pending: int = 5000
    busy_retry_after: float = 1.0
    source_rate: float = 2000.0
    source_burst: float = 4000.0
    identity_rate: float = 1.0
    identity_burst: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.cookie_threshold <= self.max_pending:
            raise LocalAuthError("cookie_threshold must be in 1..max_pending")


class Admission:
    """Decides, per HELLO and per keyset request, whether to spend work on it."""

    __slots__ = ("_config", "_cookies", "_identities", "_pending", "_sources", "stats", "total")

    def __init__(self, config: AdmissionConfig, *, now: float) -> None:
        self._config = config
        self._cookies = CookieJar(lifetime=config.cookie_lifetime, now=now)
        self._sources = KeyedLimiter(rate=config.source_rate, burst=config.source_burst)
        self._identities = KeyedLimiter(rate=config.identity_rate, burst=config.identity_burst)
        self._pending: dict[str, int] = {}
        self.total = 0
        self.stats = {"hello": 0, "cookie": 0, "busy": 0, "rate_limited": 0, "admitted": 0}

    def pending(self, source: str) -> int:
        return self._pending.get(source, 0)

    def hello(self, source: str, hello: Hello, now: float) -> Refuse | CookieReply | None:
        """None admits the HELLO (one more pending challenge); else what to answer."""
        config, stats = self._config, self.stats
        stats["hello"] += 1
        if self.total >= config.max_pending:
            stats["busy"] += 1
            return Refuse(Refusal.BUSY, config.busy_retry_after)
        pending = self._pending.get(source, 0)
        if pending >= config.cookie_threshold and not (
            hello.cookie is not None
            and self._cookies.check(source, hello.client_nonce, hello.cookie, now)
        ):
            stats["cookie"] += 1
            return CookieReply(self._cookies.make(source, hello.client_nonce, now))
        wait = self._sources.wait(source, now)
        if wait is not None:
            stats["rate_limited"] += 1
            return Refuse(Refusal.RATE_LIMITED, _retry_after(wait))
        stats["admitted"] += 1
        self._pending[source] = pending + 1
        self.total += 1
        return None

    def finished(self, source: str) -> None:
        """An admitted challenge ended (answered, failed or timed out)."""
        pending = self._pending.get(source, 0) - 1
        if pending <= 0:
            self._pending.pop(source, None)
        else:
            self._pending[source] = pending
        self.total = max(0, self.total - 1)

    def request(self, identity: str, now: float, cost: float = 1.0) -> float | None:
        """None if an authenticated identity may have one more keyset now, else retry-after.

        ``cost``: what the request weighs in keysets (a bundle: :data:`BUNDLE_COST`).
        """
        wait = self._identities.wait(identity, now, cost)
        if wait is not None:
            self.stats["rate_limited"] += 1
            return _retry_after(wait)
        return None


def _retry_after(wait: float) -> float:
    """A limiter's wait as a retry-after every client accepts: 1 ms to MAX_RETRY_AFTER.

    A very low rate (``--identity-rate 0.0001``) waits longer than a client would
    decode; it comes back at the bound and is refused again then.
    """
    return min(max(math.ceil(wait * 1000) / 1000, 0.001), MAX_RETRY_AFTER)
