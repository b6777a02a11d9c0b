"""The asyncio client of an Authentication Server: one attempt, or attempts with backoff.

A thin pump around :class:`ClientSession`. :func:`request_keysets` retries what
the AS refused temporarily (``busy``, ``rate-limited``, ``unavailable``, a lost
connection) with **full jitter**: attempt *n* waits a random time in
``[0, min(cap, base * 2**n)]`` (and at least the server's ``retry-after``), so a
fleet that lost its AS does not come back in lockstep. A device that just
powered up first waits a random ``startup_delay`` for the same reason.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from mesh.agent.refresh import BundleSource, UplinkError
from mesh.backoff import full_jitter
from mesh.crypto import random_bytes
from mesh.errors import MeshError
from mesh.token import SecureElement
from provisioning.authserver.errors import (
    AttemptsExhausted,
    AuthRefused,
    AuthServerError,
    BundleRefused,
    Refusal,
    explain,
)
from provisioning.authserver.messages import BundleRequest, KeysetRequest
from provisioning.authserver.protocol import (
    Authenticated,
    BundleFetched,
    ClientEvent,
    ClientSession,
    Granted,
    LinkFailed,
    Refused,
)

__all__ = [
    "Backoff",
    "FetchedBundle",
    "Outcome",
    "agent_bundle_source",
    "attempt",
    "fetch_bundle",
    "request_keysets",
]

TEMPORARY = frozenset({Refusal.BUSY, Refusal.RATE_LIMITED, Refusal.UNAVAILABLE})


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Full-jitter exponential backoff (seconds); ``attempts`` bounds the loop."""

    base: float = 0.2
    cap: float = 30.0
    attempts: int = 8
    startup_delay: float = 0.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return full_jitter(attempt, base=self.base, cap=self.cap, rng=rng)


@dataclass(slots=True)
class Outcome:
    """What a request run ended with, and what it cost (attempts, cookies, refusals)."""

    events: list[ClientEvent] = field(default_factory=list)
    attempts: int = 0
    cookies: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    started: float | None = None  # perf_counter() at the first attempt, after the power-up wait

    @property
    def grants(self) -> list[Granted]:
        return [e for e in self.events if isinstance(e, Granted)]

    @property
    def bundles(self) -> list[BundleFetched]:
        return [e for e in self.events if isinstance(e, BundleFetched)]

    @property
    def authenticated(self) -> Authenticated | None:
        """The last authentication (a retry may have changed the keys again)."""
        return next((e for e in reversed(self.events) if isinstance(e, Authenticated)), None)


