"""Smart-meter fleets: factory keys, bulk enrolment, in-memory tokens, and a simulated fleet.

A fleet of a million meters cannot be enrolled like a squad: one token file
and one scrypt per node would cost a million files and ~1 CPU-day. So:

* **factory keys** -- each meter's generation-1 slot keys are diversified from
  one *factory seed* (the way card issuers diversify a master key):
  ``HKDF-SHA256(seed, salt = token id, info = "snrmesh meter factory keys v1")``,
  token id = ``HMAC-SHA256(seed, "token id" 0x00 identity)[:16]``. The manufacturer writes them
  into each meter's secure element; the AS store gets the same keys, sealed
  like every desk node's (ChaCha20-Poly1305 under the desk key, derived from
  the passphrase **once** per store, not per meter). Trade-off: whoever holds
  the seed knows every meter's first keys, so the seed belongs offline after
  enrolment, and the AS's first key change replaces them with keys the seed
  cannot predict.
* **bulk import** -- rows are generated and written in chunks
  (``executemany``), so memory holds one chunk, never the fleet.
* :class:`MemoryToken` -- a :class:`SecureElement` in memory, for the simulated
  fleet and tests (no files).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from jwcrypto import jwk
from jwcrypto.common import base64url_encode

from mesh.crypto import hkdf_sha256, hmac_sha256, random_bytes
from mesh.keyset import KeysetError, check_identity
from mesh.keyset.copies import decrypt_copy, read_wrapped_kid
from mesh.token import (
    KEY_SIZE,
    SLOT_COUNT,
    TOKEN_ID_SIZE,
    KeyChangeRefused,
    SecureElement,
    Slot,
    SlotInfo,
    TokenError,
    TokenInfo,
    UnwrapFailed,
    slot_kid,
)
from mesh.token.interface import DERIVE_INFO, MAX_DERIVE_CONTEXT, MAX_PIN_TRIES
from mesh.token.keychange import check_newer, key_change_kid, open_key_change
from provisioning.authserver.client import Backoff, Outcome, request_keysets
from provisioning.authserver.errors import AuthRefused, AuthServerError, LocalAuthError
from provisioning.authserver.messages import KeysetRequest
from provisioning.store import Store, audit_json

__all__ = [
    "FACTORY_SEED_SIZE",
    "METER_ROLE",
    "MemoryToken",
    "factory_keys",
    "import_meters",
    "meter_identity",
    "meter_source",
    "meter_token",
    "simulate_fleet",
]

FACTORY_SEED_SIZE = 32
FACTORY_INFO = b"snrmesh meter factory keys v1"
METER_ROLE = "meter"
IMPORT_CHUNK = 10_000
MAX_FLEET = 10_000_000
_MAC_SLOTS = frozenset({Slot.MAC, Slot.AUTH})


def meter_identity(prefix: str, index: int) -> str:
    return f"{prefix}-{index:07d}"


def factory_keys(seed: bytes, identity: str) -> tuple[bytes, tuple[bytes, ...]]:
    """A meter's token id and generation-1 slot keys, diversified from the factory seed."""
    if len(seed) != FACTORY_SEED_SIZE:
        raise LocalAuthError(f"a factory seed is {FACTORY_SEED_SIZE} bytes")
    token_id = hmac_sha256(seed, b"token id\x00" + identity.encode())[:TOKEN_ID_SIZE]
    okm = hkdf_sha256(seed, salt=token_id, info=FACTORY_INFO, length=KEY_SIZE * SLOT_COUNT)
    return token_id, tuple(okm[i * KEY_SIZE : (i + 1) * KEY_SIZE] for i in range(SLOT_COUNT))


