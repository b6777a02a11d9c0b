"""``snrmesh agent`` and its clients: ``send``, ``peers``, ``history``, ``events``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mesh.agent.client import ControlClient, default_control_path
from mesh.agent.refresh import BundleSource, RefreshPolicy, UplinkError
from mesh.backoff import full_jitter
from mesh.cli.node import read_bundle, unlock_node
from mesh.cli.secrets import PIN_ENV, read_secret
from mesh.errors import MeshError
from mesh.files import check_replaceable, write_atomic
from mesh.keyset.bundle import BUNDLE_MAGIC, Bundle, open_bundle
from mesh.keyset.errors import BundleError, BundleStale
from mesh.timefmt import utc_iso
from mesh.token.interface import SecureElement
from mesh.token.open import open_token

__all__ = ["register"]

log = logging.getLogger("snrmesh.agent")
MAX_AHEAD = 4  # as the AS allows (BUNDLE-REQUEST)
DEFAULT_AHEAD = 1
DEFAULT_REFRESH = RefreshPolicy().every
MIN_REFRESH = 30.0  # a bundle weighs 10 keysets against the AS's 1/s per node

AGENT_HELP = """\
Run this node's agent: load its bundle and token, find its dialogue mates
(mDNS on the LAN, and/or --peer addresses), authenticate them with the CKs in
the bundle (no server), and carry chat and status between them -- across
several hops when a mate is out of direct reach. Messages wait in a durable
outbox until the recipient confirms them. Clients (snrmesh send/peers/history/
events, snrmesh tui) talk to the agent over its control socket; only the agent
ever holds keys. The token PIN comes from SNRMESH_PIN or a prompt.

examples:
  snrmesh agent --bundle alpha-1.bundle --token alpha-1.token --state ~/.snrmesh
  snrmesh agent ... --listen 127.0.0.1:7717 --mdns-interface 127.0.0.1
  snrmesh agent ... --no-mdns --peer 10.0.0.7:7717 --peer gs-1@10.0.0.9:7717
  snrmesh agent ... --as 10.0.0.2:7450        # with an uplink: keysets from the AS, live
