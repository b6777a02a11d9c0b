"""Stateless cookies and rate limits (time passed in)."""

from __future__ import annotations

from provisioning.authserver.cookies import CookieJar, KeyedLimiter


def test_cookie_bound_to_source_and_nonce_and_expires_after_two_periods() -> None:
    jar = CookieJar(lifetime=120.0, now=0.0)
    cookie = jar.make("10.0.0.1", b"n" * 16, 10.0)
    assert jar.check("10.0.0.1", b"n" * 16, cookie, 100.0)
    assert not jar.check("10.0.0.2", b"n" * 16, cookie, 100.0)
    assert not jar.check("10.0.0.1", b"m" * 16, cookie, 100.0)
    assert jar.check("10.0.0.1", b"n" * 16, cookie, 200.0)  # previous secret still accepted
    assert not jar.check("10.0.0.1", b"n" * 16, cookie, 250.0)  # rotated twice


def test_keyed_limiter_says_when_to_retry() -> None:
    limiter = KeyedLimiter(rate=2.0, burst=2.0)
    assert limiter.wait("a", 0.0) is None and limiter.wait("a", 0.0) is None
    wait = limiter.wait("a", 0.0)
    assert wait is not None and 0.4 < wait <= 0.5
    assert limiter.wait("b", 0.0) is None
    assert limiter.wait("a", 0.6) is None
