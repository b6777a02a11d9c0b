"""``snrmesh as ...`` (the Authentication Server) and ``snrmesh meters ...`` (fleet simulation).

``desk import-meters`` lives with the desk's commands (``provisioning/cli.py``)
and calls :func:`cmd_import_meters` here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from mesh.cli.progress import progress
from mesh.cli.secrets import DESK_PASSPHRASE_ENV, PIN_ENV, read_secret
from mesh.crypto import random_bytes
from mesh.files import FileTooLarge, check_replaceable, create_private, read_bounded, write_atomic
from mesh.keyset import KeysetError, check_identity
from mesh.keyset.bundle import BUNDLE_MAGIC, open_bundle
from mesh.timefmt import utc_iso
from mesh.token.open import open_token
from mesh.transport.address import AddressError, parse_address
from provisioning.authserver import eventloop
from provisioning.authserver.client import Backoff, fetch_bundle, request_keysets
from provisioning.authserver.cookies import AdmissionConfig
from provisioning.authserver.errors import LocalAuthError, RemoteAuthError, explain
from provisioning.authserver.keystate import KeyPolicy
from provisioning.authserver.messages import (
    MAX_BUNDLE_AHEAD,
    MAX_EPOCH,
    MAX_PURPOSE_LENGTH,
    KeysetRequest,
)
from provisioning.authserver.meters import (
    FACTORY_SEED_SIZE,
    check_fleet,
    factory_keys,
    import_meters,
    meter_identity,
    simulate_fleet,
)
from provisioning.authserver.protocol import AuthService
from provisioning.authserver.server import (
    bound_socket,
    link_capacity,
    raise_file_limit,
    serve_forever,
)
from provisioning.authserver.store import CLONE_ALERT, SqliteKeyStateStore, SqlKeyStateStore
from provisioning.store import Store, desk_file

__all__ = ["add_import_meters_arguments", "cmd_import_meters", "register"]

AS_HELP = """\
The online Authentication Server (AS), for when a central server is reachable:
a node authenticates with its token (a challenge that may change its token
keys), then asks for a Communication Keyset with a dialogue mate and gets its
own copy and the mate's (the ticket). The AS serves the desk's store (SQLite,
or PostgreSQL to scale out over several workers). See docs/authentication-server.md.

  export SNRMESH_DESK_PASSPHRASE=... SNRMESH_PIN=...
  snrmesh as serve --store desk --listen 127.0.0.1:7450 &
  snrmesh as import-desk desk --postgres "host=/run/postgresql dbname=as"   # once
  snrmesh as import-desk desk --abandon --postgres DSN   # an import that never committed
  snrmesh as import-meters --postgres DSN --count 50000 --factory-seed f.seed   # more meters
  snrmesh as serve --postgres "host=/run/postgresql dbname=as" --workers 4 &
  snrmesh as request --as 127.0.0.1:7450 --token alpha-1.token --target gs-1
  snrmesh as bundle --as 127.0.0.1:7450 --token alpha-1.token --out alpha-1.bundle
  snrmesh as audit --store desk --alerts        # cloned tokens found (and suspended)