"""


def _default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "snrmesh"


def _position(text: str) -> tuple[float, float, float]:
    try:
        lat, lon, alt = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LAT,LON,ALT (e.g. 48.85,2.35,35)") from None
    return (lat, lon, alt)


MIN_HEARTBEAT, MAX_HEARTBEAT = 1.0, 3600.0


def _check_status(args: argparse.Namespace) -> None:
    """The heartbeat's own values, held to what a mate accepts (``mesh/wire``): out of range,
    every heartbeat would be dropped by every mate, as "malformed"."""
    from mesh.wire import Status, WireError, decode, encode

    if not (math.isfinite(args.heartbeat) and MIN_HEARTBEAT <= args.heartbeat <= MAX_HEARTBEAT):
        raise MeshError(f"--heartbeat is {MIN_HEARTBEAT:g}..{MAX_HEARTBEAT:g} seconds")
    for option, rule, status in (  # one at a time: the error names the option at fault
        ("--position", "LAT,LON,ALT in -90..90, -180..180, -100000..1000000 m",
         Status("r", 0.0, position=args.position)),
        ("--battery", "0..100", Status("r", 0.0, battery=args.battery)),
        ("--status-text", "up to 200 printable characters",
         Status("r", 0.0, text=args.status_text)),
    ):  # fmt: skip
        try:
            decode(encode(status))
        except WireError as exc:
            raise MeshError(f"{option} {rule}: {exc}") from None


def _check_names(args: argparse.Namespace) -> None:
    """``--peer NODE@`` and ``--block NODE`` name nodes: a mistyped one is refused here, before
    the PIN. (Whether it is a mate needs the bundle: the agent checks that once it is open.)"""
    from mesh.keyset import KeysetError, check_identity

    named = [("--block", name, name) for name in args.block]
    named += [("--peer", p.rpartition("@")[0], p) for p in args.peer if "@" in p]
    for option, name, text in named:
        try:
            check_identity(name)
        except KeysetError as exc:
            raise MeshError(f"{option} {text}: {exc}") from None


def _check_addresses(args: argparse.Namespace) -> None:
    """``--listen``, ``--peer`` and ``--as`` addresses, refused here, before the PIN (they were
    parsed only once the token was open: a PIN typed for a mistyped port)."""
    from mesh.agent.agent import DEFAULT_PORT
    from mesh.transport.address import AddressError, parse_address

    addresses = [("--listen", args.listen, args.listen, True)]
    addresses += [("--peer", p, p.rpartition("@")[2], False) for p in args.peer]
    for option, text, address, listening in addresses:
        try:
            parse_address(address, DEFAULT_PORT, listening=listening)
        except AddressError as exc:
            raise MeshError(f"{option} {text}: {exc}") from None
    if args.as_address is not None:
        _as_address(args.as_address)


def cmd_agent(args: argparse.Namespace) -> int:
    from mesh.agent.agent import DEFAULT_PORT, Agent, AgentConfig
    from mesh.transport.address import parse_address

    _check_status(args)  # before the PIN is asked for
    _check_names(args)
    _check_addresses(args)
    if args.no_mdns and args.mdns_interface:  # (the interface was silently ignored)
        raise MeshError("--mdns-interface needs mDNS: give one of it and --no-mdns, not both")

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    source: BundleSource | None = None
    fetched_at_start = False
    ahead = DEFAULT_AHEAD if args.as_ahead is None else args.as_ahead
    every = DEFAULT_REFRESH if args.as_refresh is None else args.as_refresh
    if args.as_address is None:
        for option, value in (("--as-refresh", args.as_refresh), ("--as-ahead", args.as_ahead)):
            if value is not None:
                raise MeshError(f"{option} needs --as (the AS to fetch from)")
        token, bundle = unlock_node(args.token, args.bundle)
    else:
        token, bundle, source, fetched_at_start = _unlock_with_uplink(args, ahead, every)
    state = Path(args.state or _default_state())
    config = AgentConfig(
        state_dir=state,
        listen=parse_address(args.listen, DEFAULT_PORT, listening=True),
        peers=tuple(args.peer),
        mdns=not args.no_mdns,
        mdns_interfaces=tuple(args.mdns_interface) if args.mdns_interface else None,
        control_path=Path(args.control) if args.control else None,
        heartbeat=args.heartbeat,
        position=args.position,
        position_file=Path(args.position_file) if args.position_file else None,
        simulate_track=args.simulate_track,
        battery=args.battery,
        status_text=args.status_text,
        blocked=frozenset(args.block),
        bundle_path=None if source is None else Path(args.bundle),
        refresh=RefreshPolicy(every=every),
        refresh_ahead=ahead,
    )

    offset: float = args.clock_offset

    def clock() -> float:
        return time.time() + offset

    async def main() -> None:
        agent = Agent(config, bundle, token, clock=clock, bundle_source=source)
        if fetched_at_start:
            agent.refresh.succeeded(clock())  # the next fetch is a period from now
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.request_stop)
        await agent.run()

    asyncio.run(main())
    return 0


STARTUP_ATTEMPTS = 4  # fetches of a first bundle before the agent gives up (full jitter)


def _unlock_with_uplink(
    args: argparse.Namespace, ahead: int, every: float
) -> tuple[SecureElement, Bundle, BundleSource, bool]:
    """Unlock the token; open the bundle, or fetch one from the AS when it is missing or stale.

    A bundle goes stale when the AS changed the token's keys (``as request``, or
    an agent killed between a key change and writing its new bundle): it no
    longer opens with the token, and the AS has the one that does.
    """
    from provisioning.authserver.client import agent_bundle_source

    host, port = _as_address(args.as_address)
    if not 0 <= ahead <= MAX_AHEAD:
        raise MeshError(f"--as-ahead is 0..{MAX_AHEAD} epochs")
    if not (math.isfinite(every) and every >= MIN_REFRESH):
        raise MeshError(f"--as-refresh is a number of seconds, at least {MIN_REFRESH:g}")
    if not args.bundle:
        raise BundleError("--bundle needs a file name")
    token = open_token(args.token)
    raw = read_bundle(args.bundle)
    if raw is not None and not raw.startswith(BUNDLE_MAGIC):
        raise BundleError(f"--bundle {args.bundle} exists and is not a bundle: not replaced")
    # before a fetch that may change the token's keys
    check_replaceable(args.bundle, option="--bundle", token=args.token)
    token.verify_pin(read_secret(PIN_ENV, f"PIN for {token.info().identity}'s token: "))
    source = agent_bundle_source(host, port, token, ahead=ahead)
    if raw is not None:
        try:
            return token, open_bundle(raw, token), source, False
        except BundleStale:  # this token's, sealed for keys it held before: replaced
            log.warning(
                "%s is sealed for an older key generation of the token: fetching this node's "
                "bundle from the AS at %s",
                args.bundle,
                args.as_address,
            )
    what = "no bundle" if raw is None else f"{args.bundle} does not open"
    rng = random.Random()
    for n in range(STARTUP_ATTEMPTS):
        try:
            raw = asyncio.run(source())
            break
        except UplinkError as exc:
            if exc.permanent or n + 1 == STARTUP_ATTEMPTS:
                tries = "" if exc.permanent else f" ({n + 1} tries)"
                raise MeshError(
                    f"{what}, and none from the AS at {args.as_address}{tries}: {exc}"
                ) from None
            wait = max(exc.retry_after or 0.0, full_jitter(n, base=2.0, cap=30.0, rng=rng))
            log.warning("bundle from the AS: %s (next try in %.0f s)", exc, wait)
            time.sleep(wait)
    assert raw is not None  # the loop either broke with a bundle or raised
    bundle = open_bundle(raw, token)
    try:
        write_atomic(args.bundle, raw)
    except OSError as exc:
        raise MeshError(f"cannot write {args.bundle}: {exc.strerror}") from None
    log.info("bundle from the AS written to %s", args.bundle)
    return token, bundle, source, True


def _as_address(text: str) -> tuple[str, int]:
    """``--as HOST:PORT``: the port is required (the AS has no default; 7717 is the agent's)."""
    from mesh.transport.address import AddressError, parse_address

    try:
        return parse_address(text)
    except AddressError:
        raise MeshError(f"--as {text!r}: expected HOST:PORT, the AS's address") from None


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(args.control or default_control_path())


def cmd_send(args: argparse.Namespace) -> int:
    with _client(args) as client:
        target = {"to": args.to} if args.to else {"group": args.group}
        result = client.request("send", text=args.text, **target)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"queued message {result['message_id']} for {args.to or 'group ' + args.group}")
    return 0


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "never"
    seconds = max(0, int(now - then))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


