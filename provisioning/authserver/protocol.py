"""The Authentication Server protocol, sans I/O: one server session, one client session.

Rules (``docs/authentication-server.md`` draws them):

* Clear phase: ``HELLO`` (identity, token key generation, client nonce) ->
  ``COOKIE`` (echo it in a new HELLO), ``REFUSE`` (with ``retry-after`` when
  temporary) or ``START`` (server nonce). Both sides then derive the link PSK
  from the token's AUTH key and the two nonces -- inside the token on the
  client (``SecureElement.derive``), from the stored key on the AS -- and run
  the project's Noise handshake over it (``mesh.protocol.Connection``).
* Secure phase, one CBOR message per record: ``CHALLENGE`` (maybe carrying a
  key change) -> ``ANSWER`` (the token's AUTH MAC) -> ``READY``; then any
  number (up to :data:`MAX_REQUESTS`) of ``REQUEST`` -> ``KEYSET`` | ``REFUSE``
  and ``BUNDLE-REQUEST`` -> ``BUNDLE`` parts | ``REFUSE``, answered in order.
* Three round trips: the AS sends the CHALLENGE with message 2 (the link's
  ``early_data``: message 1 already proved the PSK, and a fresh server nonce
  makes it unreplayable), and the client sends its REQUESTs right behind its
  ANSWER (pipelined: the AS reads them only once the ANSWER made it SERVING,
  and answers READY first, so a refused ANSWER leaves every request unread).
* The server never raises for what a client sends: any fault moves the session
  to CLOSED with one ``REFUSE`` (or, if the link itself fails, the handshake's
  generic refusal). A client session records the server's refusal as an event.

Bytes and ``now`` in (``receive_data``, ``handle_timer``), bytes and events out
(``data_to_send``, ``next_event``, ``get_timer``). The store is called
synchronously, like ``KeysetLookup`` in the session protocol: each call is one
short transaction.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from mesh.crypto import random_bytes
from mesh.protocol import (
    Connection,
    DataReceived,
    MemoryKeyStore,
    ProtocolError,
    Role,
    SessionConfig,
    State,
)
from mesh.protocol.events import ConnectionTerminated, Termination
from mesh.protocol.state import TERMINAL
from mesh.token import SecureElement, Slot, TokenError
from provisioning.authserver.cookies import BUNDLE_COST, Admission, AdmissionConfig
from provisioning.authserver.errors import (
    AuthServerError,
    LocalAuthError,
    MessageError,
    Refusal,
    RemoteAuthError,
)
from provisioning.authserver.keystate import (
    AS_IDENTITY,
    KeyChoice,
    KeyPolicy,
    LinkKey,
    Outcome,
    TokenKeys,
    answer_transcript,
    choose_link_key,
    judge_answer,
    link_context,
    link_keyset,
    link_psk,
    make_key_change,
)
from provisioning.authserver.messages import (
    BUNDLE_PART_SIZE,
    CHALLENGE_SIZE,
    MAX_LINK_BUNDLE,
    NONCE_SIZE,
    Answer,
    BundlePart,
    BundleRequest,
    Challenge,
    CookieReply,
    Hello,
    KeysetGrant,
    KeysetRequest,
    Message,
    Ready,
    Refuse,
    Start,
    decode,
    encode,
    frame_clear,
    pull_clear,
)
from provisioning.authserver.store import KeyStateStore, remember
from provisioning.errors import DeskCorrupt

__all__ = [
    "MAX_REQUESTS",
    "AuthService",
    "Authenticated",
    "BundleFetched",
    "ClientEvent",
    "ClientSession",
    "ClientState",
    "Granted",
    "LinkFailed",
    "Refused",
    "ServerSession",
    "ServerState",
]

log = logging.getLogger("snrmesh.as")

MAX_REQUESTS = 64  # keyset and bundle requests per link
MAX_HELLOS = 2  # the first, and one echoing a cookie
MAX_CLEAR_BUFFER = 1024
SESSION_TIMEOUT = 30.0
KEY_CHANGE_CACHE = 65_536  # key-change messages per worker (the same bytes again)
UNAVAILABLE_RETRY = 5.0
STORE_WARNING_EVERY = 10.0  # seconds between two warnings of a failing store, per worker
LINK_CLOCK_SKEW = 1e12  # the link's freshness comes from the nonces, not from clocks


def _link_config(identity: str, context_ck_mission: bytes) -> SessionConfig:
    # early_data: the AS's CHALLENGE rides with message 2 (see the module doc);
    # single_handshake: a link lives seconds, and each further message 1 would cost the AS
    # a Diffie-Hellman that no admission counts
    return SessionConfig(
        identity=identity,
        mission_id=context_ck_mission,
        clock_skew=LINK_CLOCK_SKEW,
        early_data=True,
        single_handshake=True,
    )


class _Link:
    """The Noise session of one AS link, and the CBOR messages it carries."""

    def __init__(self, me: str, client: str, context: bytes, psk: bytes, role: Role) -> None:
        ck = link_keyset(client, context, psk)
        self.ck = ck
        self.connection = Connection(
            config=_link_config(me, ck.mission_id), keys=MemoryKeyStore([ck]), role=role
        )

    def send(self, message: Message, now: float) -> None:
        self.connection.send_data(encode(message), now)


# -- server ---------------------------------------------------------------------------------


class ServerState(Enum):
    AWAIT_HELLO = "await-hello"
    HANDSHAKE = "handshake"
    AWAIT_ANSWER = "await-answer"
    SERVING = "serving"
    CLOSED = "closed"


class _S(Enum):  # server triggers
    COOKIE = "cookie"
    ADMIT = "admit"
    LINK_UP = "link-up"
    ANSWERED = "answered"
    REQUEST = "request"
    END = "end"


SERVER_TRANSITIONS: dict[tuple[ServerState, _S], ServerState] = {
    (ServerState.AWAIT_HELLO, _S.COOKIE): ServerState.AWAIT_HELLO,
    (ServerState.AWAIT_HELLO, _S.ADMIT): ServerState.HANDSHAKE,
    (ServerState.HANDSHAKE, _S.LINK_UP): ServerState.AWAIT_ANSWER,  # message 1 authenticated
    (ServerState.AWAIT_ANSWER, _S.ANSWERED): ServerState.SERVING,
    (ServerState.SERVING, _S.REQUEST): ServerState.SERVING,
    **{(state, _S.END): ServerState.CLOSED for state in ServerState},
}


@dataclass(slots=True)
class AuthService:
    """What every server session shares: the store, the admission rules, a bounded cache.

    Loop-only: one instance per worker process, used from one thread.
    """

    store: KeyStateStore
    admission: Admission
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    key_changes: OrderedDict[tuple[bytes, int], str] = field(default_factory=OrderedDict)
    counters: dict[str, int] = field(default_factory=dict)
    _store_warned_at: float = -math.inf

    @classmethod
    def create(
        cls,
        store: KeyStateStore,
        *,
        now: float,
        admission: AdmissionConfig | None = None,
        policy: KeyPolicy | None = None,
    ) -> AuthService:
        return cls(
            store=store,
            admission=Admission(admission or AdmissionConfig(), now=now),
            policy=policy or KeyPolicy(),
        )

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def store_failed(self, exc: Exception, now: float) -> None:
        """Count a store failure and tell the operator, at most once per ``STORE_WARNING_EVERY`` s.

        Its clients only hear ``unavailable``; a full disk or a lost database must
        show on the server's standard error too, but not once per request.
        """
        self.count("unavailable")
        if now - self._store_warned_at >= STORE_WARNING_EVERY:
            self._store_warned_at = now
            log.warning("AS store unavailable, answering 'unavailable': %s", exc)

    def forget_unsynced(self) -> None:
        """Drop the cache after a failed store sync: it may hold what was not made durable.

        A cached key change whose pending keys were lost would move a token to
        keys the store never holds.
        """
        self.key_changes.clear()

    def session(self, source: str, now: float) -> ServerSession:
        return ServerSession(self, source=source, now=now)


class ServerSession:
    """The AS side of one client connection."""

    __slots__ = (
        "_admitted",
        "_buffer",
        "_challenge",
        "_changing",
        "_context",
        "_deadline",
        "_hellos",
        "_key",
        "_link",
        "_output",
        "_record",
        "_requests",
        "_service",
        "identity",
        "source",
        "state",
    )

    def __init__(self, service: AuthService, *, source: str, now: float) -> None:
        self._service = service
        self.source = source
        self.state = ServerState.AWAIT_HELLO
        self.identity: str | None = None
        self._buffer = b""
        self._output: list[bytes] = []
        self._hellos = 0
        self._admitted = False
        self._deadline = now + SESSION_TIMEOUT
        self._link: _Link | None = None
        self._context = b""
        self._key: LinkKey | None = None
        self._record: TokenKeys | None = None
        self._challenge = b""
        self._changing = False
        self._requests = 0

    @property
    def closed(self) -> bool:
        return self.state is ServerState.CLOSED

    def _go(self, trigger: _S) -> None:
        self.state = SERVER_TRANSITIONS[(self.state, trigger)]

    # -- input / output ----------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        if self.closed:
            return
        try:
            if self.state is ServerState.AWAIT_HELLO:
                self._buffer += data
                if len(self._buffer) > MAX_CLEAR_BUFFER:
                    raise MessageError("clear phase overflow")
                while self.state is ServerState.AWAIT_HELLO and (
                    pulled := pull_clear(self._buffer)
                ):
                    message, used = pulled
                    self._buffer = self._buffer[used:]
                    self._on_hello(message, now)
                state: ServerState = self.state  # changed by _on_hello
                if state is ServerState.HANDSHAKE and self._buffer:
                    data, self._buffer = self._buffer, b""
                else:
                    return
            self._on_link_data(data, now)
        except MessageError:
            self._refuse(Refusal.MALFORMED, now)
        except RemoteAuthError as exc:
            self._refuse(exc.refusal, now)
        except (AuthServerError, DeskCorrupt) as exc:  # the store failed: come back later
            self._service.store_failed(exc, now)
            self._refuse(Refusal.UNAVAILABLE, now, UNAVAILABLE_RETRY)
        except ProtocolError:  # the link cannot carry our answer (closed under it): end it
            self._service.count("link_failed")
            self._finish()

    def data_to_send(self) -> bytes:
        if self._link is not None:
            self._output.append(self._link.connection.data_to_send())
        data = b"".join(self._output)
        self._output.clear()
        return data

    def get_timer(self) -> float | None:
        if self.closed:
            return None
        if self.state is ServerState.SERVING:
            return None  # the adapter's idle timeout ends a quiet, authenticated link
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if not self.closed and self.state is not ServerState.SERVING and now >= self._deadline:
            self._service.count("timeout")
            self._finish()

    def connection_lost(self) -> None:
        """The transport closed: release what the session held."""
        self._finish()

    # -- steps -------------------------------------------------------------------------

    def _on_hello(self, message: Message, now: float) -> None:
        if not isinstance(message, Hello) or message.identity == AS_IDENTITY:
            raise MessageError("expected HELLO")
        self._hellos += 1
        if self._hellos > MAX_HELLOS:
            raise MessageError("too many HELLOs")
        service = self._service
        verdict = service.admission.hello(self.source, message, now)
        if isinstance(verdict, CookieReply):
            self._go(_S.COOKIE)
            self._output.append(frame_clear(verdict))
            return
        if isinstance(verdict, Refuse):
            self._output.append(frame_clear(verdict))
            self._finish()
            return
        self._admitted = True
        service.count("admitted")
        self.identity = message.identity
        # read once per link: the challenge and the answer use this record, and every
        # change (key change, commit, issuance) re-reads the row under its lock
        record = self._record = service.store.load(message.identity)
        self._key = choose_link_key(record, message.generation, random_bytes(32))
        server_nonce = random_bytes(NONCE_SIZE)
        self._context = link_context(
            message.identity, message.generation, message.client_nonce, server_nonce
        )
        psk = link_psk(self._key.auth, self._context)
        self._link = _Link(AS_IDENTITY, message.identity, self._context, psk, Role.RESPONDER)
        self._go(_S.ADMIT)
        self._output.append(frame_clear(Start(server_nonce)))

    def _on_link_data(self, data: bytes, now: float) -> None:
        link = self._link
        assert link is not None
        try:
            link.connection.receive_data(data, now)
        except ProtocolError:
            self._service.count("link_failed")
            self._finish()  # the connection queued its generic REFUSE
            return
        if link.connection.state in TERMINAL:  # the client closed: nothing can be answered
            self._finish()
            return
        if self.state is ServerState.HANDSHAKE and link.connection.state is State.AWAIT_CONFIRM:
            self._on_link_up(now)  # message 2 is queued: the challenge goes with it
        while (event := link.connection.next_event()) is not None and not self.closed:
            if isinstance(event, DataReceived):
                self._on_message(decode(event.data), now)
            elif isinstance(event, ConnectionTerminated):
                self._finish()
            # HandshakeCompleted (the key confirmation) needs nothing: the ANSWER follows

    def _on_link_up(self, now: float) -> None:
        """Message 1 proved the AUTH key of the generation the HELLO named: challenge.

        Message 1 is keyed by the link PSK, which no one but the token could
        derive and which is new with this link's server nonce, so it is as good
        a proof as the key confirmation that follows; the challenge can leave
        with message 2 instead of a round trip later.
        """
        key, service = self._key, self._service
        assert key is not None and self.identity is not None and self._link is not None
        generation = key.generation
        key_change = None
        if key.choice is KeyChoice.CURRENT:
            record = self._record
            if (
                record is not None
                and not record.suspended
                and record.generation == generation
                and (record.pending is not None or service.policy.due(record, now))
            ):
                record = service.store.prepare_key_change(self.identity, generation, int(now))
                if record.pending is None:  # too many CK copies to rewrap online: keys kept
                    service.count("key_change_deferred")
                else:
                    cache_key = (record.token_id, generation + 1)
                    key_change = service.key_changes.get(cache_key)
                    if key_change is None:  # same pending keys; the same message when cached
                        key_change = make_key_change(record)
                        remember(service.key_changes, cache_key, key_change, KEY_CHANGE_CACHE)
                    generation += 1
                    self._key = LinkKey(KeyChoice.CURRENT, generation, record.pending)
                    self._changing = True
        elif key.choice is KeyChoice.PENDING:
            service.count("resumed_key_change")
        self._challenge = random_bytes(CHALLENGE_SIZE)
        self._go(_S.LINK_UP)
        self._link.send(Challenge(self._challenge, generation, key_change), now)

    def _on_message(self, message: Message, now: float) -> None:
        if self.state is ServerState.AWAIT_ANSWER and isinstance(message, Answer):
            self._on_answer(message, now)
        elif self.state is ServerState.SERVING and isinstance(message, KeysetRequest):
            self._on_request(message, now)
        elif self.state is ServerState.SERVING and isinstance(message, BundleRequest):
            self._on_bundle(message, now)
        else:
            raise MessageError(f"{type(message).__name__} in {self.state.value}")

    def _on_answer(self, answer: Answer, now: float) -> None:
        key, service, identity = self._key, self._service, self.identity
        assert key is not None and identity is not None and self._link is not None
        transcript = answer_transcript(self._context, self._challenge, key.generation)
        outcome = judge_answer(key.choice, self._changing, key.auth, transcript, answer.mac)
        service.count(f"answer_{outcome.value}")
        if outcome is Outcome.FAILED:
            raise RemoteAuthError(Refusal.AUTH_FAILED)
        if outcome is Outcome.CLONE:
            if self._record is not None and self._record.revoked:  # final already: no alert
                raise RemoteAuthError(Refusal.REVOKED, "copy of a revoked token")
            service.store.suspend(identity, key.generation, int(now))
            raise RemoteAuthError(Refusal.SUSPENDED, "cloned token")
        if self._record is None or self._record.suspended:
            # as read at HELLO, whichever key answered; a suspension since then is caught by
            # ``issue`` under its lock
            raise RemoteAuthError(
                Refusal.SUSPENDED if self._record is None else self._record.barred
            )
        if outcome is Outcome.COMMIT:
            service.store.commit_key_change(identity, key.generation, int(now))
        self._release()  # authenticated: no longer a pending challenge
        self._go(_S.ANSWERED)
        self._link.send(Ready(key.generation), now)

    def _next_request(self) -> str:
        """Count one more request of this link (bounded); the authenticated identity."""
        assert self.identity is not None and self._link is not None
        self._requests += 1
        if self._requests > MAX_REQUESTS:
            raise MessageError("too many requests on one link")
        self._go(_S.REQUEST)
        return self.identity

    def _on_request(self, request: KeysetRequest, now: float) -> None:
        service, identity = self._service, self._next_request()
        assert self._link is not None
        # no reply cache: a retransmitted request (its answer lost) is issued again, and the
        # store returns the same CK -- with the checks of now (a target revoked or suspended
        # since is refused) and the copies as they are now (rewrapped by a key change of
        # either party since, which a cached answer would not carry)
        wait = service.admission.request(identity, now)
        if wait is not None:
            self._link.send(Refuse(Refusal.RATE_LIMITED, wait), now)
            return
        try:
            issued = service.store.issue(
                identity, request.target, request.purpose, request.epoch, int(now)
            )
        except RemoteAuthError as exc:
            service.count(f"refused_{exc.refusal.value}")
            reply = encode(Refuse(exc.refusal))
        else:
            service.count("keysets")
            reply = encode(
                KeysetGrant(
                    request.request_id,
                    issued.ck_id,
                    issued.peer,
                    issued.not_before,
                    issued.not_after,
                    issued.own,
                    issued.ticket,
                )
            )
        self._link.connection.send_data(reply, now)

    def _on_bundle(self, request: BundleRequest, now: float) -> None:
        """The node's bundle, in parts; not cached: a retry builds it again (same CKs)."""
        service, identity = self._service, self._next_request()
        assert self._link is not None
        wait = service.admission.request(identity, now, BUNDLE_COST)
        if wait is not None:
            self._link.send(Refuse(Refusal.RATE_LIMITED, wait), now)
            return
        try:
            bundle = service.store.bundle(identity, request.ahead, int(now))
        except RemoteAuthError as exc:
            service.count(f"refused_{exc.refusal.value}")
            self._link.send(Refuse(exc.refusal), now)
            return
        service.count("bundles")
        size = BUNDLE_PART_SIZE
        count = -(-len(bundle) // size)
        for index in range(count):
            part = bundle[index * size : (index + 1) * size]
            self._link.send(BundlePart(request.request_id, index, count, part), now)

    # -- ending ------------------------------------------------------------------------

    def _refuse(self, refusal: Refusal, now: float, retry_after: float | None = None) -> None:
        if self.closed:
            return
        self._service.count(f"refused_{refusal.value}")
        link = self._link
        # once message 1 proved the token (message 2 queued), a refusal can ride with message 2
        secure = self.state in (ServerState.AWAIT_ANSWER, ServerState.SERVING) or (
            self.state is ServerState.HANDSHAKE
            and link is not None
            and link.connection.state is State.AWAIT_CONFIRM
        )
        if link is not None and secure:
            try:
                link.send(Refuse(refusal, retry_after), now)
                link.connection.close(now)
            except ProtocolError:
                pass
        elif self.state is ServerState.AWAIT_HELLO:
            self._output.append(frame_clear(Refuse(refusal, retry_after)))
        self._finish()

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self._service.admission.finished(self.source)

    def _finish(self) -> None:
        self._release()
        if not self.closed:
            self._go(_S.END)


# -- client ---------------------------------------------------------------------------------


class ClientState(Enum):
    HELLO_SENT = "hello-sent"
    HANDSHAKE = "handshake"
    AWAIT_READY = "await-ready"
    REQUESTING = "requesting"
    DONE = "done"
    FAILED = "failed"


class _C(Enum):  # client triggers
    COOKIE = "cookie"
    START = "start"
    CHALLENGED = "challenged"
    READY = "ready"
    ALL_ANSWERED = "all-answered"
    FAIL = "fail"


CLIENT_TRANSITIONS: dict[tuple[ClientState, _C], ClientState] = {
    (ClientState.HELLO_SENT, _C.COOKIE): ClientState.HELLO_SENT,
    (ClientState.HELLO_SENT, _C.START): ClientState.HANDSHAKE,
    (ClientState.HANDSHAKE, _C.CHALLENGED): ClientState.AWAIT_READY,
    (ClientState.AWAIT_READY, _C.READY): ClientState.REQUESTING,
    (ClientState.REQUESTING, _C.ALL_ANSWERED): ClientState.DONE,
    **{(s, _C.FAIL): ClientState.FAILED for s in ClientState if s is not ClientState.DONE},
}


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The AS accepted our token at ``generation`` (``key_changed``: it changed our keys)."""

    generation: int
    key_changed: bool


@dataclass(frozen=True, slots=True)
class Granted:
    grant: KeysetGrant


@dataclass(frozen=True, slots=True, repr=False)
class BundleFetched:
    """The bundle asked by ``request_id``, as sealed by the AS (open it with the token)."""

    request_id: bytes
    data: bytes

    def __repr__(self) -> str:
        return f"BundleFetched({len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class Refused:
    """The AS refused (the whole link, or one request when ``request_id`` is set)."""

    refusal: Refusal
    retry_after: float | None
    request_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class LinkFailed:
    """The link broke: bad answer from the AS, a token error, or the handshake failed.

    ``refused``: the AS refused the handshake -- it does not know this token at the
    generation it named, or its keys differ (a copy left behind by a key change). A
    retry gets the same answer, so clients do not retry it.
    """

    reason: str
    refused: bool = False


ClientEvent = Authenticated | Granted | BundleFetched | Refused | LinkFailed


class ClientSession:
    """The client side: authenticate ``token``, then send ``requests`` and collect answers."""

    __slots__ = (
        "_buffer",
        "_bundle_count",
        "_bundles",
        "_context",
        "_cookie_used",
        "_events",
        "_hello",
        "_key_changed",
        "_link",
        "_output",
        "_pending",
        "_requests",
        "_token",
        "identity",
        "state",
    )

    def __init__(
        self,
        token: SecureElement,
        requests: Sequence[KeysetRequest | BundleRequest],
        *,
        client_nonce: bytes | None = None,
    ) -> None:
        if len(requests) > MAX_REQUESTS:
            raise LocalAuthError(f"at most {MAX_REQUESTS} requests per link")
        info = token.info()
        self._token = token
        self.identity = info.identity
        self._requests = list(requests)
        self._pending = {r.request_id for r in requests}
        if len(self._pending) != len(requests):
            raise LocalAuthError("two requests of one link share a request id")
        # parts so far of each bundle asked for
        self._bundles: dict[bytes, list[bytes]] = {
            r.request_id: [] for r in requests if isinstance(r, BundleRequest)
        }
        self._bundle_count = 0  # of the bundle whose parts are arriving
        self._hello = Hello(
            info.identity, info.generation(Slot.AUTH), client_nonce or random_bytes(NONCE_SIZE)
        )
        self._events: deque[ClientEvent] = deque()
        self._output: list[bytes] = [frame_clear(self._hello)]
        self._buffer = b""
        self._cookie_used = False
        self._key_changed = False
        self._context = b""
        self._link: _Link | None = None
        self.state = ClientState.HELLO_SENT

    @property
    def finished(self) -> bool:
        return self.state in (ClientState.DONE, ClientState.FAILED)

    @property
    def cookie_used(self) -> bool:
        """The AS asked for a cookie on this link (it was under load from our source)."""
        return self._cookie_used

    def _go(self, trigger: _C) -> None:
        self.state = CLIENT_TRANSITIONS[(self.state, trigger)]

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        if self._link is not None:
            self._output.append(self._link.connection.data_to_send())
        data = b"".join(self._output)
        self._output.clear()
        return data

    def get_timer(self) -> float | None:
        return None if self._link is None else self._link.connection.get_timer()

    def handle_timer(self, now: float) -> None:
        if self._link is not None:
            self._link.connection.handle_timer(now)
            self._drain(now)

    def connection_lost(self, reason: str = "connection closed by the AS") -> None:
        if not self.finished:
            self._fail(reason)

    def receive_data(self, data: bytes, now: float) -> None:
        if self.finished:
            return
        try:
            if self.state is ClientState.HELLO_SENT:
                self._buffer += data
                if len(self._buffer) > MAX_CLEAR_BUFFER:
                    raise MessageError("clear phase overflow")
                while self.state is ClientState.HELLO_SENT and (pulled := pull_clear(self._buffer)):
                    message, used = pulled
                    self._buffer = self._buffer[used:]
                    self._on_clear(message, now)
                state: ClientState = self.state  # changed by _on_clear
                if state is not ClientState.HANDSHAKE or not self._buffer:
                    return
                data, self._buffer = self._buffer, b""
            assert self._link is not None
            try:
                self._link.connection.receive_data(data, now)
            except ProtocolError as exc:
                self._fail(f"link refused: {exc}")
                return
            self._drain(now)
        except MessageError as exc:  # 'as request' said only "clear phase overflow"
            self._fail(f"what came back is not an Authentication Server's answer ({exc})")
        except TokenError as exc:
            self._fail(str(exc))

    def _on_clear(self, message: Message, now: float) -> None:
        if isinstance(message, CookieReply) and not self._cookie_used:
            self._cookie_used = True
            self._go(_C.COOKIE)
            hello = self._hello
            self._output.append(
                frame_clear(
                    Hello(hello.identity, hello.generation, hello.client_nonce, message.cookie)
                )
            )
        elif isinstance(message, Refuse):
            self._events.append(Refused(message.refusal, message.retry_after))
            self._go(_C.FAIL)
        elif isinstance(message, Start):
            hello = self._hello
            self._context = link_context(
                hello.identity, hello.generation, hello.client_nonce, message.server_nonce
            )
            psk = self._token.derive(Slot.AUTH, self._context)  # the static key stays inside
            self._link = _Link(hello.identity, hello.identity, self._context, psk, Role.INITIATOR)
            self._link.connection.connect(self._link.ck.ck_id, now)
            self._go(_C.START)
        else:
            raise MessageError(f"unexpected {type(message).__name__}")

    def _drain(self, now: float) -> None:
        link = self._link
        assert link is not None
        while (event := link.connection.next_event()) is not None and not self.finished:
            if isinstance(event, DataReceived):
                self._on_message(decode(event.data), now)
            elif isinstance(event, ConnectionTerminated):
                refused = (
                    self.state is ClientState.HANDSHAKE
                    and event.termination is Termination.PEER_REFUSED
                )
                self._fail(f"link ended ({event.reason or event.termination})", refused=refused)

    def _on_message(self, message: Message, now: float) -> None:
        if isinstance(message, Refuse):
            if self.state is ClientState.REQUESTING and self._pending:
                # a refused request: which one is known by order (answers come in order)
                rid = next(r.request_id for r in self._requests if r.request_id in self._pending)
                self._pending.discard(rid)
                self._events.append(Refused(message.refusal, message.retry_after, rid))
                self._maybe_done()
            else:
                self._events.append(Refused(message.refusal, message.retry_after))
                self._go(_C.FAIL)
        elif self.state is ClientState.HANDSHAKE and isinstance(message, Challenge):
            self._on_challenge(message, now)
        elif self.state is ClientState.AWAIT_READY and isinstance(message, Ready):
            self._go(_C.READY)
            self._events.append(Authenticated(message.generation, self._key_changed))
            self._maybe_done()
        elif self.state is ClientState.REQUESTING and isinstance(message, BundlePart):
            self._on_bundle_part(message)
        elif self.state is ClientState.REQUESTING and isinstance(message, KeysetGrant):
            if message.request_id not in self._pending or message.request_id in self._bundles:
                raise MessageError("a keyset we did not ask for")
            asked = next(r for r in self._requests if r.request_id == message.request_id)
            if isinstance(asked, KeysetRequest) and message.peer != asked.target:
                raise MessageError(f"a keyset with {message.peer}, asked for {asked.target}")
            self._pending.discard(message.request_id)
            self._events.append(Granted(message))
            self._maybe_done()
        else:
            raise MessageError(f"unexpected {type(message).__name__} in {self.state.value}")

    def _on_bundle_part(self, part: BundlePart) -> None:
        """Parts come in order, all of one bundle before the next answer; bounded in all."""
        parts = self._bundles.get(part.request_id)
        if parts is None or part.request_id not in self._pending:
            raise MessageError("a bundle we did not ask for")
        expected = next(r.request_id for r in self._requests if r.request_id in self._pending)
        if part.request_id != expected or part.index != len(parts):
            raise MessageError("bundle part out of order")
        if parts and part.count != self._bundle_count:
            raise MessageError("bundle parts disagree on their count")
        parts.append(part.data)
        self._bundle_count = part.count
        if len(parts) == part.count:
            data = b"".join(parts)
            parts.clear()
            if len(data) > MAX_LINK_BUNDLE:  # pragma: no cover - bounded by count and size
                raise MessageError("bundle too large")
            self._pending.discard(part.request_id)
            self._events.append(BundleFetched(part.request_id, data))
            self._maybe_done()

    def _on_challenge(self, challenge: Challenge, now: float) -> None:
        token = self._token
        if challenge.key_change is not None:
            token.key_change(challenge.key_change)  # refused unless under our current key
            self._key_changed = True
        if token.info().generation(Slot.AUTH) != challenge.generation:
            raise MessageError("challenge for a key generation the token does not hold")
        transcript = answer_transcript(self._context, challenge.challenge, challenge.generation)
        assert self._link is not None
        self._go(_C.CHALLENGED)
        self._link.send(Answer(token.mac(Slot.AUTH, transcript)), now)
        for request in self._requests:  # pipelined: read by the AS once the answer holds
            self._link.send(request, now)

    def _maybe_done(self) -> None:
        """Done once every request is answered; the caller then closes the connection.

        No CLOSE record: the AS acts on nothing after the last answer (a
        truncated link only costs *us* answers), so it would be a write on
        each side for nothing.
        """
        if not self._pending and self.state is ClientState.REQUESTING:
            self._go(_C.ALL_ANSWERED)

    def _fail(self, reason: str, *, refused: bool = False) -> None:
        if not self.finished:
            self._events.append(LinkFailed(reason, refused))
            self._go(_C.FAIL)