"""


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text, listening=True)  # (port 0: as serve's pick-one)
    except AddressError as exc:  # (its message says what is wrong: the port's range, ...)
        raise LocalAuthError(str(exc)) from None


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text, flush=True)
    return 0


def _factory_seed(path: str, *, create: bool) -> tuple[bytes, bool]:
    """The seed in ``path``, or with ``create`` a new one if there is none; True if made.

    Made exclusively: two runs that both found no file share the first one's seed.
    """
    if create and not os.path.exists(path):
        seed = random_bytes(FACTORY_SEED_SIZE)
        try:
            if create_private(path, seed):
                return seed, True
        except OSError as exc:
            raise LocalAuthError(f"cannot write factory seed {path!r}: {exc.strerror}") from None
        # another run made it meanwhile: its seed is the fleet's
    try:
        seed = read_bounded(path, FACTORY_SEED_SIZE, what="factory seed")
    except FileTooLarge:
        raise LocalAuthError(f"factory seed {path} is not {FACTORY_SEED_SIZE} bytes") from None
    except OSError as exc:
        raise LocalAuthError(f"cannot read factory seed {path}: {exc.strerror}") from None
    if len(seed) != FACTORY_SEED_SIZE:
        raise LocalAuthError(f"factory seed {path} is not {FACTORY_SEED_SIZE} bytes")
    return seed, False


# -- handlers ---------------------------------------------------------------------------------


def desk_passphrase(directory: str | None) -> str:
    """The desk passphrase, asked for once ``directory`` (if any) is known to hold a desk."""
    if directory is not None:
        desk_file(directory)
    return read_secret(DESK_PASSPHRASE_ENV, "Desk passphrase: ")


def _check_store_choice(args: argparse.Namespace) -> None:
    """Before any passphrase prompt: exactly one of --store and --postgres."""
    if bool(args.store) == bool(args.postgres):
        raise LocalAuthError(
            "give one of --store DIR (the desk's SQLite file) and --postgres DSN "
            f"(a database made by 'snrmesh as import-desk'){', not both' if args.store else ''}"
        )


def _open_store(args: argparse.Namespace, passphrase: str) -> SqlKeyStateStore:
    _check_store_choice(args)
    if args.postgres:
        # psycopg (and libpq) load only when PostgreSQL is asked for: every snrmesh command,
        # the agent above all, imports this module to build its parser.
        from provisioning.authserver.postgres import PostgresKeyStateStore

        return PostgresKeyStateStore.open(args.postgres, passphrase)
    return SqliteKeyStateStore.open(args.store, passphrase)


def cmd_serve(args: argparse.Namespace) -> int:
    # warnings (clone alerts, failed syncs) to stderr with a time; stdout carries the
    # "listening on" line and the --json counters
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s snrmesh as: %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%SZ",
        stream=sys.stderr,
    )
    logging.Formatter.converter = time.gmtime  # UTC, as the audit log and every other time
    host, port = _address(args.listen)
    if not 1 <= args.workers <= 64:
        raise LocalAuthError("--workers must be 1..64")
    if not (math.isfinite(args.key_lifetime) and args.key_lifetime >= 0):
        raise LocalAuthError("--key-lifetime must be a number of seconds >= 0")
    if args.max_pending < 1:
        raise LocalAuthError("--max-pending must be at least 1")
    if not 1 <= args.cookie_threshold <= args.max_pending:
        raise LocalAuthError(f"--cookie-threshold must be 1..{args.max_pending} (--max-pending)")
    if not (math.isfinite(args.identity_rate) and args.identity_rate > 0):
        raise LocalAuthError("--identity-rate must be a positive number")
    raise_file_limit()  # (inherited by the workers)
    capacity = link_capacity()
    if args.max_links is not None and not 1 <= args.max_links <= capacity:
        raise LocalAuthError(
            f"--max-links must be 1..{capacity} (this process's descriptor limit, less "
            "what a worker keeps for its store)"
        )
    _check_store_choice(args)
    sock = bound_socket(host, port)  # an address we cannot listen on fails before the store
    passphrase = desk_passphrase(args.store)
    _open_store(args, passphrase).close()  # fail here, once, on a wrong passphrase or DSN
    admission = AdmissionConfig(
        cookie_threshold=args.cookie_threshold,
        max_pending=args.max_pending,
        identity_rate=args.identity_rate,
    )
    policy = KeyPolicy(key_lifetime=args.key_lifetime)

    def make_service() -> AuthService:
        return AuthService.create(
            _open_store(args, passphrase), now=time.time(), admission=admission, policy=policy
        )

    def ready(bound_host: str, bound_port: int) -> None:
        print(
            f"snrmesh as: listening on {bound_host}:{bound_port} "
            f"({args.workers} worker{'s' * (args.workers > 1)})",
            flush=True,
        )

    counters = serve_forever(
        make_service,
        host,
        port,
        workers=args.workers,
        on_ready=ready,
        sock=sock,
        max_links=args.max_links,
    )
    if args.json:
        print(json.dumps(counters, sort_keys=True), flush=True)
    return 0


def cmd_import_desk(args: argparse.Namespace) -> int:
    """``snrmesh as import-desk DIR --postgres DSN``: the desk's mission into PostgreSQL, once."""
    if args.grant is not None and args.abandon:
        raise LocalAuthError("--grant goes with an import, not with --abandon")
    if args.force and not args.abandon:
        raise LocalAuthError("--force only goes with --abandon")
    if args.postgres is None and not (args.abandon and args.force):
        raise LocalAuthError("--postgres DSN is needed (without it only '--abandon --force')")
    if args.force and args.postgres is not None:
        raise LocalAuthError(
            "--abandon --force is for a database that is gone: give no --postgres "
            "(with --postgres, --abandon checks that database instead)"
        )
    store = Store.open(args.dir, desk_passphrase(args.dir))
    with contextlib.closing(store):
        from provisioning.authserver.desk_import import abandon_import, import_desk

        if args.abandon:
            into = abandon_import(
                store, None if args.force else args.postgres, now=int(time.time())
            )
            return _emit(
                args,
                {"abandoned": into},
                f"abandoned the import into {into}: the desk's file is the key state again",
            )
        with progress(not args.json, "copying rows") as tick:
            counts = import_desk(
                store,
                args.postgres,
                now=int(time.time()),
                source=str(args.dir),
                grant=args.grant,
                on_progress=tick,
            )
    done = (
        "the import had committed in PostgreSQL; marked the desk imported now"
        if counts.get("resumed")
        else "imported"
    )
    return _emit(
        args,
        counts,
        f"{done}: {counts.get('nodes', 0)} nodes, {counts.get('keysets', 0)} keysets and "
        f"{counts.get('audit', 0)} audit rows; serve it with "
        "'snrmesh as serve --postgres DSN' (the desk's file no longer tracks token keys)",
    )