class MemoryToken(SecureElement):
    """A secure element held in memory (simulated meters, tests). PIN-less: always unlocked."""

    __slots__ = ("_generations", "_info", "_keys", "identity", "role", "token_id")

    def __init__(
        self,
        *,
        token_id: bytes,
        identity: str,
        role: str,
        keys: tuple[bytes, ...],
        generation: int = 1,
    ) -> None:
        if len(keys) != SLOT_COUNT or any(len(k) != KEY_SIZE for k in keys):
            raise TokenError(f"a token needs {SLOT_COUNT} keys of {KEY_SIZE} bytes")
        self.token_id, self.identity, self.role = token_id, identity, role
        self._keys = tuple(keys)
        self._generations = (generation,) * SLOT_COUNT
        self._info: TokenInfo | None = None  # made on first use, again after a key change

    def clone(self) -> MemoryToken:
        """A bit-for-bit copy: what an attacker who copied the token holds."""
        twin = MemoryToken(
            token_id=self.token_id, identity=self.identity, role=self.role, keys=self._keys
        )
        twin._generations = self._generations
        return twin

    def info(self) -> TokenInfo:
        info = self._info
        if info is None:
            info = self._info = TokenInfo(
                token_id=self.token_id,
                identity=self.identity,
                role=self.role,
                slots=tuple(SlotInfo(Slot(i), g) for i, g in enumerate(self._generations)),
                pin_tries_left=MAX_PIN_TRIES,
            )
        return info

    def verify_pin(self, pin: str) -> None:
        return None

    def _kid(self, slot: Slot) -> str:
        return slot_kid(self.token_id, slot, self._generations[slot])

    def unwrap(self, copy: str) -> bytes:
        try:
            kid = read_wrapped_kid(copy)
        except KeysetError as exc:
            raise UnwrapFailed(f"not a wrapped key: {exc}") from None
        if not hmac.compare_digest(kid.encode(), self._kid(Slot.WRAP).encode()):
            raise UnwrapFailed("wrapped for another token or key generation")
        try:
            key = decrypt_copy(copy, jwk.JWK(kty="oct", k=base64url_encode(self._keys[Slot.WRAP])))
        except KeysetError:
            raise UnwrapFailed("wrapped key failed authentication") from None
        if len(key) != KEY_SIZE:
            raise UnwrapFailed("wrapped key is malformed")
        return key

    def mac(self, slot: Slot, data: bytes) -> bytes:
        if slot not in _MAC_SLOTS:
            raise TokenError(f"slot {slot.name} is not a MAC slot")
        return hmac_sha256(self._keys[slot], data)

    def verify_mac(self, slot: Slot, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(slot, data), tag)

    def derive(self, slot: Slot, context: bytes) -> bytes:
        if slot is not Slot.AUTH:
            raise TokenError(f"slot {slot.name} does not derive keys (only AUTH)")
        if len(context) > MAX_DERIVE_CONTEXT:
            raise TokenError(f"derive context over {MAX_DERIVE_CONTEXT} bytes")
        return hkdf_sha256(self._keys[slot], salt=None, info=DERIVE_INFO + context)

    def key_change(self, message: str) -> None:
        if key_change_kid(message) != self._kid(Slot.KEY_CHANGE):
            raise KeyChangeRefused("key change is for another token or key generation")
        change = open_key_change(message, current_key=self._keys[Slot.KEY_CHANGE])
        if not hmac.compare_digest(change.token_id, self.token_id):
            raise KeyChangeRefused("key change is for another token")
        check_newer(self._generations, change.generations)
        self._keys, self._generations = change.keys, change.generations
        self._info = None


def meter_token(seed: bytes, identity: str) -> MemoryToken:
    """The in-memory token of a meter as it left the factory."""
    token_id, keys = factory_keys(seed, identity)
    return MemoryToken(token_id=token_id, identity=identity, role=METER_ROLE, keys=keys)


Seal = Callable[[str, bytes, int, tuple[bytes, ...]], bytes]
MeterRow = tuple[str, str, bytes, int, bytes, int, int]


def meter_rows(
    seal: Seal, seed: bytes, prefix: str, first: int, count: int, now: int
) -> Iterator[MeterRow]:
    """The ``nodes`` rows of a fleet (identity, role, token id, generation, sealed keys, ...).

    ``seal``: the store's sealing of a node's keys (the desk's, or the AS's in PostgreSQL:
    the same key and format).
    """
    for index in range(first, first + count):
        identity = meter_identity(prefix, index)
        token_id, keys = factory_keys(seed, identity)
        # personalised = 1: the factory wrote the token
        yield (identity, METER_ROLE, token_id, 1, seal(identity, token_id, 1, keys), 1, now)


def fleet_detail(count: int, prefix: str, first: int, head_end: str | None) -> dict[str, Any]:
    """The ``import-meters`` audit row's detail: which meters, paired with whom."""
    return {
        "count": count,
        "first": meter_identity(prefix, first),
        "last": meter_identity(prefix, first + count - 1),
        "head_end": head_end,
    }


def check_fleet(count: int, prefix: str, first: int) -> None:
    """The bounds of a fleet import, checked before anything is written (the seed file too)."""
    if not 0 < count <= MAX_FLEET:
        raise LocalAuthError(f"--count must be 1..{MAX_FLEET:,} meters")
    if not 0 <= first <= MAX_METER_INDEX - count + 1:
        raise LocalAuthError(f"--first must be 0..{MAX_METER_INDEX - count + 1:,} for {count:,}")
    try:
        check_identity(meter_identity(prefix, first))
    except KeysetError as exc:
        raise LocalAuthError(f"meter prefix: {exc}") from None


