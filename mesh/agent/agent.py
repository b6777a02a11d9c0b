"""The mesh agent: links, relayed sessions, routing, store-and-forward, status, control.

This is the asyncio layer over the sans-IO protocol (``mesh.protocol``), the
pure routing table (``routing.py``) and the durable store (``store.py``). It
owns sockets, timers and the clock, and nothing else decides security: every
session is a :class:`mesh.protocol.Connection` authenticated by a CK.

Sessions. A **link** is a TCP connection to a dialogue mate in direct reach,
carrying that pair's session (stream transport). A mate out of direct reach
gets a **relayed session**: the pair's own handshake and records (datagram
transport) travel inside ``Relay`` messages, hop by hop, over the links in
between, so a relay only ever sees the clear ``ck_id`` in message 1 and
ciphertext. Each side sends on the relayed session it initiated and answers on
the one its mate initiated.

Delivery. A chat is first written to the outbox (one row per recipient) and
then sent on the best session; it is re-sent until the recipient's
``delivered`` receipt arrives, across restarts of either side; the recipient
stores it under its message id, so a re-sent copy is acknowledged but not shown
twice. ``docs/agent.md`` describes all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from mesh import __version__
from mesh.agent.control import ControlError, ControlServer
from mesh.agent.keyring import KeyRing, RingContents
from mesh.agent.refresh import BundleSource, RefreshPolicy, RefreshSchedule, UplinkError
from mesh.agent.routing import RoutingTable
from mesh.agent.store import AgentStore, Outgoing, StoredMessage
from mesh.backoff import full_jitter
from mesh.discovery import discovery_tag, tag_map
from mesh.discovery.mdns import MdnsDiscovery, local_addresses
from mesh.errors import MeshError
from mesh.files import read_bounded, write_atomic
from mesh.keyset.bundle import Bundle, open_bundle
from mesh.protocol import (
    Connection,
    ConnectionTerminated,
    DataReceived,
    FrameRejected,
    HandshakeCompleted,
    HandshakeRefused,
    Listener,
    LocalProtocolError,
    ProtocolError,
    Reason,
    Role,
    SessionConfig,
    Transport,
)
from mesh.protocol.events import Termination
from mesh.protocol.frames import starts_session
from mesh.protocol.state import CARRYING, TERMINAL
from mesh.timefmt import utc_iso
from mesh.token import SecureElement, Slot, TokenAbsent, TokenError
from mesh.transport import Link, read_preamble, write_preamble
from mesh.transport.address import parse_address
from mesh.wire import (
    MAX_HOPS,
    MAX_RECEIPT_IDS,
    MAX_TEXT,
    MAX_TEXT_BYTES,
    Chat,
    Message,
    Ping,
    Receipt,
    Relay,
    Routes,
    SessionGone,
    Status,
    WireError,
    check_position,
    decode,
    encode,
)

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger("snrmesh.agent")

DEFAULT_PORT = 7717
TICK = 0.5  # seconds between housekeeping rounds
ROUTES_EVERY = 10.0
RETRY_EVERY = 5.0
PING_AFTER = 15.0
LINK_SILENT = 60.0  # nothing read from a link's mate this long (routes go every 10 s): closed
ROLL_GRACE = 30.0  # an accepting side rolls a link itself if the dialler has not, this late
EXPIRY_WARNING = 600.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
PREAMBLE_TIMEOUT = 5.0
MAX_PENDING_RECEIPTS = 1000
NO_TAG = "-" * 20
ALERT_COALESCE = 60.0  # seconds during which the same alert is not raised again
MAX_ALERT_KEYS = 4096
TOKEN_CHECK_EVERY = 1.0  # seconds between checks that the token (a card) is still there
MAX_POSITION_FILE = 256  # bytes: LAT,LON,ALT
MAX_UNSENT_COUNT = 1000  # outbox rows counted for a mate a new bundle drops
FETCH_STOP_WAIT = 35.0  # seconds a stop waits for a bundle fetch (its link times out at 30)
_UNREADABLE = (Reason.AUTH_FAILED, Reason.UNKNOWN_KEY_PHASE)  # a record under other keys
GONE_EVERY = 5.0  # seconds between two SessionGone to the same mate
GONE_AGAIN = 120.0  # said twice on one session within this (4 heartbeats): it is dead too


def _undeliverable(counts: tuple[int, int]) -> str:
    """The tail of a revoked alert that says what ``abandon`` marked: its own messages (now
    ``undeliverable``), and group messages (still on their way to the other members)."""
    own, groups = counts
    tail = ""
    if own:
        tail += f"; {own} message{'s' * (own != 1)} to it will not be delivered (undeliverable)"
    if groups:
        tail += f"; {groups} group message{'s' * (groups != 1)} will not reach it"
    return tail


def _host(address: object) -> str:
    """``HOST`` of ``HOST:PORT`` (a refusal from a new source port is the same source)."""
    return str(address).rpartition(":")[0] or str(address)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    state_dir: Path
    listen: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT)
    peers: tuple[str, ...] = ()  # "HOST:PORT" or "IDENTITY@HOST:PORT"
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] | None = None  # None: all interfaces
    control_path: Path | None = None
    heartbeat: float = 30.0
    position: tuple[float, float, float] | None = None
    position_file: Path | None = None
    simulate_track: bool = False
    battery: float | None = None
    status_text: str | None = None
    blocked: frozenset[str] = frozenset()  # link cuts, for simulations
    clock_skew: float = 300.0
    # an AS this node reaches (``--as``): the bundle file is replaced by each one fetched
    bundle_path: Path | None = None
    refresh: RefreshPolicy = field(default_factory=RefreshPolicy)
    refresh_ahead: int = 1  # epochs past this one that a fetched bundle carries


@dataclass(slots=True)
class PeerInfo:
    identity: str
    role: str
    last_seen: float | None = None
    position: tuple[float, float, float] | None = None
    battery: float | None = None
    text: str | None = None
    refused_reason: str | None = None
    address: tuple[str, int] | None = None  # where to dial it (discovered or configured)
    candidates: list[tuple[str, int]] = field(default_factory=list)  # all it announced
    next_dial: float = 0.0
    failures: int = 0
    dialling: bool = False
    expiry_warned: float | None = None  # the end of the last CK an expiring alert was for
    relay_failures: int = 0  # housekeeping's relayed handshakes to it since ours was last up
    next_relay: float = 0.0  # when housekeeping may open our relayed session to it again


@dataclass(slots=True)
class StaticPeer:
    host: str
    port: int
    identity: str | None = None
    next_dial: float = 0.0
    failures: int = 0
    dialling: bool = False


@dataclass(slots=True)
class RelayedSessions:
    """Sessions with mates out of direct reach, carried in ``Relay`` messages."""

    outgoing: dict[str, Connection] = field(default_factory=dict)  # we initiated
    listener: Listener | None = None  # they initiated; source = their identity


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        bundle: Bundle,
        token: SecureElement,
        *,
        clock: Callable[[], float] = time.time,
        bundle_source: BundleSource | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.token = token
        self.identity = bundle.identity
        now = clock()
        self.store = AgentStore(config.state_dir)
        # a revocation is for good: one an earlier bundle listed stays, whatever this one says
        bundle = dataclasses.replace(bundle, revoked=self.store.remember_revoked(bundle.revoked))
        self.keys = KeyRing(bundle, token, self.store, now=now)
        self.session_config = SessionConfig(
            identity=self.identity,
            mission_id=bundle.mission.mission_id,
            clock_skew=config.clock_skew,
        )
        relay_config = SessionConfig(
            identity=self.identity,
            mission_id=bundle.mission.mission_id,
            clock_skew=config.clock_skew,
            transport=Transport.DATAGRAM,
        )
        self._relay_config = relay_config
        # mate -> when we last said SessionGone to it, and on which of our sessions
        self._gone_told: dict[str, tuple[float, Connection | None]] = {}
        self._heard: dict[str, float] = {}  # mate -> when we last read its session to us
        self.listener = Listener(config=self.session_config, keys=self.keys)
        self.relayed = RelayedSessions(
            listener=Listener(config=relay_config, keys=self.keys, source_is_peer=True)
        )
        self.routing = RoutingTable(self.identity)
        self.peers = {m.identity: PeerInfo(m.identity, m.role) for m in self.keys.mates.values()}
        self.links: dict[str, Link] = {}  # established, one per mate
        self._all_links: set[Link] = set()
        self._accepting: set[Link] = set()  # accepted, their session not up yet
        self.static = [self._static_peer(p) for p in config.peers]
        for name in sorted(config.blocked - self.peers.keys()):  # a typo blocks nothing
            log.warning("--block %s: not a dialogue mate in this bundle (no link to block)", name)
        self.control: ControlServer | None = None
        self.discovery: MdnsDiscovery | None = None
        self.listen_address: tuple[str, int] = config.listen
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dial_waiters: dict[Link, asyncio.Future[bool]] = {}
        self._flush_scheduled: set[str] = set()
        # alert cause -> when it was last raised, and the alert it raised (repeats update it)
        self._alerted: dict[tuple[object, ...], tuple[float, int]] = {}
        # Token presence: a card may be pulled out (see _check_token).
        self._token_state = "ok"
        self._token_message = f"{type(token).__name__} unlocked"
        self._token_checking = False
        self._last_token_check = -math.inf
        self._to_commit: list[tuple[Outgoing, asyncio.Future[None]]] = []
        self._stopping = asyncio.Event()
        self._routes_dirty = True
        self._last_routes = 0.0
        self._last_retry = 0.0
        self._last_heartbeat = -math.inf
        self._last_tick = -math.inf  # to notice the clock stepping back
        self._epoch_index: int | None = None
        self._retag = False  # a new bundle: tags and announcement again, same epoch
        self._pending_receipts: dict[str, list[Receipt]] = {}
        self._bundle_source = bundle_source
        self.refresh = RefreshSchedule(config.refresh)
        self._fetching: asyncio.Task[Any] | None = None
        self._uplink_alerted = False  # an uplink alert said fetching fails
        self._rng = random.Random()
        self._own_status: dict[str, Any] = {
            "position": config.position,
            "battery": config.battery,
            "text": config.status_text,
        }

    @property
    def bundle(self) -> Bundle:
        """The bundle this agent runs on: the key ring's (a fetch from the AS replaces it)."""
        return self.keys.bundle

    # -- lifecycle -------------------------------------------------------------------------------

    def _static_peer(self, text: str) -> StaticPeer:
        identity, _, address = text.rpartition("@")
        host, port = parse_address(address, DEFAULT_PORT)
        if identity and identity not in self.peers:
            raise MeshError(f"--peer {text}: {identity} is not a dialogue mate in this bundle")
        return StaticPeer(host, port, identity or None)

    async def start(self) -> None:
        host, port = self.config.listen
        try:
            self._server = await asyncio.start_server(self._accept, host, port)
        except OSError as exc:
            raise MeshError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sockname = self._server.sockets[0].getsockname()
        self.listen_address = (sockname[0], sockname[1])
        control = self.config.control_path or self.config.state_dir / "control.sock"
        self.control = ControlServer(control, self._control)
        await self.control.start()
        for revoked in sorted(self.bundle.revoked):
            unsent = _undeliverable(self.store.abandon(revoked))
            if unsent or not any(
                a.kind == "revoked" and a.peer == revoked for a in self.store.alerts()
            ):
                self._alert("revoked", revoked, f"{revoked} is revoked: it will be refused{unsent}")
        if self.config.mdns:
            interfaces = (
                None if self.config.mdns_interfaces is None else list(self.config.mdns_interfaces)
            )
            self.discovery = MdnsDiscovery(interfaces=interfaces, on_found=self._discovered)
            await self.discovery.async_start()
        self._spawn(self._housekeeping())
        log.info(
            "%s listening on %s:%d, control %s",
            self.identity,
            *self.listen_address,
            control,
        )

    async def run(self) -> None:
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        """Stop (a signal); asked again while a fetch from the AS holds the stop, abandon it."""
        if self._stopping.is_set() and self._fetching is not None and not self._fetching.done():
            log.warning("abandoning the fetch from the AS: the bundle file may not open next time")
            self._fetching.cancel()
        self._stopping.set()

    async def stop(self) -> None:
        self._stopping.set()  # no new fetch from here on (_tick)
        if self._fetching is not None and not self._fetching.done():
            # let a fetch end: cut short after its key change, it would leave the bundle
            # file sealed for keys the token no longer holds
            log.info(
                "stopping: waiting up to %.0f s for the fetch from the AS (again to abandon it)",
                FETCH_STOP_WAIT,
            )
            await asyncio.wait([self._fetching], timeout=FETCH_STOP_WAIT)
            self._fetching.cancel()
        for link in list(self._all_links):
            link.close()
        if self._server is not None:
            self._server.close()
        if self.discovery is not None:
            await self.discovery.async_close()
        if self.control is not None:
            await self.control.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("agent task failed: %r", task.exception())

    # -- peers and alerts ------------------------------------------------------------------------

    def _alert(
        self, kind: str, peer: str | None, message: str, *, key: tuple[object, ...] = ()
    ) -> None:
        """Raise an alert, unless the same one (``key``) was raised in the last minute.

        Later, while the alert it raised is not dismissed, the same cause
        updates that alert (time, message, one more repeat) instead of adding
        one. Without this, a stranger hammering the port, or a mate that
        refuses us for good, would grow the alert table and the operators'
        screens without bound.
        """
        now = self.clock()
        key = key or (kind, peer, message)
        when, row = self._alerted.get(key, (-math.inf, None))
        if now - when < ALERT_COALESCE:
            log.info("alert (repeated, not raised again): %s", message)
            return
        if len(self._alerted) >= MAX_ALERT_KEYS:
            self._alerted = {k: v for k, v in self._alerted.items() if now - v[0] < ALERT_COALESCE}
        alert = None if row is None else self.store.repeat_alert(row, now, message)
        if alert is None:
            alert = self.store.add_alert(now, kind, peer, message)
        self._alerted[key] = (now, alert.alert_id)
        log.warning("alert: %s", message)
        self._emit("alert", alert=alert.to_json())

    @property
    def _watched(self) -> bool:
        return self.control is not None and self.control.watched

    def _emit(self, event: str, **fields: Any) -> None:
        if self.control is not None and self.control.watched:
            self.control.broadcast(event, **fields)

    def peer_state(self, identity: str) -> tuple[str, str | None]:
        if identity in self.links:
            return "direct", None
        session = self.relayed.outgoing.get(identity)
        route = self.routing.route(identity)
        incoming = self.relayed.listener.connection(identity) if self.relayed.listener else None
        relayed_up = any(c is not None and c.state in CARRYING for c in (session, incoming))
        if relayed_up and route is not None:
            return "relayed", route.next_hop
        info = self.peers.get(identity)
        if info is not None and info.refused_reason:
            return "refused", None
        return "offline", None

    def peer_json(self, identity: str) -> dict[str, Any]:
        info = self.peers[identity]
        state, via = self.peer_state(identity)
        return {
            "identity": identity,
            "role": info.role,
            "state": state,
            "via": via,
            "last_seen": info.last_seen,
            "position": None if info.position is None else list(info.position),
            "battery": info.battery,
            "text": info.text,
            "ck_expires": self.keys.expiry(identity, self.clock()),
            "refused_reason": info.refused_reason if state == "refused" else None,
        }

    def _peer_changed(self, identity: str) -> None:
        if identity in self.peers and self._watched:
            self._emit("peer", peer=self.peer_json(identity))

    def _seen(self, identity: str) -> None:
        info = self.peers.get(identity)
        if info is not None:
            info.last_seen = self.clock()
            info.refused_reason = None

    # -- discovery and dialling -----------------------------------------------------------------

    def _tag(self, now: float) -> str:
        key = self.keys.discovery_key(now)
        return NO_TAG if key is None else discovery_tag(key, self.identity)

    def _discovered(self, identity: str, hosts: list[str], port: int) -> None:
        """A mate's announcement: it may name several addresses (one per network of its host),
        not all reachable from here, so a failed dial moves on to the next (``_dial_mate``)."""
        info = self.peers.get(identity)
        if info is None or identity in self.config.blocked:
            return
        candidates = [(host, port) for host in hosts]
        if candidates != info.candidates:
            log.info("discovered %s at %s", identity, ", ".join(f"{h}:{port}" for h in hosts))
            info.candidates = candidates
            info.address = candidates[0]
            info.next_dial = 0.0
            info.failures = 0

    def _backoff(self, failures: int) -> float:
        """Full jitter: a random wait in [0, min(cap, base * 2^n)]."""
        return full_jitter(failures, base=BACKOFF_BASE, cap=BACKOFF_CAP, rng=self._rng)

    def _dial_due(self, now: float) -> None:
        if not self.token_ok:  # no new handshake while the card is out
            return
        for info in self.peers.values():
            if (
                info.address is None
                or info.dialling
                or info.identity in self.links
                or info.identity in self.config.blocked
                or now < info.next_dial
            ):
                continue
            if self.keys.keyset_for(info.identity, now) is None:
                continue
            info.dialling = True
            self._spawn(self._dial_mate(info, *info.address))
        for static in self.static:
            if static.dialling or now < static.next_dial:
                continue
            if static.identity is not None and static.identity in self.links:
                continue
            static.dialling = True
            self._spawn(self._dial_static(static))

    async def _dial_mate(self, info: PeerInfo, host: str, port: int) -> None:
        ok = False
        try:
            if self.identity > info.identity and info.failures == 0:
                await asyncio.sleep(1.0)  # let the lower identity dial first: fewer duplicates
            ok = await self._dial(host, port, expect=info.identity)
        finally:
            info.dialling = False
            info.failures = 0 if ok else info.failures + 1
            info.next_dial = self.clock() + (1.0 if ok else self._backoff(info.failures))
            if not ok and (host, port) in info.candidates:  # the next announced address
                at = info.candidates.index((host, port))
                info.address = info.candidates[(at + 1) % len(info.candidates)]

    async def _dial_static(self, static: StaticPeer) -> None:
        ok = False
        try:
            ok = await self._dial(static.host, static.port, expect=static.identity, static=static)
        finally:
            static.dialling = False
            static.failures = 0 if ok else static.failures + 1
            static.next_dial = self.clock() + (1.0 if ok else self._backoff(static.failures))

    async def _dial(
        self,
        host: str,
        port: int,
        *,
        expect: str | None,
        static: StaticPeer | None = None,
        roll: bool = False,
    ) -> bool:
        """Open a link to HOST:PORT; True if a session came up (or one already existed)."""
        address = f"{host}:{port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        except (OSError, TimeoutError):
            return False
        tag = await read_preamble(reader, PREAMBLE_TIMEOUT)
        now = self.clock()
        key = self.keys.discovery_key(now)
        mates = tag_map(key, tuple(self.peers)) if key is not None else {}
        peer = mates.get(tag or "")
        if expect is not None and peer is None:
            peer = expect  # named by the operator: the handshake itself will tell
        if peer is None or peer != (expect or peer):
            writer.close()
            if static is not None and static.failures == 0:
                self._alert("refused", None, f"{address} is not a dialogue mate (unknown tag)")
            return False
        if static is not None:
            static.identity = peer
            if peer in self.peers:
                self.peers[peer].address = (host, port)
        if peer in self.config.blocked or (peer in self.links and not roll):
            writer.close()
            return peer in self.links
        keyset = self.keys.keyset_for(peer, now)
        if keyset is None:
            writer.close()
            return False
        connection = Connection(config=self.session_config, keys=self.keys, role=Role.INITIATOR)
        connection.connect(keyset.ck.ck_id, now, ticket=keyset.ticket)
        link = Link(connection, reader, writer, owner=self, address=address, clock=self.clock)
        self._all_links.add(link)
        up: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._dial_waiters[link] = up
        self._spawn(link.run())
        try:
            return await asyncio.wait_for(asyncio.shield(up), 15.0)
        except TimeoutError:
            link.close()
            return False
        finally:
            self._dial_waiters.pop(link, None)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        address = f"{peername[0]}:{peername[1]}" if peername else "?"
        if not self.token_ok:  # no new handshake while the card is out
            writer.close()
            return
        write_preamble(writer, self._tag(self.clock()))
        connection = self.listener.accept(address, self.clock())
        self._close_dropped()  # (a silent one may have made room for this one)
        if connection is None:
            writer.close()
            self._drain_listener_events()
            return
        link = Link(connection, reader, writer, owner=self, address=address, clock=self.clock)
        self._all_links.add(link)
        self._accepting.add(link)
        await link.run()

    def _close_dropped(self) -> None:
        """Close the sockets of accepted links whose session the listener ended.

        It ends those silent past the handshake timeout, and the oldest silent
        one when a newer connection needs its place. Nothing else would close
        their sockets: a link that never spoke waits on its socket with no timer
        of its own, and each one kept a file descriptor for good.
        """
        for link in [link for link in self._accepting if link.connection.state in TERMINAL]:
            link.close()

    def _drain_listener_events(self) -> None:
        for listener in (self.listener, self.relayed.listener):
            if listener is None:
                continue
            while (item := listener.next_event()) is not None:
                source, event = item
                self._alert(
                    "refused",
                    None,
                    f"refused a handshake from {source}: {event.reason.value}",
                    key=("refused", _host(source), event.reason),
                )

    # -- LinkOwner ------------------------------------------------------------------------------

    def link_up(self, link: Link, event: HandshakeCompleted) -> None:
        self._accepting.discard(link)
        peer = event.peer
        future = self._dial_waiters.get(link)
        if peer in self.config.blocked or peer not in self.peers:
            link.close()
            if future is not None and not future.done():
                future.set_result(False)
            return
        current = self.links.get(peer)
        if current is not None and current is not link:
            keep_new = self._better(link, current)
            loser = current if keep_new else link
            if not keep_new:
                loser.close()
                if future is not None and not future.done():
                    future.set_result(True)
                return
            self.links[peer] = link
            loser.close()
        else:
            self.links[peer] = link
        if future is not None and not future.done():
            future.set_result(True)
        log.info(
            "link up: %s (%s, %s)", peer, link.address, "dialled" if link.dialled else "accepted"
        )
        self._seen(peer)
        self.routing.link_up(peer)
        self._routes_dirty = True
        outgoing = self.relayed.outgoing.pop(peer, None)
        if outgoing is not None:
            outgoing.close(self.clock())
        self._peer_changed(peer)
        self._on_session_up(peer)

    def _better(self, new: Link, old: Link) -> bool:
        """Which of two links with one mate to keep: the later CK, then the lower initiator."""
        new_ck, old_ck = new.connection.ck, old.connection.ck
        if new_ck is not None and old_ck is not None and new_ck.not_after != old_ck.not_after:
            return new_ck.not_after > old_ck.not_after
        new_initiator = self.identity if new.dialled else new.peer or ""
        old_initiator = self.identity if old.dialled else old.peer or ""
        return new_initiator < old_initiator

    def link_data(self, link: Link, data: list[bytes]) -> None:
        peer = link.peer
        if peer is None or self.links.get(peer) is not link:
            return
        self._seen(peer)
        self._handle_messages(peer, data, link=link)

    def link_refused(self, link: Link, event: HandshakeRefused | FrameRejected) -> None:
        peer = link.peer
        reason = event.reason.value
        who = peer or link.address
        log.info("refused %s: %s", who, reason)
        if isinstance(event, HandshakeRefused):
            self._alert(
                "refused",
                peer,
                f"refused a handshake from {who}: {reason}",
                key=("refused", peer or _host(link.address), reason),
            )
            if peer in self.peers:
                self.peers[peer].refused_reason = reason
                self._peer_changed(peer)

    def link_closed(self, link: Link, event: ConnectionTerminated | None) -> None:
        self._all_links.discard(link)
        self._accepting.discard(link)
        future = self._dial_waiters.get(link)
        if future is not None and not future.done():
            future.set_result(False)
        peer = link.peer
        if (
            event is not None
            and event.termination is Termination.PEER_REFUSED
            and peer is not None
            and peer in self.peers
        ):
            self.peers[peer].refused_reason = "refused by peer"
            self._alert("refused", peer, f"{peer} refused our handshake")
        if peer is not None and self.links.get(peer) is link:
            del self.links[peer]
            self.routing.link_down(peer)
            self._routes_dirty = True
            log.info("link down: %s", peer)
            self._peer_changed(peer)

    # -- relayed sessions ------------------------------------------------------------------------

    def _relay_session(self, peer: str, *, create: bool) -> Connection | None:
        session = self.relayed.outgoing.get(peer)
        if session is not None and session.state not in TERMINAL:
            return session
        if not create or not self.token_ok or peer in self.links:  # (a link carries it all)
            return None
        if self.routing.route(peer) is None:
            return None
        now = self.clock()
        keyset = self.keys.keyset_for(peer, now)
        if keyset is None:
            return None
        session = Connection(config=self._relay_config, keys=self.keys, role=Role.INITIATOR)
        try:
            session.connect(keyset.ck.ck_id, now, ticket=keyset.ticket)
        except LocalProtocolError as exc:  # (a CK the key ring still offers, refused here)
            log.warning("relayed session to %s: %s", peer, exc)
            return None
        self.relayed.outgoing[peer] = session
        self._pump_relayed(peer, session, src_initiated=True)
        return session

    def _our_session_gone(self, peer: str, held: bytes | None) -> None:
        """The mate could not read records of ours (``SessionGone``, authenticated).

        If the session of ours it holds (``held``) is not our current one, ours
        is dead at its side (it restarted, or lost our key confirmation): ours
        goes and a new one is opened. If it is ours, the records it could not
        read were an older session's, still on their way, or forged; and a
        session still in its handshake is the new one already.
        """
        session = self.relayed.outgoing.get(peer)
        if session is None or session.state not in CARRYING or session.session_id is None:
            return
        if held is not None and hmac.compare_digest(held, session.session_id):
            # ours is fine: the records were older ones, or forged. Say so on it, so the mate
            # hears from us and does not take its own session for dead (_tell_session_gone)
            self._send_to(peer, Ping(), create=False)
            return
        log.info("relayed session to %s is gone at %s: a new one", peer, peer)
        self._renew_relayed(peer)

    def _reopen_relayed(self, now: float) -> None:
        """Open our relayed session again to each mate a route reaches and we hold none to.

        Relayed sessions open when a route appears or something is to be sent. A
        handshake lost on the way, or refused (the mate's card was out), would
        otherwise leave an idle pair with no session until someone types, and a
        mate whose own session is up with no way back. Retried with full jitter
        (as dialling is) until ours comes up.
        """
        if not self.token_ok:
            return
        for peer, info in self.peers.items():
            if peer in self.links or now < info.next_relay:
                continue
            ours = self.relayed.outgoing.get(peer)
            if ours is not None and ours.state not in TERMINAL:
                continue
            info.relay_failures += 1  # (also when no try could start: no route, no CK...)
            info.next_relay = now + self._backoff(info.relay_failures)
            self._relay_session(peer, create=True)

    def _renew_relayed(self, peer: str) -> None:
        """Drop our relayed session to ``peer`` (no CLOSE: nobody reads it) and open another;
        the outbox goes again on it when it comes up."""
        self.relayed.outgoing.pop(peer, None)
        self._relay_session(peer, create=True)  # (none while a direct link is up)

    def _tell_session_gone(self, peer: str, now: float) -> None:
        """``peer`` sent records no session of ours can read: tell it, on our own session.

        Only our session to it carries that authenticated. If we have none up,
        we open one (the mate probes its own when ours comes up). If we already
        said it on this same session within GONE_AGAIN, and nothing of the
        mate's has been read since (a mate that got it answers, at least with a
        ``ping``), our word did not get through: that session is dead at its side
        too (lost frames, or both sides restarted), so it is renewed. Records
        that merely fail (forged by whoever routes frames, or late ones of an
        older session) therefore never renew a session that works. At most once
        per GONE_EVERY.
        """
        when, told_on = self._gone_told.get(peer, (-math.inf, None))
        if now - when < GONE_EVERY:
            return
        ours = self.relayed.outgoing.get(peer)
        if ours is not None and ours.state in CARRYING:
            unanswered = self._heard.get(peer, -math.inf) < when
            if ours is told_on and now - when < GONE_AGAIN and unanswered:
                log.info("relayed session to %s unanswered: a new one", peer)
                self._renew_relayed(peer)
                self._gone_told[peer] = (now, None)
            else:
                listener = self.relayed.listener
                theirs = listener.connection(peer) if listener is not None else None
                held = (
                    theirs.session_id if theirs is not None and theirs.state in CARRYING else None
                )
                self._send_to(peer, SessionGone(held), create=False)
                self._gone_told[peer] = (now, ours)
        else:
            self._relay_session(peer, create=True)
            self._gone_told[peer] = (now, None)

    def _pump_relayed(self, peer: str, session: Connection, *, src_initiated: bool) -> None:
        """Send a relayed session's datagrams toward ``peer`` and handle its events."""
        for frame in session.datagrams_to_send():
            self._forward(Relay(self.identity, peer, MAX_HOPS, frame, src_initiated))
        batch: list[bytes] = []
        read = False  # a record of this session authenticated
        while (event := session.next_event()) is not None:
            if isinstance(event, DataReceived):
                batch.append(event.data)
                read = True
                continue
            if batch:
                self._handle_messages(peer, batch, link=None)
                batch = []
            if isinstance(event, HandshakeCompleted):
                # A relayed pair runs two sessions, one each way: we send on ours, so only ours
                # coming up flushes the outbox; theirs coming up makes sure ours is on its way.
                log.info("relayed session %s %s up", "to" if src_initiated else "from", peer)
                read = True
                self._seen(peer)
                self._peer_changed(peer)
                if src_initiated:
                    info = self.peers.get(peer)
                    if info is not None:
                        info.relay_failures, info.next_relay = 0, 0.0
                    self._on_session_up(peer)
                elif peer not in self.links:  # (a direct link carries it all)
                    ours = self._relay_session(peer, create=True)
                    if ours is not None and ours.state in CARRYING:
                        # a new session of theirs may mean they restarted: does ours still
                        # reach them? (if not, they answer SessionGone)
                        self._send_to(peer, Ping(), create=False)
            elif isinstance(event, HandshakeRefused):
                self._alert(
                    "refused",
                    peer,
                    f"refused a relayed handshake from {peer}: {event.reason.value}",
                )
            elif isinstance(event, ConnectionTerminated):
                self._peer_changed(peer)
            elif (
                isinstance(event, FrameRejected)
                and not src_initiated
                and event.reason in _UNREADABLE
                and session.state in CARRYING
            ):
                # records under keys this session does not hold: the mate's session to us is
                # not this one (its key confirmation was lost, and the candidate expired)
                self._tell_session_gone(peer, self.clock())
        if batch:
            self._seen(peer)
            self._handle_messages(peer, batch, link=None)
        if read and not src_initiated:
            self._heard[peer] = self.clock()

    def _forward(self, relay: Relay) -> bool:
        route = self.routing.route(relay.dst)
        link = None if route is None else self.links.get(route.next_hop)
        if link is None or relay.ttl <= 0:
            return False
        try:
            link.send(encode(relay))
        except (LocalProtocolError, WireError):
            return False
        return True

    def _relay_received(self, neighbour: str, relay: Relay) -> None:
        if relay.dst != self.identity:  # not ours: pass it on, one hop less to live
            self._forward(
                Relay(relay.src, relay.dst, relay.ttl - 1, relay.frame, relay.src_initiated)
            )
            return
        peer = relay.src
        if peer not in self.peers:  # (a blocked mate is still reachable through relays)
            return
        now = self.clock()
        if relay.src_initiated:
            listener = self.relayed.listener
            if listener is None:
                return
            held = listener.connection(peer)
            new_session = starts_session(relay.frame)
            if not self.token_ok and (new_session or held is None):
                return  # (no new relayed session while the card is out)
            session = listener.datagram_received(relay.frame, peer, now)
            self._drain_listener_events()
            if session is not None:
                self._pump_relayed(peer, session, src_initiated=False)
            elif not new_session and (held is None or held.state in TERMINAL):
                self._tell_session_gone(peer, now)
        else:
            outgoing = self.relayed.outgoing.get(peer)
            if outgoing is not None:
                with contextlib.suppress(ProtocolError):
                    outgoing.datagram_received(relay.frame, now)
                self._pump_relayed(peer, outgoing, src_initiated=True)

    # -- messages ------------------------------------------------------------------------------

    def _send_to(self, peer: str, message: Message, *, create: bool = True) -> bool:
        """Send an end-to-end message on the best session with ``peer``; False if none is up."""
        data = encode(message)
        link = self.links.get(peer)
        if link is not None:
            try:
                link.send(data)
                return True
            except LocalProtocolError:
                return False
        session = self._relay_session(peer, create=create)
        if session is None or session.state not in CARRYING:
            return False
        try:
            session.send_data(data, self.clock())
        except LocalProtocolError:
            return False
        self._pump_relayed(peer, session, src_initiated=True)
        return True

    def _on_session_up(self, peer: str) -> None:
        self._flush_outbox(peer, include_sent=True)
        for receipt in self._pending_receipts.pop(peer, []):
            self._send_to(peer, receipt)
        owed = self.store.owed_receipts(peer)
        if owed:
            self._receipt(peer, "read", owed)
        self._send_to(peer, self._status_message())

    def _commit(self, outgoing: Outgoing) -> asyncio.Future[None]:
        """Queue ``outgoing`` durably; the future resolves once it is on disk (group commit)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._to_commit:
            asyncio.get_running_loop().call_soon(self._commit_now)
        self._to_commit.append((outgoing, future))
        return future

    def _commit_now(self) -> None:
        batch, self._to_commit = self._to_commit, []
        try:
            self.store.queue([outgoing for outgoing, _ in batch])
        except sqlite3.Error as exc:  # the store failed: every waiting send fails with it
            for _, future in batch:
                future.set_exception(ControlError("internal", f"cannot store the message: {exc}"))
            return
        for outgoing, future in batch:
            future.set_result(None)
            for recipient in outgoing.recipients:
                self._schedule_flush(recipient)
            if self._watched:
                stored = StoredMessage(
                    outgoing.message_id,
                    "out",
                    outgoing.peer,
                    outgoing.group,
                    outgoing.text,
                    outgoing.at,
                    True,
                    "pending",
                )
                self._emit("message", message=stored.to_json())

    def _schedule_flush(self, peer: str) -> None:
        """Send what was queued for ``peer`` once the current burst of requests is handled.

        A burst of sends then costs one outbox query and one write for all of
        them, instead of one each.
        """
        if peer not in self._flush_scheduled:
            self._flush_scheduled.add(peer)
            asyncio.get_running_loop().call_soon(self._scheduled_flush, peer)

    def _scheduled_flush(self, peer: str) -> None:
        self._flush_scheduled.discard(peer)
        self._flush_outbox(peer, include_sent=False)

    def _flush_outbox(self, peer: str, *, include_sent: bool) -> None:
        sent: list[tuple[bytes, str]] = []
        for entry in self.store.undelivered(peer, include_sent=include_sent):
            chat = Chat(entry.message_id, entry.text, entry.at, entry.group)
            if not self._send_to(peer, chat):
                break
            sent.append((entry.message_id, peer))
        if sent:
            self.store.mark_sent(sent)

    def _receipt(self, peer: str, state: str, message_ids: list[bytes]) -> None:
        """Acknowledge ``message_ids`` to ``peer`` (a few receipts carry many ids).

        What no session can take yet waits: ``read`` receipts in the store (owed
        since ``mark_read`` committed, sent when a session with ``peer`` comes up
        and every RETRY_EVERY until ``peer`` sends them back), ``delivered`` ones
        in memory -- losing one of those costs only a copy the sender re-sends,
        which is acknowledged again.
        """
        for i in range(0, len(message_ids), MAX_RECEIPT_IDS):
            chunk = message_ids[i : i + MAX_RECEIPT_IDS]
            receipt = Receipt(tuple(chunk), state)
            if not self._send_to(peer, receipt, create=True) and state != "read":
                pending = self._pending_receipts.setdefault(peer, [])
                if len(pending) < MAX_PENDING_RECEIPTS:
                    pending.append(receipt)

    def _handle_messages(self, peer: str, records: list[bytes], *, link: Link | None) -> None:
        chats: list[tuple[bytes, str, str | None, str, float]] = []
        receipts: list[tuple[bytes, str, str]] = []
        read: list[bytes] = []  # ids in read receipts: of our messages, or our receipts back
        for data in records:
            try:
                message = decode(data)
            except WireError as exc:
                log.info("dropped a malformed message from %s: %s", peer, exc)
                continue
            if isinstance(message, Chat):
                if message.group is not None and peer not in self.bundle.groups.get(
                    message.group, ()
                ):
                    log.info("dropped a group message from %s: not in %s", peer, message.group)
                    continue
                chats.append(
                    (message.message_id, peer, message.group, message.text, message.sent_at)
                )
            elif isinstance(message, Receipt):
                receipts += [(mid, peer, message.state) for mid in message.message_ids]
                if message.state == "read":
                    read += message.message_ids
            elif isinstance(message, Status) and peer in self.peers:
                info = self.peers[peer]
                info.position, info.battery, info.text = (
                    message.position,
                    message.battery,
                    message.text,
                )
                self._peer_changed(peer)
            elif link is not None and isinstance(message, Routes):
                if self.routing.update(peer, message.reach):
                    self._routes_dirty = True
                    self._on_routes_changed()
            elif link is not None and isinstance(message, Relay):
                self._relay_received(peer, message)
            elif isinstance(message, Ping):
                pass
            elif isinstance(message, SessionGone) and link is None:
                self._our_session_gone(peer, message.held)
            else:
                log.info("dropped a hop-by-hop message from %s on a relayed session", peer)
        for message_id, _, state in self.store.receipts(receipts) if receipts else ():
            self._emit("receipt", message_id=message_id.hex(), peer=peer, state=state)
        if read:
            # A read receipt for messages we sent goes back as it came: "I have it", so the
            # reader stops sending it again; one for messages we read is that answer (and is
            # not answered, since we sent the reader none of those ids).
            ours = self.store.sent_to(peer, read)
            for i in range(0, len(ours), MAX_RECEIPT_IDS):
                self._send_to(peer, Receipt(tuple(ours[i : i + MAX_RECEIPT_IDS]), "read"))
            self.store.receipts_acknowledged(peer, read)
        if chats:
            for stored in self.store.receive(chats):
                self._emit("message", message=stored.to_json())
            # acknowledge copies we already had, too: the first receipt may have been lost
            self._receipt(peer, "delivered", [chat[0] for chat in chats])

    def _on_routes_changed(self) -> None:
        for peer in self.peers:
            self._relay_session(peer, create=True)  # (if a route reaches it and no link does)
            self._peer_changed(peer)

    def _status_message(self) -> Status:
        return Status(
            role=self.bundle.role,
            sent_at=self.clock(),
            position=self._position(),
            battery=self._own_status["battery"],
            text=self._own_status["text"],
        )

    def _position(self) -> tuple[float, float, float] | None:
        if self.config.position_file is not None:
            # another program's file, read at each beat: bounded, and a position a mate takes
            # (out of range, every mate would drop the whole heartbeat); else as without it
            with contextlib.suppress(OSError, ValueError, MeshError):
                raw = read_bounded(self.config.position_file, MAX_POSITION_FILE, what="position")
                return check_position([float(p) for p in raw.decode("ascii").split(",")[:3]])
        if self.config.simulate_track:
            base = self._own_status["position"] or (48.8566, 2.3522, 100.0)
            angle = (self.clock() / 60.0) % (2 * math.pi)
            return (base[0] + 0.01 * math.sin(angle), base[1] + 0.01 * math.cos(angle), base[2])
        position: tuple[float, float, float] | None = self._own_status["position"]
        return position

    # -- housekeeping ------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            try:
                self._tick(self.clock())
            except MeshError as exc:
                log.error("housekeeping: %s", exc)
            await asyncio.sleep(TICK)

    def _tick(self, now: float) -> None:
        if now < self._last_tick:
            self._clock_stepped(now - self._last_tick)
        self._last_tick = now
        if not self._token_checking and now - self._last_token_check >= TOKEN_CHECK_EVERY:
            self._last_token_check = now
            self._token_checking = True
            self._spawn(self._check_token())
        if (
            self._bundle_source is not None
            and not self._stopping.is_set()
            and self.refresh.due(now, lacking=lambda: self._lacking(now))
        ):
            self.refresh.started()
            self._fetching = self._spawn(self._fetch_bundle())
        self._check_epoch(now)
        self._dial_due(now)
        self._roll_links(now)
        for peer, session in list(self.relayed.outgoing.items()):
            session.handle_timer(now)
            self._pump_relayed(peer, session, src_initiated=True)
            if session.state in TERMINAL:
                del self.relayed.outgoing[peer]
        listener = self.relayed.listener
        if listener is not None:
            listener.handle_timer(now)
            for peer in self.peers:
                incoming = listener.connection(peer)
                if incoming is not None:
                    self._pump_relayed(peer, incoming, src_initiated=False)
        self._reopen_relayed(now)
        self._drain_listener_events()
        self.listener.handle_timer(now)
        self._close_dropped()
        if self._routes_dirty or now - self._last_routes >= ROUTES_EVERY:
            self._advertise_routes(now)
        if now - self._last_retry >= RETRY_EVERY:
            self._last_retry = now
            for peer in self.store.recipients_waiting():
                if peer in self.peers:
                    self._flush_outbox(peer, include_sent=True)
            for peer in self.store.owed_peers():
                if peer in self.peers:
                    self._receipt(peer, "read", self.store.owed_receipts(peer))
        if now - self._last_heartbeat >= self.config.heartbeat:
            self._last_heartbeat = now
            status = self._status_message()
            for peer in self.peers:
                self._send_to(peer, status, create=False)
        for peer, link in list(self.links.items()):
            if now - link.last_heard >= LINK_SILENT:  # a cut without a reset: TCP would
                log.info("link %s: nothing heard for %.0f s", peer, now - link.last_heard)
                link.close()  # hold it for many minutes, and a relay would never be tried
            elif now - link.last_activity >= PING_AFTER:
                with contextlib.suppress(LocalProtocolError):
                    link.send(encode(Ping()))
        self._warn_expiry(now)

    def _clock_stepped(self, step: float) -> None:
        """The clock went back ``-step`` seconds (an NTP step, an operator setting the time).

        Every time the agent keeps from it moves by as much: else each interval would
        wait until the clock came back there -- for hours no card check, no dial, no
        fetch, no routes. CK windows stay as they are: they are the mission's.
        """
        log.warning("the clock stepped back %.0f s: timers follow it", -step)
        self._last_token_check += step
        self._last_routes += step
        self._last_retry += step
        self._last_heartbeat += step
        for info in self.peers.values():
            info.next_dial += step
            info.next_relay += step
        for static in self.static:
            static.next_dial += step
        for link in self._all_links:
            link.last_heard += step
            link.last_activity += step
        self._alerted = {k: (when + step, row) for k, (when, row) in self._alerted.items()}
        self._gone_told = {p: (when + step, on) for p, (when, on) in self._gone_told.items()}
        self._heard = {p: when + step for p, when in self._heard.items()}
        self.refresh.clock_stepped(step)

    def _advertise_routes(self, now: float) -> None:
        self._routes_dirty = False
        self._last_routes = now
        for neighbour, link in list(self.links.items()):
            with contextlib.suppress(LocalProtocolError):
                link.send(encode(Routes(self.routing.advertisement(neighbour))))

    def _check_epoch(self, now: float) -> None:
        epoch = self.bundle.mission.epoch_at(now)
        index = None if epoch is None else epoch.index
        if index == self._epoch_index and not self._retag:
            return
        changed, self._epoch_index, self._retag = index != self._epoch_index, index, False
        if epoch is not None and changed:
            self._emit(
                "epoch", epoch={"index": epoch.index, "start": epoch.start, "end": epoch.end}
            )
        key = self.keys.discovery_key(now)
        if self.discovery is not None and key is not None:
            self.discovery.set_tags(tag_map(key, tuple(self.peers)))
            self._spawn(
                self.discovery.async_advertise(
                    discovery_tag(key, self.identity),
                    self._advertised_hosts(),
                    self.listen_address[1],
                )
            )
            self.discovery.rescan()
        elif self.discovery is not None:  # past the mission (or no key for this epoch)
            self.discovery.set_tags({})
            self._spawn(self.discovery.async_withdraw())

    def _advertised_hosts(self) -> list[str]:
        """Where mates dial us: the listen address, else every interface we announce on."""
        host = self.listen_address[0]
        if host not in ("0.0.0.0", "::", ""):
            return [host]
        interfaces = self.config.mdns_interfaces
        return list(interfaces) if interfaces else local_addresses()

    def _roll_links(self, now: float) -> None:
        """Make-before-break onto the epoch's CK once a link's CK is no longer the current one.

        At the epoch boundary the side that dialled a link dials again with the
        new epoch's CK; the new link replaces the old one (which kept working
        meanwhile: an established session does not expire with its CK). If that
        side is gone, the other side rolls after :data:`ROLL_GRACE` seconds.
        """
        if not self.token_ok:  # a roll is a new handshake: not while the card is out
            return
        for peer, link in list(self.links.items()):
            ck = link.connection.ck
            info = self.peers[peer]
            current = self.keys.keyset_for(peer, now)
            if ck is None or current is None or current.ck.ck_id == ck.ck_id or info.dialling:
                continue
            if link.dialled:
                host, _, port_text = link.address.rpartition(":")
                target: tuple[str, int] | None = (host, int(port_text))
            else:
                target = info.address if now >= current.ck.not_before + ROLL_GRACE else None
            if target is None:
                continue
            info.dialling = True

            async def roll(info: PeerInfo = info, target: tuple[str, int] = target) -> None:
                try:
                    await self._dial(*target, expect=info.identity, roll=True)
                finally:
                    info.dialling = False

            self._spawn(roll())

    def _warn_expiry(self, now: float) -> None:
        for peer, info in self.peers.items():
            expires = self.keys.expiry(peer, now)
            if expires is None or info.expiry_warned == expires:  # (a later bundle: again)
                continue
            if expires - now < EXPIRY_WARNING and self.keys.keyset_for(peer, expires) is None:
                info.expiry_warned = expires
                self._alert(
                    "expiring",
                    peer,
                    f"the last keyset with {peer} expires in {int(expires - now) // 60} min",
                )

    # -- a bundle from the AS (--as) ------------------------------------------------------------

    def _lacking(self, now: float) -> bool:
        """Whether a mate has no CK for now, or for the next epoch once this one nears its end."""
        if self.keys.strangers:  # a mate newer than our bundle dialled us
            return True
        mission = self.bundle.mission
        epoch = mission.epoch_at(now)
        if epoch is None:
            return False
        ahead = (
            epoch.end
            if self.config.refresh_ahead > 0
            and epoch.end - now <= self.config.refresh.lead
            and mission.epoch_at(epoch.end) is not None
            else None
        )
        return any(
            self.keys.keyset_for(mate, now) is None
            or (ahead is not None and self.keys.keyset_for(mate, ahead) is None)
            for mate in self.keys.mates
        )

    async def _fetch_bundle(self) -> None:
        """Fetch the bundle, open it (off the loop), take it; keep the old one on any failure."""
        assert self._bundle_source is not None
        generation = self.token.info().generation(Slot.MAC)
        was = self.refresh.state
        try:
            try:
                raw = await self._bundle_source()
                stale = self.token.info().generation(Slot.MAC) != generation
                contents, written = await asyncio.to_thread(
                    self._open_fetched, raw, self.clock(), stale
                )
                alerts = self._adopt(contents, None if written else raw, self.clock())
            except UplinkError:
                raise
            except MeshError as exc:  # a bundle that does not open, or does not fit
                raise UplinkError(f"the AS sent a bundle this node refuses: {exc}") from None
        except UplinkError as exc:
            stale = self.token.info().generation(Slot.MAC) != generation
            if stale:  # the link changed the token's keys, then no bundle came
                exc = UplinkError(
                    f"{exc}; the token's keys changed on the way, so the bundle file no longer "
                    "opens (a restart needs the AS): trying again soon",
                    retry_after=exc.retry_after,
                )
            retry = self.refresh.failed(self.clock(), exc, self._rng)
            wait = max(0, int(retry - self.clock()))
            log.warning("bundle from the AS: %s (next try in %d s)", exc, wait)
            # a first temporary failure (rate-limited, the token file busy) is only logged
            retrying = self.refresh.state == "retrying" and self.refresh.failures == 2
            refused = self.refresh.state == "refused" and was != "refused"
            if (retrying or refused or stale) and not self._stopping.is_set():
                self._uplink_alerted = True
                self._alert(
                    "uplink",
                    None,
                    f"no bundle from the AS: {exc}; running on the keysets held, "
                    f"next try in {wait} s",
                    key=("uplink", self.refresh.state, str(exc)),
                )
        except asyncio.CancelledError:
            self.refresh.running = False
            raise
        except Exception as exc:  # a bug (not a MeshError): logged, and fetching goes on
            self.refresh.failed(self.clock(), UplinkError(repr(exc)), self._rng)
            log.error("bundle from the AS: %r", exc)
        else:
            self.refresh.succeeded(self.clock())
            if self._uplink_alerted:  # the operator was told it failed: tell it is mended
                self._uplink_alerted = False
                alerts.append(("uplink", None, "bundle fetched from the AS again"))
            for kind, peer, message in alerts:
                self._alert(kind, peer, message)
            self._emit(
                "bundle",
                keysets=len(contents.bundle.keysets),
                mates=len(contents.mates),
                at=self.clock(),
            )

    def _open_fetched(self, raw: bytes, now: float, stale: bool) -> tuple[RingContents, bool]:
        """Check a fetched bundle and open its keys (in a thread: token work, one file write).

        ``stale``: the link changed the token's keys, so the bundle file no longer
        opens; the checked bundle replaces it at once, before opening its keys (a
        card's thousands of commands) that a stop may not wait for. Returns the
        keys and whether the file was written.
        """
        bundle = open_bundle(raw, self.token)  # sealed for the keys the token holds now
        held = self.bundle
        if bundle.mission.mission_id != held.mission.mission_id:
            raise UplinkError(
                f"the AS serves mission {bundle.mission.name!r}, not this agent's "
                f"{held.mission.name!r}",
                permanent=True,
            )
        if bundle.issued_at < held.issued_at - self.config.clock_skew:
            raise UplinkError(
                f"the AS sent a bundle issued {utc_iso(bundle.issued_at)}, older than the one "
                f"held ({utc_iso(held.issued_at)}): an AS restored from a backup?",
                permanent=True,
            )
        written = False
        if stale and self.config.bundle_path is not None:
            with contextlib.suppress(OSError):  # if it fails, _adopt tries again and says so
                write_atomic(self.config.bundle_path, raw)
                written = True
        # a revocation is for good: an AS that forgot one does not bring the node back
        bundle = dataclasses.replace(bundle, revoked=bundle.revoked | held.revoked)
        return RingContents.open(bundle, self.token, now=now), written

    def _adopt(
        self, contents: RingContents, raw: bytes | None, now: float
    ) -> list[tuple[str, str | None, str]]:
        """Run on ``contents`` from now on; returns the alerts to raise once it is all done.

        ``raw`` is what to write to the bundle file (None: written already).

        Nothing here waits or fails half-way: its revocations are stored and the
        key ring is swapped first (or nothing changes), then the peers follow.
        """
        previous_discovery = self.keys.discovery_keys
        was_revoked = self.keys.bundle.revoked
        bundle = contents.bundle
        # before the file, which holds the bundle as the AS sent it (that may omit one)
        self.store.remember_revoked(bundle.revoked)
        self.keys.install(contents)
        alerts: list[tuple[str, str | None, str]] = []
        mates = contents.mates
        for gone in [p for p in self.peers if p not in mates]:
            link = self.links.pop(gone, None)
            if link is not None:
                self.routing.link_down(gone)
                self._routes_dirty = True
                link.close()
            incoming = self.relayed.listener.connection(gone) if self.relayed.listener else None
            for session in (self.relayed.outgoing.pop(gone, None), incoming):
                if session is not None:
                    with contextlib.suppress(LocalProtocolError):
                        session.close(now)
            del self.peers[gone]  # nothing from it is taken any more (link_up, _relay_received)
            if gone in bundle.revoked:  # final: what waits for it can never reach it
                why, unsent = "is revoked", _undeliverable(self.store.abandon(gone))
            else:  # it may come back in a later bundle: what waits for it is kept
                why, waiting = (
                    "is no longer a dialogue mate",
                    len(self.store.undelivered(gone, limit=MAX_UNSENT_COUNT)),
                )
                unsent = (
                    f"; {waiting}{'+' * (waiting == MAX_UNSENT_COUNT)} message"
                    f"{'s' * (waiting != 1)} to it stay unsent (kept, should it come back)"
                    if waiting
                    else ""
                )
            alerts.append(
                ("revoked", gone, f"{gone} {why} (bundle from the AS): it will be refused{unsent}")
            )
        # a node dropped by an earlier bundle (suspended, say) and revoked now: what was kept
        # for it, should it come back, now never will be delivered
        for late in sorted(bundle.revoked - was_revoked - {a[1] for a in alerts} - set(mates)):
            if unsent := _undeliverable(self.store.abandon(late)):
                alerts.append(("revoked", late, f"{late} is revoked (bundle from the AS){unsent}"))
        added = [identity for identity in mates if identity not in self.peers]
        for identity in added:
            self.peers[identity] = PeerInfo(identity, mates[identity].role)
        if added or alerts or contents.discovery != previous_discovery:
            self._retag = True  # announce with this bundle's discovery key and mates
        if self.config.bundle_path is not None and raw is not None:
            try:
                write_atomic(self.config.bundle_path, raw)
            except OSError as exc:
                alerts.append(
                    (
                        "uplink",
                        None,
                        f"cannot write {self.config.bundle_path}: {exc.strerror}; "
                        "after a restart this node needs --as again",
                    )
                )
        mission = bundle.mission
        epochs = sorted(
            {(k.not_before - mission.start) // mission.epoch_seconds for k in bundle.keysets}
        )
        log.info(
            "bundle from the AS: %d mates, %d keysets (epochs %s), token generation %d",
            len(mates),
            len(bundle.keysets),
            ",".join(map(str, epochs)) or "none",
            self.token.info().generation(Slot.MAC),
        )
        return alerts

    # -- token presence ------------------------------------------------------------------------

    @property
    def token_ok(self) -> bool:
        """False while the token is away: established sessions go on, new handshakes do not."""
        return self._token_state == "ok"

    async def _check_token(self) -> None:
        """Ask the token whether it is still there, off the loop (a card answers over PC/SC).

        CKs were unwrapped at start, so sessions never need the card; but a node
        whose card is pulled out must stop admitting new peers until it is back
        (the card re-verifies its PIN by itself when it returns).
        """
        try:
            await asyncio.to_thread(self.token.check_present)
        except TokenAbsent as exc:
            self._set_token_state("absent", f"{exc}: new handshakes refused until it is back")
        except TokenError as exc:
            self._set_token_state("error", f"token unusable ({exc}): new handshakes refused")
        else:
            self._set_token_state("ok", f"{type(self.token).__name__} unlocked")
        finally:
            self._token_checking = False

    def _set_token_state(self, state: str, message: str) -> None:
        if state == self._token_state:
            return
        self._token_state, self._token_message = state, message
        if state == "ok":
            message = "the token is back: new handshakes accepted again"
        self._alert("token", None, message)

    # -- control API -------------------------------------------------------------------------------

    async def _control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise ControlError("bad-request", f"unknown op {op!r}")
        try:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await result
        except sqlite3.Error as exc:  # a full disk, say: an answer, not a dropped client
            log.error("control %s: the store failed: %s", op, exc)
            raise ControlError("internal", f"the agent's store failed: {exc}") from None
        return cast(dict[str, Any], result)

    def _op_hello(self, args: dict[str, Any]) -> dict[str, Any]:
        m = self.bundle.mission
        epoch = m.epoch_at(self.clock())
        return {
            "identity": self.identity,
            "role": self.bundle.role,
            "mission": {
                "name": m.name,
                "id": m.mission_id.hex(),
                "start": m.start,
                "end": m.end,
                "epoch_seconds": m.epoch_seconds,
            },
            "epoch": None
            if epoch is None
            else {"index": epoch.index, "start": epoch.start, "end": epoch.end},
            "token": {"state": self._token_state, "message": self._token_message},
            "listen": f"{self.listen_address[0]}:{self.listen_address[1]}",
            "links": len(self.links),
            "version": __version__,
            "uplink": None
            if self._bundle_source is None
            else {
                "state": self.refresh.state,
                "last_bundle": None
                if self.refresh.last_success == -math.inf
                else self.refresh.last_success,
                "failures": self.refresh.failures,
            },
        }

    def _op_peers(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"peers": [self.peer_json(p) for p in sorted(self.peers)]}

    def _op_groups(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"groups": {g: list(m) for g, m in self.bundle.groups.items()}}

    async def _op_send(self, args: dict[str, Any]) -> dict[str, Any]:
        text = args.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ControlError("bad-request", "send needs a non-empty 'text'")
        if len(text) > MAX_TEXT or len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ControlError(
                "too-large", f"text over {MAX_TEXT} characters or {MAX_TEXT_BYTES} bytes of UTF-8"
            )
        if not text.replace("\n", " ").replace("\t", " ").isprintable():
            raise ControlError("bad-request", "text has control characters")
        to, group = args.get("to"), args.get("group")
        if isinstance(to, str) and group is None:
            if to not in self.peers:
                revoked = to in self.bundle.revoked
                raise ControlError(
                    "unknown-peer",
                    f"{to} is revoked" if revoked else f"no dialogue mate named {to}",
                )
            recipients, peer = [to], to
        elif isinstance(group, str) and to is None:
            if group not in self.bundle.groups:
                raise ControlError("unknown-group", f"no group named {group}")
            recipients = [
                m for m in self.bundle.groups[group] if m != self.identity and m in self.peers
            ]
            peer = ""
        else:
            raise ControlError("bad-request", "send needs exactly one of 'to' and 'group'")
        outgoing = Outgoing(os.urandom(16), peer, group, text, self.clock(), tuple(recipients))
        await self._commit(outgoing)
        message_id = outgoing.message_id
        return {"message_id": message_id.hex(), "state": "pending"}

    def _op_history(self, args: dict[str, Any]) -> dict[str, Any]:
        peer, group, limit = args.get("peer"), args.get("group"), args.get("limit", 200)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 10_000:
            raise ControlError("bad-request", "limit must be 1..10000")
        if not all(v is None or isinstance(v, str) for v in (peer, group)):
            raise ControlError("bad-request", "peer and group must be text")
        if peer is not None and group is not None:
            raise ControlError("bad-request", "history takes at most one of 'peer' and 'group'")
        messages: list[StoredMessage] = self.store.history(peer=peer, group=group, limit=limit)
        # a typo would otherwise read as an empty conversation; a former mate's history stays
        if not messages and peer is not None and peer not in self.peers:
            raise ControlError("unknown-peer", f"no dialogue mate named {peer}, and no history")
        if not messages and group is not None and group not in self.bundle.groups:
            raise ControlError("unknown-group", f"no group named {group}, and no history")
        return {"messages": [m.to_json() for m in messages]}

    def _op_mark_read(self, args: dict[str, Any]) -> dict[str, Any]:
        peer, group = args.get("peer"), args.get("group")
        if (peer is None) == (group is None) or not isinstance(peer or group, str):
            raise ControlError("bad-request", "mark_read needs exactly one of 'peer' and 'group'")
        marked = self.store.mark_read(peer=peer, group=group, mates=self.peers)
        by_sender: dict[str, list[bytes]] = {}
        for message_id, sender in marked:
            if sender in self.peers:
                by_sender.setdefault(sender, []).append(message_id)
        for sender, message_ids in by_sender.items():
            self._receipt(sender, "read", message_ids)
        return {"marked": len(marked)}

    def _op_alerts(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"alerts": [a.to_json() for a in self.store.alerts()]}

    def _op_dismiss_alert(self, args: dict[str, Any]) -> dict[str, Any]:
        alert_id = args.get("alert_id")
        if (
            not isinstance(alert_id, int)
            or isinstance(alert_id, bool)
            or not 0 < alert_id < 2**63  # SQLite's INTEGER
            or not self.store.dismiss_alert(alert_id)
        ):
            raise ControlError("bad-request", "no such alert")
        return {}

    def _op_set_status(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            status = Status(
                self.bundle.role,
                self.clock(),
                None if args.get("position") is None else tuple(args["position"]),
                args.get("battery"),
                args.get("text"),
            )
            decode(encode(status))  # the same bounds a peer applies
        except (WireError, TypeError, ValueError):
            raise ControlError(
                "bad-request",
                "status: position [lat, lon, alt], battery 0..100, text up to 200 characters",
            ) from None
        self._own_status.update(position=status.position, battery=status.battery, text=status.text)
        for peer in self.peers:
            self._send_to(peer, self._status_message(), create=False)
        return {}

    def _op_subscribe(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"subscribed": True}

    def _op_sessions(self, args: dict[str, Any]) -> dict[str, Any]:
        """Diagnostics: which CKs this agent holds sessions under (ids only, never keys)."""
        sessions = []
        for peer, link in self.links.items():
            if link.connection.ck is not None:
                sessions.append(
                    {"peer": peer, "kind": "link", "ck_id": link.connection.ck.ck_id.hex()}
                )
        for peer, session in self.relayed.outgoing.items():
            if session.ck is not None:
                sessions.append({"peer": peer, "kind": "relayed", "ck_id": session.ck.ck_id.hex()})
        listener = self.relayed.listener
        for peer in self.peers:
            incoming = listener.connection(peer) if listener is not None else None
            if incoming is not None and incoming.ck is not None:
                sessions.append(
                    {"peer": peer, "kind": "relayed-in", "ck_id": incoming.ck.ck_id.hex()}
                )
        return {
            "sessions": sessions,
            "routes": {
                d: {"via": r.next_hop, "hops": r.hops} for d, r in self.routing.routes().items()
            },
        }