def cmd_revoke(args: argparse.Namespace) -> int:
    """``snrmesh as revoke NODE (--store DIR | --postgres DSN)``."""
    _check_store_choice(args)
    with contextlib.closing(_open_store(args, desk_passphrase(args.store))) as store:
        try:
            newly = store.revoke(args.node, int(time.time()))
        except RemoteAuthError:
            raise LocalAuthError(f"unknown node {args.node!r}") from None
    return _emit(
        args,
        {"revoked": args.node, "already": not newly},
        f"{args.node} {'revoked' if newly else 'was already revoked'}: no further keysets",
    )


def cmd_reinstate(args: argparse.Namespace) -> int:
    """``snrmesh as reinstate NODE (--store DIR | --postgres DSN) --token FILE``."""
    _check_store_choice(args)
    token = open_token(args.token)
    with (
        contextlib.closing(_open_store(args, desk_passphrase(args.store))) as store,
        token.exclusive(),  # the key change below: one process at a time on the file
    ):
        token.verify_pin(read_secret(PIN_ENV, f"PIN for {token.info().identity}'s token: "))
        try:
            generation = store.reinstate(args.node, token, int(time.time()))
        except RemoteAuthError:
            raise LocalAuthError(f"unknown node {args.node!r}") from None
    return _emit(
        args,
        {"reinstated": args.node, "generation": generation},
        f"reinstated {args.node}: its token's keys are at generation {generation}, the "
        "suspension is lifted, and any other copy of the token is locked out",
    )


MAX_ATTEMPTS = 100  # tries of one 'as request' or 'as bundle'
MAX_AUDIT_LIMIT = 100_000  # entries one 'as audit' holds in memory (a store may have millions)
_PLAIN = re.compile(r"[A-Za-z0-9_.:@+-]+")


def audit_text(entries: list[dict[str, Any]]) -> str:
    """One line per audit entry: ``#seq at op key=value ...``, oldest first.

    A value that is not a bare word is shown as JSON, so that text a node chose
    (a keyset request's purpose) cannot pass for more fields on its line.
    """

    def shown(value: Any) -> str:
        if isinstance(value, int | float) or (isinstance(value, str) and _PLAIN.fullmatch(value)):
            return str(value)
        return json.dumps(value)

    return "\n".join(
        f"#{e['seq']} {e['at']} {e['op']} "
        + " ".join(f"{k}={shown(v)}" for k, v in e.items() if k not in ("seq", "at", "op"))
        for e in entries
    )