def import_meters(
    store: Store,
    *,
    seed: bytes,
    count: int,
    now: int,
    prefix: str = "meter",
    first: int = 1,
    head_end: str | None = None,
    on_progress: Callable[[int], None] = lambda done: None,
) -> int:
    """Enrol ``count`` meters in one transaction, streamed in chunks; returns the count.

    With ``head_end``, each meter is paired with that node (its energy
    provider's head-end system), the only dialogue mate a meter needs.
    """
    check_fleet(count, prefix, first)
    db: sqlite3.Connection = store.db
    with store.transaction():
        # suspended by an AS that ran on this desk (its column exists only then), as the
        # PostgreSQL store checks too: a fleet paired with it would be refused every keyset
        as_ran = any(row[1] == "suspended_at" for row in db.execute("PRAGMA table_info(nodes)"))
        active = "revoked_at IS NULL" + (" AND suspended_at IS NULL" if as_ran else "")
        if (
            head_end is not None
            and db.execute(
                f"SELECT 1 FROM nodes WHERE identity = ? AND {active} AND role <> ?",
                (head_end, METER_ROLE),
            ).fetchone()
            is None
        ):
            raise LocalAuthError(
                f"head-end {head_end} is not an enrolled, active node (nor a meter)"
            )
        rows = meter_rows(store.seal_keys, seed, prefix, first, count, now)
        done = 0
        while chunk := list(islice(rows, IMPORT_CHUNK)):
            try:
                db.executemany(
                    "INSERT INTO nodes (identity, role, token_id, generation, sealed_keys, "
                    "personalised, enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    chunk,
                )
            except sqlite3.IntegrityError:
                raise LocalAuthError(
                    f"meters {chunk[0][0]}..{chunk[-1][0]} overlap nodes already enrolled"
                ) from None
            if head_end is not None:
                db.executemany(
                    "INSERT INTO pairs (a, b) VALUES (?, ?)",
                    [tuple(sorted((row[0], head_end))) for row in chunk],
                )
            done += len(chunk)
            on_progress(done)
        db.execute(
            "INSERT INTO audit (at, op, detail) VALUES (?, ?, ?)",
            (now, "import-meters", audit_json(fleet_detail(count, prefix, first, head_end))),
        )
    return count


def meter_source(index: int, sources: int) -> str:
    """The loopback address meter ``index`` connects from: ``sources`` concentrators."""
    n = index % sources
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


MAX_METER_INDEX = 10**12 - 1  # meter numbers stay short identities
MAX_SPREAD = 3600.0  # seconds a simulated meter may wait after power-up


async def simulate_fleet(
    host: str,
    port: int,
    *,
    seed: bytes,
    count: int,
    head_end: str,
    prefix: str = "meter",
    first: int = 1,
    storm: bool = False,
    spread: float = 5.0,
    sources: int = 8,
    backoff: Backoff | None = None,
    rng_seed: int | None = None,
    on_progress: Callable[[int], None] = lambda done: None,
) -> dict[str, Any]:
    """Power up ``count`` meters that each fetch one keyset; report what it took.

    ``storm``: every meter starts at once (the grid came back after an outage);
    otherwise each waits a random delay in ``[0, spread]`` after power-up.
    ``on_progress(done)`` follows each meter that is done, served or not.
    """
    if not 0 < count <= MAX_FLEET:
        raise LocalAuthError(f"--count must be 1..{MAX_FLEET:,}")
    if not 0 < sources <= 250 * 250:
        raise LocalAuthError(f"--sources must be 1..{250 * 250:,}")
    if not (math.isfinite(spread) and 0 <= spread <= MAX_SPREAD):
        raise LocalAuthError(f"--spread must be 0..{MAX_SPREAD:g} seconds")
    rng = random.Random(rng_seed)
    policy = backoff or Backoff(
        base=0.25, cap=8.0, attempts=12, startup_delay=0.0 if storm else spread
    )
    latencies: list[float] = []
    failures: dict[str, int] = {}
    totals = {"attempts": 0, "cookies": 0, "busy": 0, "rate_limited": 0, "key_changes": 0}
    started = time.perf_counter()

    done = 0

    async def meter(index: int) -> None:
        nonlocal done
        await serve(index)  # a meter cancelled (ctrl-C) is not counted done
        done += 1
        on_progress(done)

    async def serve(index: int) -> None:
        identity = meter_identity(prefix, index)
        token = meter_token(seed, identity)
        t0 = time.perf_counter()
        outcome = Outcome()  # what it cost, counted for the meters not served too
        try:
            await request_keysets(
                host,
                port,
                token,
                [KeysetRequest(random_bytes(16), head_end, "metering")],
                backoff=policy,
                rng=random.Random(rng.random()),
                local_addr=(meter_source(index, sources), 0),
                outcome=outcome,
            )
        except AuthServerError as exc:
            # the refusal's code when the AS refused, else why the attempts ran out
            key = exc.refusal.value if isinstance(exc, AuthRefused) else "no-answer"
            failures[key] = failures.get(key, 0) + 1
            return
        finally:
            totals["attempts"] += outcome.attempts
            totals["cookies"] += outcome.cookies
            totals["busy"] += sum(r.value == "busy" for r in outcome.refusals)
            totals["rate_limited"] += sum(r.value == "rate-limited" for r in outcome.refusals)
            auth = outcome.authenticated
            totals["key_changes"] += bool(auth and auth.key_changed)
        if outcome.grants:  # from the first attempt: the power-up wait is not the AS's
            latencies.append(time.perf_counter() - (outcome.started or t0))
        else:
            failures["no-keyset"] = failures.get("no-keyset", 0) + 1

    await asyncio.gather(*(meter(first + i) for i in range(count)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float | None:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 4)
            if latencies
            else None
        )

    return {
        "meters": count,
        "served": len(latencies),
        "failed": failures,
        "seconds": round(elapsed, 3),
        "p50_s": pct(0.50),
        "p99_s": pct(0.99),
        **totals,
    }