class _ClientProtocol(asyncio.Protocol):
    """The pump of one attempt: the session's bytes out, the socket's bytes in.

    An ``asyncio.Protocol``, like the server's: no stream reader or writer and
    no task per read. ``done`` resolves when the session finished or the
    connection ended, whichever comes first.
    """

    def __init__(
        self, session: ClientSession, clock: Callable[[], float], done: asyncio.Future[None]
    ) -> None:
        self._session = session
        self._clock = clock
        self._done = done
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses)
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._session.data_to_send())

    def data_received(self, data: bytes) -> None:
        session, transport = self._session, self._transport
        if transport is None or session.finished:
            return
        session.receive_data(data, self._clock())
        out = session.data_to_send()
        if out:
            transport.write(out)
        if session.finished:
            transport.close()  # after the bytes just written
            self._end()

    def eof_received(self) -> bool:
        self._session.connection_lost()  # LinkFailed unless the session had finished
        self._end()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._session.connection_lost()
        self._end()

    def _end(self) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def attempt(
    host: str,
    port: int,
    session: ClientSession,
    *,
    timeout: float = 30.0,
    local_addr: tuple[str, int] | None = None,
    clock: Callable[[], float] = time.time,
) -> list[ClientEvent]:
    """Run one session over one TCP connection; returns its events."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: _ClientProtocol(session, clock, done), host, port, local_addr=local_addr
            )
            await done
    except TimeoutError:
        session.connection_lost(f"no answer within {timeout:g} s")
    except ConnectionRefusedError:
        session.connection_lost(f"connection refused by {host}:{port} (is an AS serving there?)")
    except OSError as exc:  # records LinkFailed unless the session had finished
        session.connection_lost(exc.strerror or str(exc) or type(exc).__name__)
    finally:
        if transport is not None:
            transport.close()
    return _events(session)


def _events(session: ClientSession) -> list[ClientEvent]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


async def request_keysets(
    host: str,
    port: int,
    token: SecureElement,
    requests: Sequence[KeysetRequest | BundleRequest],
    *,
    backoff: Backoff = Backoff(),
    rng: random.Random | None = None,
    local_addr: tuple[str, int] | None = None,
    timeout: float = 30.0,
    outcome: Outcome | None = None,
) -> Outcome:
    """Authenticate and fetch ``requests``, retrying temporary refusals with full jitter.

    Raises :class:`AuthRefused` for a permanent refusal of the link (a request
    refused by policy is an event, not an error) and :class:`AuthServerError`
    when the attempts run out. ``outcome``, if given, is filled in as the
    attempts go, so a caller also learns what a run that raised cost.
    """
    rng = rng or random.Random()
    outcome = Outcome() if outcome is None else outcome
    if backoff.startup_delay > 0:
        await asyncio.sleep(rng.uniform(0.0, backoff.startup_delay))
    outcome.started = time.perf_counter()
    wanted = list(requests)
    last_failure: str | None = None  # why the last link broke, for the final error
    turned_away = False  # the last attempt was answered, with a temporary refusal
    retry_after: float | None = None  # when the AS last said to come back
    for n in range(backoff.attempts):
        outcome.attempts += 1
        # the same request ids on every attempt (the AS issues a retransmit again: the same CK)
        session = ClientSession(token, wanted)
        events = await attempt(host, port, session, local_addr=local_addr, timeout=timeout)
        outcome.cookies += session.cookie_used
        outcome.events.extend(e for e in events if not isinstance(e, LinkFailed | Refused))
        refusal = next((e for e in events if isinstance(e, Refused) and e.request_id is None), None)
        # a request refused for good is an answer; one rate-limited is asked again
        final = [
            e
            for e in events
            if isinstance(e, Refused) and e.request_id and e.refusal not in TEMPORARY
        ]
        outcome.events.extend(final)
        temporary = next(
            (
                explain(e.refusal, e.retry_after)
                for e in events
                if isinstance(e, Refused) and e.request_id and e.refusal in TEMPORARY
            ),
            None,
        )
        turned_away = temporary is not None
        last_failure = temporary or last_failure
        answered = (
            {e.grant.request_id for e in events if isinstance(e, Granted)}
            | {e.request_id for e in events if isinstance(e, BundleFetched)}
            | {e.request_id for e in final}
        )
        wanted = [r for r in wanted if r.request_id not in answered]
        failed = any(isinstance(e, LinkFailed) for e in events)
        if any(isinstance(e, LinkFailed) and e.refused for e in events):
            raise AuthRefused(Refusal.AUTH_FAILED)  # the same token gets the same refusal
        last_failure = next((e.reason for e in events if isinstance(e, LinkFailed)), last_failure)
        turned_away = turned_away and not failed
        if refusal is None and not failed and any(isinstance(e, Authenticated) for e in events):
            # a request refused for now (rate-limited, busy, the store unavailable): again
            retry_after = max(
                (
                    e.retry_after or 0.0
                    for e in events
                    if isinstance(e, Refused) and e.request_id and e.refusal in TEMPORARY
                ),
                default=None,
            )
            if not wanted or retry_after is None:
                return outcome
        else:
            retry_after = None
        if refusal is not None:
            turned_away = True
            last_failure = explain(refusal.refusal, refusal.retry_after)
            outcome.refusals.append(refusal.refusal)
            if refusal.refusal not in TEMPORARY:
                raise AuthRefused(refusal.refusal)
            retry_after = refusal.retry_after
        if n + 1 < backoff.attempts:
            await asyncio.sleep(max(retry_after or 0.0, backoff.delay(n, rng)))
    n = outcome.attempts
    attempts = f"{n} attempt{'s' * (n != 1)}"
    if turned_away:
        raise AttemptsExhausted(
            f"the Authentication Server turned this node away after {attempts} "
            f"(last: {last_failure})",
            retry_after,
        )
    raise AttemptsExhausted(
        f"no answer from the Authentication Server after {attempts}"
        + (f" (last: {last_failure})" if last_failure else ""),
        retry_after,
    )


@dataclass(frozen=True, slots=True, repr=False)
class FetchedBundle:
    """A node's bundle as the AS sent it (not yet opened), and how the link authenticated."""

    data: bytes
    authenticated: Authenticated | None


async def fetch_bundle(
    host: str,
    port: int,
    token: SecureElement,
    *,
    ahead: int,
    backoff: Backoff = Backoff(),
    timeout: float = 30.0,
) -> FetchedBundle:
    """Fetch this token's bundle (``BUNDLE-REQUEST``); ``as bundle`` and the agent's ``--as``.

    The caller holds the token (:meth:`SecureElement.exclusive`) with its PIN
    verified: the link may change its keys. Raises :class:`AuthRefused` when
    the AS refuses the link, :class:`BundleRefused` when it refuses the bundle
    (after the link's key change), :class:`AuthServerError` when the attempts
    run out.
    """
    outcome = await request_keysets(
        host,
        port,
        token,
        [BundleRequest(random_bytes(16), ahead)],
        backoff=backoff,
        timeout=timeout,
    )
    if not outcome.bundles:
        refused = next((e for e in outcome.events if isinstance(e, Refused)), None)
        if refused is None:  # pragma: no cover - request_keysets raises when nothing answered
            raise AuthServerError("no bundle from the Authentication Server")
        raise BundleRefused(token.info().identity, refused.refusal, refused.retry_after)
    return FetchedBundle(outcome.bundles[0].data, outcome.authenticated)


def agent_bundle_source(
    host: str, port: int, token: SecureElement, *, ahead: int, timeout: float = 30.0
) -> BundleSource:
    """The fetch of ``snrmesh agent --as``: one attempt per call, the agent schedules retries.

    The agent holds the token with its PIN verified; each fetch holds it against
    other processes without waiting (a busy token file is a failure retried later,
    not a stall of the agent's event loop).
    """

    async def fetch() -> bytes:
        try:
            with token.exclusive(wait=0):
                fetched = await fetch_bundle(
                    host, port, token, ahead=ahead, backoff=Backoff(attempts=1), timeout=timeout
                )
        except AuthRefused as exc:
            permanent = exc.refusal not in TEMPORARY
            raise UplinkError(str(exc), retry_after=exc.retry_after, permanent=permanent) from None
        except AttemptsExhausted as exc:  # no answer, or rate-limited: come back after
            raise UplinkError(str(exc), retry_after=exc.retry_after) from None
        except MeshError as exc:  # no answer, a link that broke, the token file busy
            raise UplinkError(str(exc)) from None
        return fetched.data

    return fetch