def cmd_audit(args: argparse.Namespace) -> int:
    """``snrmesh as audit (--store DIR | --postgres DSN) [--alerts | --op OP] [--limit N]``."""
    if not 1 <= args.limit <= MAX_AUDIT_LIMIT:
        raise LocalAuthError(f"--limit must be 1..{MAX_AUDIT_LIMIT:,}")
    _check_store_choice(args)
    op = CLONE_ALERT if args.alerts else args.op
    with contextlib.closing(_open_store(args, desk_passphrase(args.store))) as store:
        entries = store.audit_log(op, args.limit)
    for entry in entries:
        entry["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["at"]))
    text = audit_text(entries) or ("no clone alerts" if args.alerts else "no audit entries")
    return _emit(args, {"audit": entries}, text)


def _check_attempts(args: argparse.Namespace) -> None:
    if not 1 <= args.attempts <= MAX_ATTEMPTS:
        raise LocalAuthError(f"--attempts must be 1..{MAX_ATTEMPTS}")


def cmd_request(args: argparse.Namespace) -> int:
    host, port = _address(args.as_address)
    _check_attempts(args)
    if args.out is not None:
        # a keyset is JSON: a typo must not replace another node's token or the desk with one
        check_replaceable(
            args.out, option="--out", token=args.token, looks_like=(b"{", "a keyset (JSON)")
        )
    purpose = args.purpose
    if not (0 < len(purpose) <= MAX_PURPOSE_LENGTH and purpose.isascii() and purpose.isprintable()):
        raise LocalAuthError(f"--purpose is 1..{MAX_PURPOSE_LENGTH} printable ASCII characters")
    try:
        check_identity(args.target)
    except KeysetError as exc:
        raise LocalAuthError(f"--target: {exc}") from None
    if args.epoch is not None and not 0 <= args.epoch <= MAX_EPOCH:
        raise LocalAuthError(f"--epoch must be 0..{MAX_EPOCH:,}")
    token = open_token(args.token)
    request = KeysetRequest(random_bytes(16), args.target, args.purpose, args.epoch)
    with token.exclusive():  # the link may change the token's keys: one process at a time
        token.verify_pin(read_secret(PIN_ENV, f"PIN for {token.info().identity}'s token: "))
        outcome = eventloop.run(
            request_keysets(host, port, token, [request], backoff=Backoff(attempts=args.attempts))
        )
    auth = outcome.authenticated
    refused = [e for e in outcome.events if getattr(e, "request_id", None)]
    if not outcome.grants:
        if not refused:  # pragma: no cover - request_keysets raises when nothing answered
            raise LocalAuthError(f"keyset for {args.target}: no answer")
        first = refused[0]
        raise LocalAuthError(
            f"keyset for {args.target} refused: {explain(first.refusal, first.retry_after)}"  # type: ignore[union-attr]
        )
    grant = outcome.grants[0].grant
    data = {
        "ck": grant.ck_id.hex(),
        "peer": grant.peer,
        "nbf": grant.not_before,
        "exp": grant.not_after,
        "own": grant.own,
        "ticket": grant.ticket,
        "generation": auth.generation if auth else None,
        "key_changed": bool(auth and auth.key_changed),
    }
    if args.out:
        try:
            write_atomic(args.out, json.dumps(data, indent=2, sort_keys=True).encode())
        except OSError as exc:
            raise LocalAuthError(f"cannot write {args.out}: {exc.strerror}") from None
    return _emit(
        args,
        data,
        f"keyset {grant.ck_id.hex()} with {grant.peer} until {utc_iso(grant.not_after)}"
        + (
            f"; token keys changed to generation {auth.generation}"
            if auth and auth.key_changed
            else ""
        )
        + (f"; written to {args.out}" if args.out else ""),
    )


def cmd_bundle(args: argparse.Namespace) -> int:
    host, port = _address(args.as_address)
    if not 0 <= args.ahead <= MAX_BUNDLE_AHEAD:
        raise LocalAuthError(f"--ahead is 0..{MAX_BUNDLE_AHEAD} epochs")
    _check_attempts(args)
    # before the link: a key change on it would leave no bundle that opens
    check_replaceable(
        args.out, option="--out", token=args.token, looks_like=(BUNDLE_MAGIC, "a bundle")
    )
    token = open_token(args.token)
    identity = token.info().identity
    with token.exclusive():  # the link may change the token's keys: one process at a time
        token.verify_pin(read_secret(PIN_ENV, f"PIN for {identity}'s token: "))
        fetched = eventloop.run(
            fetch_bundle(
                host, port, token, ahead=args.ahead, backoff=Backoff(attempts=args.attempts)
            )
        )
    auth, raw = fetched.authenticated, fetched.data
    try:
        bundle = open_bundle(raw, token)  # sealed for the keys the token holds now
    except KeysetError as exc:
        raise LocalAuthError(f"the AS sent a bundle this token does not accept: {exc}") from None
    try:
        write_atomic(args.out, raw)
    except OSError as exc:
        raise LocalAuthError(f"cannot write {args.out}: {exc.strerror}") from None
    mission = bundle.mission
    epochs = sorted(
        {(k.not_before - mission.start) // mission.epoch_seconds for k in bundle.keysets}
    )
    data = {
        "node": identity,
        "out": args.out,
        "mates": len(bundle.mates),
        "keysets": len(bundle.keysets),
        "epochs": epochs,
        "generation": auth.generation if auth else None,
        "key_changed": bool(auth and auth.key_changed),
    }
    return _emit(
        args,
        data,
        f"bundle for {identity} written to {args.out}: {len(bundle.mates)} "
        f"mate{'s' * (len(bundle.mates) != 1)}, {len(bundle.keysets)} "
        f"keyset{'s' * (len(bundle.keysets) != 1)}"
        + (f" (epochs {epochs[0]}..{epochs[-1]})" if epochs else "")
        + (
            f"; token keys changed to generation {auth.generation} (older bundles no longer "
            "open with this token)"
            if auth and auth.key_changed
            else ""
        ),
    )


def cmd_sim(args: argparse.Namespace) -> int:
    host, port = _address(args.as_address)
    check_fleet(args.count, args.prefix, args.first)  # --first -1 simulated 'meter--000001'
    seed, _ = _factory_seed(args.factory_seed, create=False)
    with progress(not args.json, "meters done") as tick:
        report = eventloop.run(
            simulate_fleet(
                host,
                port,
                seed=seed,
                count=args.count,
                head_end=args.head_end,
                prefix=args.prefix,
                first=args.first,
                storm=args.storm,
                spread=args.spread,
                sources=args.sources,
                on_progress=lambda done: tick(done, args.count),
            )
        )
    failed = report.get("failed") or {}
    latency = (
        f"p50 {report['p50_s']} s, p99 {report['p99_s']} s, " if report["served"] else ""
    )  # no latency to give when none was served
    text = (
        f"{report['served']}/{report['meters']} meters served in {report['seconds']} s "
        f"({latency}{report['attempts']} attempts)"
    )
    if failed:
        text += "; not served: " + ", ".join(f"{n} {why}" for why, n in sorted(failed.items()))
    _emit(args, report, text)
    if report["served"] != report["meters"]:  # a fleet not all served fails, and says so
        unserved = report["meters"] - report["served"]
        raise LocalAuthError(f"{unserved} of {report['meters']} meters were not served")
    return 0


def cmd_import_meters(args: argparse.Namespace) -> int:
    """``snrmesh desk import-meters DIR --count N --factory-seed FILE [--head-end NODE]``."""
    check_fleet(args.count, args.prefix, args.first)
    store = Store.open(args.dir, desk_passphrase(args.dir))
    with contextlib.closing(store):
        return _import_fleet(
            args,
            lambda seed, tick: import_meters(
                store,
                seed=seed,
                count=args.count,
                now=int(time.time()),
                prefix=args.prefix,
                first=args.first,
                head_end=args.head_end,
                on_progress=tick,
            ),
            lambda token_id: (
                store.db.execute("SELECT 1 FROM nodes WHERE token_id = ?", (token_id,)).fetchone()
                is not None
            ),
        )


def _holds_token(store: SqlKeyStateStore, token_id: bytes) -> bool:
    with store.reading() as cur:
        cur.execute(f"SELECT 1 FROM nodes WHERE token_id = {store.placeholder}", (token_id,))
        return cur.fetchone() is not None


def cmd_as_import_meters(args: argparse.Namespace) -> int:
    """``snrmesh as import-meters --postgres DSN --count N --factory-seed FILE [--head-end]``."""
    check_fleet(args.count, args.prefix, args.first)
    from provisioning.authserver.postgres import PostgresKeyStateStore

    store = PostgresKeyStateStore.open(args.postgres, desk_passphrase(None))
    with contextlib.closing(store):
        return _import_fleet(
            args,
            lambda seed, tick: store.enrol_meters(
                seed=seed,
                count=args.count,
                now=int(time.time()),
                prefix=args.prefix,
                first=args.first,
                head_end=args.head_end,
                on_progress=tick,
            ),
            lambda token_id: _holds_token(store, token_id),
        )


def _import_fleet(
    args: argparse.Namespace,
    enrol: Callable[[bytes, Callable[[int], None]], int],
    holds: Callable[[bytes], bool],
) -> int:
    """The factory seed (made if missing, removed again if nothing was enrolled), then enrol.

    ``holds(token_id)``: whether the store has a node of that token id. A failure may
    follow a commit (a connection lost during COMMIT): a new seed goes again only once
    the store says its first meter is not there, for the meters enrolled with it have
    no other source of their keys.
    """
    with progress(not args.json, "enrolling meters") as tick:
        seed, created = _factory_seed(args.factory_seed, create=True)  # once the store opened
        try:
            count = enrol(seed, lambda done: tick(done, args.count))
        except BaseException:
            if created:
                token_id, _ = factory_keys(seed, meter_identity(args.prefix, args.first))
                try:
                    enrolled = holds(token_id)
                except Exception:  # cannot tell: the seed stays
                    enrolled = True
                if enrolled:
                    print(
                        f"snrmesh: the factory seed {args.factory_seed} is kept: meters may "
                        "have been enrolled with it (run the same command again to see)",
                        file=sys.stderr,
                    )
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(args.factory_seed)
            raise
    return _emit(
        args,
        {
            "imported": count,
            "prefix": args.prefix,
            "first": args.first,
            "head_end": args.head_end,
            "factory_seed": args.factory_seed,
        },
        f"imported {count} meters ({args.prefix}-{args.first:07d}...)"
        + (f", each paired with {args.head_end}" if args.head_end else ""),
    )


# -- parsers ----------------------------------------------------------------------------------


def _store_choice(p: argparse.ArgumentParser) -> None:
    """--store or --postgres (one of them: ``_check_store_choice``)."""
    p.add_argument("--store", metavar="DIR", help="desk directory (holds desk.sqlite)")
    p.add_argument("--postgres", metavar="DSN", help="PostgreSQL store")


def _link_arguments(p: argparse.ArgumentParser) -> None:
    """What every command that authenticates to an AS takes."""
    p.add_argument(
        "--as", dest="as_address", required=True, metavar="HOST:PORT", help="the AS's address"
    )
    p.add_argument(
        "--token",
        required=True,
        metavar="TOKEN",
        help="the node's token: a token file, or pcsc:READER for a smartcard",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=6,
        metavar="N",
        help=f"tries with backoff, each given up after 30 s without an answer "
        f"(1..{MAX_ATTEMPTS}, default 6)",
    )


def _fleet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, required=True, metavar="N", help="number of meters")
    p.add_argument(
        "--factory-seed",
        required=True,
        metavar="FILE",
        help="the fleet's factory seed (32 bytes; keep it offline)",
    )
    p.add_argument("--prefix", default="meter", help="identity prefix (default: meter)")
    p.add_argument(
        "--first", type=int, default=1, metavar="I", help="first meter number (default: 1)"
    )


def add_import_meters_arguments(p: argparse.ArgumentParser) -> None:
    _fleet_arguments(p)
    p.add_argument(
        "--head-end",
        metavar="NODE",
        help="pair every meter with this node (the provider's head-end)",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    auth = commands.add_parser(
        "as",
        help="online Authentication Server: challenge, key change, keysets on request",
        description=AS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = auth.add_subparsers(title="as commands", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "serve",
        help="run the Authentication Server",
        description="Serve the desk store in --store DIR (or a PostgreSQL database made by "
        "'as import-desk'): nodes authenticate with their tokens, the AS changes their keys "
        "when due (--key-lifetime), and issues keysets and bundles. Warnings (clone alerts, "
        "store failures) go to stderr with a time; stop it with SIGTERM or Ctrl+C.",
        epilog="example: snrmesh as serve --store desk --listen 127.0.0.1:7450 --workers 2",
    )
    p.set_defaults(func=cmd_serve)
    p.add_argument("--store", metavar="DIR", help="desk directory (holds desk.sqlite)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:7450",
        metavar="HOST:PORT",
        help="where to accept links (default: 127.0.0.1:7450; port 0 picks one)",
    )
    p.add_argument(
        "--postgres", metavar="DSN", help="PostgreSQL store instead (see 'as import-desk')"
    )
    p.add_argument(
        "--workers", type=int, default=1, metavar="N", help="worker processes (1..64, default 1)"
    )
    p.add_argument(
        "--key-lifetime",
        type=float,
        default=30 * 86400.0,
        metavar="S",
        help="change a token's keys once they are S seconds old (0: every time; default 30 days)",
    )
    p.add_argument(
        "--cookie-threshold",
        type=int,
        default=500,
        metavar="N",
        help="pending challenges per source from which on HELLOs need a cookie (default 500)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=5000,
        metavar="N",
        help="pending challenges in all at which the AS answers busy, retry after 1 s "
        "(default 5,000)",
    )
    p.add_argument(
        "--identity-rate",
        type=float,
        default=1.0,
        metavar="R",
        help="keyset requests per second per identity, bursts of 10 (default 1)",
    )
    p.add_argument(
        "--max-links",
        type=int,
        metavar="N",
        help="links each worker holds at once; one more drops the oldest link that has "
        "sent no HELLO for 1 s (else the new one), so a flood of silent connections cannot "
        "lock clients out (default: the descriptor limit, raised to the hard one, less 64; "
        "at most 65,536)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="on exit, print the counters as one JSON line (stdout's first line is still "
        "the 'listening on' line)",
    )

    p = sub.add_parser(
        "import-desk",
        help="copy a desk's mission into an empty PostgreSQL database (once)",
        description="Copy the desk in DIR (nodes, sealed keys, groups, pairs, keysets, "
        "audit log) into the empty PostgreSQL database DSN, for 'as serve --postgres'. "
        "From then on token keys and policy change in PostgreSQL only: the desk's file is "
        "marked, the desk refuses every change (revoke with 'as revoke --postgres', more "
        "meters with 'as import-meters') and 'as serve --store' refuses it. The mark "
        "is written before the copy commits: if the import stops half way (a crash, a lost "
        "connection), run the same command again against the same database; it copies "
        "again or only confirms the copy that committed. Any other database is refused. "
        "To give up an import that never committed: --abandon with the same DSN (it checks "
        "that database holds no copy), or --abandon --force if that database is gone.",
    )
    p.set_defaults(func=cmd_import_desk)
    p.add_argument("dir", metavar="DIR", help="desk directory (holds desk.sqlite)")
    p.add_argument(
        "--postgres",
        metavar="DSN",
        help="e.g. 'host=/run/pg dbname=as' (required but for --abandon --force)",
    )
    p.add_argument(
        "--grant",
        metavar="ROLE",
        help="give this existing role what 'as serve' takes, and no more: serve under it, "
        "not under the importing role, which owns the tables (an owner can disable the "
        "audit log's append-only triggers)",
    )
    p.add_argument(
        "--abandon",
        action="store_true",
        help="clear the mark of a pending import whose copy did not commit",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --abandon: without checking the database (it is gone); noted in the audit",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "import-meters",
        help="enrol more smart meters into a PostgreSQL AS (after 'as import-desk')",
        description="Enrol --count meters whose keys are diversified from --factory-seed "
        "(created if missing) straight into the PostgreSQL database DSN, in one transaction: "
        "after 'as import-desk' the desk refuses every change, so a growing fleet is "
        "enrolled here. Keys are sealed under the desk passphrase, as the desk seals them.",
        epilog="example: snrmesh as import-meters --postgres 'host=/run/pg dbname=as' "
        "--count 50000 --first 1000001 --factory-seed fleet.seed --head-end head-end",
    )
    p.set_defaults(func=cmd_as_import_meters)
    p.add_argument("--postgres", required=True, metavar="DSN", help="the AS's database")
    add_import_meters_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "revoke",
        help="revoke a node in the AS store (PostgreSQL or desk)",
        description="Revoke NODE in the AS store: it gets no further keysets or bundles, and "
        "bundles fetched from now on list it as revoked. For a PostgreSQL store, which the "
        "desk no longer reaches; on the desk's own file it is 'desk revoke'. Revoking twice "
        "changes nothing.",
        epilog="example: snrmesh as revoke uav-1 --postgres 'host=/run/pg dbname=as'",
    )
    p.set_defaults(func=cmd_revoke)
    p.add_argument("node", metavar="NODE", help="the node to revoke, e.g. uav-1")
    _store_choice(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "reinstate",
        help="lift a clone suspension by changing the trusted token's keys (PostgreSQL or desk)",
        description="After a clone alert suspended NODE: change the keys of the token you "
        "trust (--token, its PIN from SNRMESH_PIN or asked) in the AS store and lift the "
        "suspension. Any other copy of the token then holds keys two generations old and "
        "fails like a stranger. The token may be at the AS's key generation or one behind "
        "(a copy took the last key change first). For a PostgreSQL store, which the desk no "
        "longer reaches; on the desk's own file 'desk rekey' does the same. Run again after "
        "a failure, it resumes.",
        epilog="example: snrmesh as reinstate alpha-1 --store desk --token alpha-1.token",
    )
    p.set_defaults(func=cmd_reinstate)
    p.add_argument("node", metavar="NODE", help="the suspended node (snrmesh as audit --alerts)")
    p.add_argument("--token", required=True, metavar="FILE", help="the trusted token")
    _store_choice(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "audit",
        help="print the AS store's audit log (key changes, keysets, clone alerts)",
        description="Print the last --limit entries of the audit log of the AS store "
        "(the desk's SQLite file or PostgreSQL), oldest first: every key change, keyset "
        "issued, revocation and clone alert, besides the desk's own entries (enrol, group, "
        "pair, ...). Never key material. A clone alert (as-clone-alert) means a token "
        "answered under keys it had already replaced: a copy of it exists, and the "
        "identity is suspended until its trusted token's keys are changed ('snrmesh as "
        "reinstate', or 'snrmesh desk rekey' before an import), which locks the copy out.",
        epilog="example: snrmesh as audit --store desk --op as-key-change --limit 20",
    )
    p.set_defaults(func=cmd_audit)
    _store_choice(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alerts", action="store_true", help="only clone alerts")
    which.add_argument("--op", metavar="OP", help="only entries of OP (e.g. as-key-change)")
    p.add_argument(
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help=f"the last N entries (default 50, at most {MAX_AUDIT_LIMIT:,})",
    )
    p.add_argument("--json", action="store_true", help="print the entries as JSON")

    p = sub.add_parser(
        "request",
        help="authenticate with a token and fetch a keyset",
        description="Authenticate to the AS with the node's token (its keys may change on "
        "the way) and fetch a CK with the dialogue mate --target: our copy, and the mate's "
        "copy to hand it as the ticket of the session handshake. Temporary refusals and lost "
        "links are retried with full-jitter backoff. The token PIN comes from SNRMESH_PIN "
        "or a prompt.",
        epilog="example: snrmesh as request --as 10.0.0.2:7450 --token alpha-1.token "
        "--target gs-1 --epoch 3",
    )
    p.set_defaults(func=cmd_request)
    _link_arguments(p)
    p.add_argument("--target", required=True, metavar="NODE", help="the dialogue mate")
    p.add_argument(
        "--purpose", default="session", help="recorded in the audit log (default: session)"
    )
    p.add_argument("--epoch", type=int, metavar="E", help="a later epoch (default: current)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="also write the keyset (JSON) to FILE (a file there that is not one is refused)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "bundle",
        help="authenticate with a token and fetch this node's bundle",
        description="Authenticate to the AS with the node's token and fetch the node's "
        "bundle, as the desk would export it now: its dialogue mates, groups and "
        "revocations, every CK it holds that has not expired, and the epochs' discovery "
        "keys, all wrapped for the token's current keys. The AS first gives every mate a "
        "CK for this epoch and the next --ahead ones. A field node runs it before going "
        "out, and whenever the AS changed its token's keys (which a bundle made before no "
        "longer opens with). The bundle is checked with the token before it is written.",
        epilog="example: snrmesh as bundle --as 10.0.0.2:7450 --token alpha-1.token "
        "--out alpha-1.bundle",
    )
    p.set_defaults(func=cmd_bundle)
    _link_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the bundle")
    p.add_argument(
        "--ahead",
        type=int,
        default=1,
        metavar="N",
        help=f"epochs past the current one to get CKs for (0..{MAX_BUNDLE_AHEAD}, default 1)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    meters = commands.add_parser(
        "meters",
        help="smart-meter fleets: simulation",
        description="Smart-meter fleets: enrol them with 'snrmesh desk import-meters' (or "
        "'as import-meters'), then simulate them against an AS here.",
    )
    msub = meters.add_subparsers(title="meters commands", metavar="COMMAND", required=True)
    p = msub.add_parser(
        "sim",
        help="simulate a fleet of meters fetching keysets from an AS",
        description="Power up --count in-memory meters (factory keys from "
        "--factory-seed) that each authenticate and fetch one keyset. p50 and p99 run "
        "from a meter's first attempt (after its power-up delay) to its keyset.",
    )
    p.set_defaults(func=cmd_sim)
    p.add_argument(
        "--as", dest="as_address", required=True, metavar="HOST:PORT", help="the AS's address"
    )
    _fleet_arguments(p)
    p.add_argument("--head-end", required=True, metavar="NODE", help="the meters' mate")
    p.add_argument("--storm", action="store_true", help="all meters at once (no start spread)")
    p.add_argument(
        "--spread",
        type=float,
        default=5.0,
        metavar="S",
        help="random power-up delay in [0, S] seconds without --storm (default 5)",
    )
    p.add_argument(
        "--sources",
        type=int,
        default=8,
        metavar="K",
        help="loopback source addresses, data concentrators (default 8)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