def cmd_peers(args: argparse.Namespace) -> int:

    with _client(args) as client:
        peers = client.request("peers")["peers"]
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    now = time.time()
    for p in peers:
        state = p["state"] + (f" via {p['via']}" if p.get("via") else "")
        if p.get("refused_reason"):
            state += f" ({p['refused_reason']})"
        where = "" if not p.get("position") else " pos " + ",".join(f"{x:g}" for x in p["position"])
        print(
            f"{p['identity']:<16} {p['role']:<15} {state:<22} seen {_ago(now, p['last_seen'])}"
            f"{where}"
        )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"limit": args.limit}
    if args.peer:
        request["peer"] = args.peer
    if args.group:
        request["group"] = args.group
    with _client(args) as client:
        messages = client.request("history", **request)["messages"]
    if args.json:
        print(json.dumps(messages, indent=2))
        return 0
    for m in messages:
        where = f"[{m['group']}] " if m.get("group") else ""
        arrow = f"<- {m['peer']}" if m["direction"] == "in" else f"-> {m['peer'] or m['group']}"
        state = "" if m["direction"] == "in" else f"  ({m['state']})"
        print(f"{utc_iso(m['at'])} {arrow:<18} {where}{m['text']}{state}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            for event in client.events():
                print(json.dumps(event), flush=True)
        except KeyboardInterrupt:
            return 0
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "agent",
        help="run this node's mesh agent",
        description=AGENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bundle",
        required=True,
        metavar="FILE",
        help="this node's bundle (with --as: fetched and written here if missing or stale)",
    )
    p.add_argument(
        "--token",
        required=True,
        metavar="FILE|pcsc:READER",
        help="this node's token file, or its card in a PC/SC reader (snrmesh card --help)",
    )
    p.add_argument(
        "--state",
        metavar="DIR",
        help="state folder: history, outbox, control socket (default: "
        "$XDG_STATE_HOME/snrmesh or ~/.local/state/snrmesh)",
    )
    p.add_argument(
        "--listen",
        default="0.0.0.0:7717",
        metavar="HOST:PORT",
        help="where to accept links (default: 0.0.0.0:7717; port 0 picks one)",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="[NODE@]HOST[:PORT]",
        help="a mate to dial, for networks without multicast (repeatable; the port defaults "
        "to 7717; NODE@ makes the link refuse anyone else)",
    )
    p.add_argument(
        "--mdns-interface",
        action="append",
        metavar="IP",
        help="announce and browse on this interface only (repeatable; default: all)",
    )
    p.add_argument("--no-mdns", action="store_true", help="no mDNS discovery at all")
    p.add_argument(
        "--control", metavar="SOCKET", help="control socket path (default: STATE/control.sock)"
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=30.0,
        metavar="S",
        help="status heartbeat period in seconds, 1..3600 (default: 30)",
    )
    p.add_argument(
        "--position",
        type=_position,
        metavar="LAT,LON,ALT",
        help="own position: latitude and longitude in degrees, altitude in metres "
        "(e.g. 48.85,2.35,35)",
    )
    p.add_argument(
        "--position-file",
        metavar="FILE",
        help="read LAT,LON,ALT from this file at each heartbeat (e.g. from a GPS)",
    )
    p.add_argument(
        "--simulate-track", action="store_true", help="move the position in a small circle (demos)"
    )
    p.add_argument(
        "--battery", type=float, metavar="PERCENT", help="battery level to report, 0..100"
    )
    p.add_argument(
        "--status-text", metavar="TEXT", help="free text in the status heartbeat (≤ 200 characters)"
    )
    p.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="NODE",
        help="never link directly with NODE, a dialogue mate (emulates a cut link in "
        "simulations; relays still reach it; repeatable)",
    )
    p.add_argument(
        "--as",
        dest="as_address",
        metavar="HOST:PORT",
        help="an Authentication Server this node reaches (snrmesh as --help): fetch the "
        "bundle from it at start, every --as-refresh seconds and whenever a mate lacks a "
        "keyset, and run on it without a restart (the bundle file is replaced); a missing "
        "or stale --bundle is fetched before the agent starts",
    )
    p.add_argument(
        "--as-refresh",
        type=float,
        metavar="S",
        help=f"seconds between routine fetches from --as (default: {DEFAULT_REFRESH:g}; "
        f"at least {MIN_REFRESH:g})",
    )
    p.add_argument(
        "--as-ahead",
        type=int,
        metavar="N",
        help="epochs after this one that a fetched bundle carries "
        f"(0..{MAX_AHEAD}, default: {DEFAULT_AHEAD})",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what goes to stderr (default: info)",
    )
    p.add_argument("--clock-offset", type=float, default=0.0, help=argparse.SUPPRESS)  # tests
    p.set_defaults(func=cmd_agent)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--control",
        metavar="SOCKET",
        help="the agent's control socket (default: $SNRMESH_CONTROL, else "
        "$XDG_STATE_HOME/snrmesh/control.sock, else ~/.local/state/snrmesh/control.sock)",
    )

    p = commands.add_parser(
        "send",
        parents=[client],
        help="send a chat message",
        description="Queue a chat message; the agent delivers it end to end "
        "(now, or when the mate is next reachable).",
        epilog='example: snrmesh send --to gs-1 "on station"',
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="NODE", help="a dialogue mate")
    target.add_argument("--group", metavar="GROUP", help="every member of a mission group")
    p.add_argument("text", metavar="TEXT", help="the message, 1..4000 characters")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_send)

    p = commands.add_parser(
        "peers",
        parents=[client],
        help="list dialogue mates and link state",
        description="List this node's dialogue mates as its agent sees them: link state "
        "(direct, relayed, offline, refused), when each was last heard and its position.",
        epilog="example: snrmesh peers --control ~/.local/state/snrmesh/control.sock",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_peers)

    p = commands.add_parser(
        "history",
        parents=[client],
        help="print the message history",
        description="Print the messages the agent holds, oldest first, with the delivery "
        "state of those sent.",
        epilog="example: snrmesh history --peer gs-1 --limit 20",
    )
    only = p.add_mutually_exclusive_group()  # both printed nothing, with exit status 0
    only.add_argument("--peer", metavar="NODE", help="only the conversation with NODE")
    only.add_argument("--group", metavar="GROUP", help="only the conversation of GROUP")
    p.add_argument(
        "--limit", type=int, default=200, metavar="N", help="the last N messages (default: 200)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_history)

    p = commands.add_parser(
        "events",
        parents=[client],
        help="follow the agent's event stream (JSON lines)",
        description="Print the agent's events as they happen, one JSON object a line "
        "(messages, delivery states, links, alerts), until the agent stops or ctrl-C. "
        "The events and their fields: docs/agent.md, 'Events'.",
        epilog='example: snrmesh events | grep \'"event": "alert"\'',
    )
    p.set_defaults(func=cmd_events)
