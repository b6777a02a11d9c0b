"""One secure session with one peer, sans I/O (aioquic's ``QuicConnection`` model).

Bytes and ``now`` go in (:meth:`Connection.receive_data` on a stream,
:meth:`Connection.datagram_received` on datagrams, :meth:`Connection.handle_timer`);
bytes and events come out (:meth:`Connection.data_to_send` or
:meth:`Connection.datagrams_to_send`, :meth:`Connection.next_event`,
:meth:`Connection.get_timer`). Nothing here reads a clock or touches a socket.

What happens to input we refuse (the reason is always logged as an event):

* on a **stream**, anything refused is fatal: the connection moves to ERROR
  and the call raises :class:`RemoteProtocolError` (a byte stream that carried
  one forged byte cannot be resynchronised). A refused message 1 is answered
  with the one generic ``REFUSE`` frame, whatever the reason;
* on **datagrams**, anyone can inject a packet, so a refused datagram is
  dropped and the session or handshake in progress goes on; the exception is
  a responder that has nothing yet (state START), which refuses and dies.

Keys and epochs: every handshake yields one key per direction (``Split()``),
epoch 0 first, then one more per rekey; a record's phase bit is the low bit of
its epoch. The sender switches to new keys only when the peer is known to hold
them (initiator: on message 2; responder: on key confirmation), and the
receiver keeps the previous epoch's key until records under the new one arrive
(stream) or ``previous_key_lifetime`` passes (datagrams), so rekeying loses no
record in flight. The state table is in ``state.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from mesh.errors import MeshError
from mesh.keyset.keyset import CK_ID_SIZE, CommunicationKeyset
from mesh.protocol.config import Role, SessionConfig, Transport
from mesh.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from mesh.protocol.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    FrameRejected,
    HandshakeCompleted,
    HandshakeRefused,
    Termination,
)
from mesh.protocol.frames import (
    MAX_RECORD_PLAINTEXT,
    REFUSE_FRAME,
    TYPE_SIZE,
    FrameType,
    Init,
    RecordKind,
    frame_size,
    pull_init,
    unpack_record_header,
)
from mesh.protocol.handshake import (
    InitiatorHandshake,
    ResponderHandshake,
    SessionKeys,
    check_keyset,
)
from mesh.protocol.keysets import KeysetLookup
from mesh.protocol.ratelimit import RateLimiter
from mesh.protocol.records import RecordOpener, RecordSealer
from mesh.protocol.state import ConnectionState, State, Trigger

__all__ = ["MICROSECONDS", "Connection"]

MICROSECONDS = 1_000_000
_EMPTY = b""
_INIT_FRAMES = frozenset({FrameType.INIT, FrameType.TICKET_INIT, FrameType.REKEY_INIT})
_HANDSHAKE_FRAMES = _INIT_FRAMES | {FrameType.RESPONSE}


class Connection:
    """A session in one role, from the first handshake to CLOSED or ERROR.

    The initiator calls :meth:`connect`; the responder just feeds what it
    receives. ``ticket_limiter`` and ``source`` let a :class:`Listener` share
    one per-source limit of ticket unwraps between its connections.
    ``expected_peer``: a responder whose transport already names its peer (a
    relayed mate's frames come as that mate's) refuses a CK with anyone else
    (``IDENTITY_MISMATCH``), so a holder of another CK with us cannot speak
    under that name. That refusal is not answered: a message 1 under a CK with
    someone else did not come from the peer the transport names, and a REFUSE
    would reach that peer (ending a first handshake it may have in flight).
    """

    __slots__ = (
        "_config",
        "_datagram",
        "_epoch",
        "_events",
        "_expected_peer",
        "_handshake_deadline",
        "_inbox",
        "_initiation",
        "_keys",
        "_keys_since",
        "_limiter",
        "_openers",
        "_output",
        "_pending_capabilities",
        "_pending_sender",
        "_previous_expiry",
        "_queued",
        "_rekey_requested",
        "_retransmit_at",
        "_retransmit_delay",
        "_sender",
        "_source",
        "_state",
        "_ticket",
        "ck",
        "peer",
        "session_id",
    )

    def __init__(
        self,
        *,
        config: SessionConfig,
        keys: KeysetLookup,
        role: Role,
        ticket_limiter: RateLimiter | None = None,
        source: Hashable = None,
        expected_peer: str | None = None,
    ) -> None:
        self._config = config
        self._keys = keys
        self._state = ConnectionState(role)
        self._datagram = config.transport is Transport.DATAGRAM
        self._limiter = ticket_limiter  # made on the first ticket if the caller gave none
        self._source = source
        self._expected_peer = expected_peer  # a responder whose transport names its peer
        self._events: deque[Event] = deque()
        self._output: list[bytes] = []
        self._inbox = b""  # the start of an incomplete frame (streams)
        self._queued: list[bytes] = []
        self.ck: CommunicationKeyset | None = None
        self.peer: str | None = None
        # the handshake hash of this connection's first handshake (its keys, not yet their
        # confirmation): what names this session to both sides, e.g. in a peer's "which of
        # your sessions I hold" (the agent's SessionGone)
        self.session_id: bytes | None = None
        self._ticket: str | None = None
        self._initiation: InitiatorHandshake | None = None
        self._epoch = -1
        self._sender: RecordSealer | None = None
        self._pending_sender: RecordSealer | None = None
        self._pending_capabilities = 0
        self._openers: list[RecordOpener | None] = [None, None]
        self._handshake_deadline: float | None = None
        self._retransmit_at: float | None = None
        self._retransmit_delay = config.retransmit_interval
        self._previous_expiry: float | None = None
        self._keys_since = 0.0
        self._rekey_requested = False

    # -- introspection ---------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self._state.role

    @property
    def transport(self) -> Transport:
        return self._config.transport

    @property
    def state(self) -> State:
        return self._state.state

    @property
    def epoch(self) -> int:
        """Epoch of the keys in use (-1 before the first handshake completes)."""
        return self._epoch

    # -- caller actions --------------------------------------------------------------

    def connect(self, ck_id: bytes, now: float, *, ticket: str | None = None) -> None:
        """Start the handshake under the CK ``ck_id``.

        ``ticket`` is the peer's own wrapped copy of that CK, for a peer that
        may not hold it yet; it is sent with message 1 until the handshake completes.
        """
        if self.role is not Role.INITIATOR or not self._state.allows(Trigger.CONNECT):
            raise LocalProtocolError(f"connect() needs an initiator in START, not {self.state}")
        ck = self._usable_keyset(ck_id, now)
        self.ck, self.peer, self._ticket = ck, ck.peer_of(self._config.identity), ticket
        self._send_init(Trigger.CONNECT, now)

    def send_data(self, data: bytes, now: float) -> None:
        """Send one record of 1 to 16 KiB; queued (bounded) until the keys are ready.

        Ready means confirmed, except for a responder with ``early_data``: it
        sends under the keys of message 2 as soon as it has written it.
        """
        if not 0 < len(data) <= MAX_RECORD_PLAINTEXT:
            raise LocalProtocolError(f"a record carries 1 to {MAX_RECORD_PLAINTEXT} bytes")
        if self._state.allows(Trigger.SEND_RECORD):
            assert self._sender is not None
            self._output.append(self._sender.seal(RecordKind.DATA, data))
            self._maybe_rekey(now)
        elif self._config.early_data and self._state.allows(Trigger.SEND_EARLY):
            # the keys of message 2, which become the sending keys on confirmation
            assert self._pending_sender is not None
            self._output.append(self._pending_sender.seal(RecordKind.DATA, data))
        elif self._state.terminal:
            raise LocalProtocolError(f"the connection is {self._state.state.value}")
        elif len(self._queued) >= self._config.max_pending_records:
            raise LocalProtocolError("too many records queued before the handshake completed")
        else:
            self._queued.append(bytes(data))

    def close(self, now: float) -> None:
        """Orderly close: an authenticated CLOSE record if the session is up, then CLOSED."""
        if self._state.terminal:
            return
        sender = self._sender
        if (
            self._state.allows(Trigger.SEND_RECORD)
            and sender is not None
            and sender.sent < sender.limit
        ):
            self._output.append(sender.seal(RecordKind.CLOSE, _EMPTY))
        self._terminate(Trigger.CLOSE, Termination.LOCAL_CLOSE)

    # -- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from a stream transport; raises :class:`RemoteProtocolError` on a refusal."""
        if self._datagram:
            raise LocalProtocolError("this connection runs over datagrams")
        if self._state.terminal:
            return
        buffer = self._inbox + data if self._inbox else bytes(data)
        offset = 0
        while not self._state.terminal:
            try:
                size = frame_size(buffer, offset)
            except RemoteProtocolError as exc:  # the framing itself is refused
                fatal = self._refuse(exc, handshake=False)
            else:
                if size is None or len(buffer) - offset < size:
                    break
                frame = buffer[offset : offset + size]
                offset += size
                fatal = self._handle_frame(frame, now)
            if fatal is not None:
                self._inbox = b""
                raise fatal
        self._inbox = buffer[offset:]

    def datagram_received(self, data: bytes, now: float) -> None:
        """One datagram, which must hold exactly one frame.

        Raises :class:`RemoteProtocolError` only when the refusal ends the
        connection (a responder in START); otherwise a refused datagram is dropped.
        """
        if not self._datagram:
            raise LocalProtocolError("this connection runs over a stream")
        if self._state.terminal:
            return
        try:
            size = frame_size(data)
            if size != len(data):
                raise RemoteProtocolError(Reason.MALFORMED, "a datagram holds exactly one frame")
        except RemoteProtocolError as exc:
            fatal = self._refuse(exc, handshake=False)
        else:
            fatal = self._handle_frame(bytes(data), now)
        if fatal is not None:
            raise fatal

    # -- output ----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything to write to the stream, in order."""
        if self._datagram:
            raise LocalProtocolError("this connection runs over datagrams")
        data = b"".join(self._output)
        self._output.clear()
        return data

    def datagrams_to_send(self) -> list[bytes]:
        """The datagrams to send, one frame each, in order."""
        if not self._datagram:
            raise LocalProtocolError("this connection runs over a stream")
        datagrams, self._output = self._output, []
        return datagrams

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- timers ----------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (POSIX seconds), or None."""
        if self._state.terminal:
            return None
        times = [
            t
            for t in (self._handshake_deadline, self._retransmit_at, self._previous_expiry)
            if t is not None
        ]
        if self._state.state is State.ESTABLISHED and not self._rekey_requested:
            times.append(self._keys_since + self._config.rekey_after_seconds)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._state.terminal:
            return
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            self._terminate(Trigger.TIMEOUT, Termination.HANDSHAKE_TIMEOUT)
            return
        if self._retransmit_at is not None and now >= self._retransmit_at:
            self._retransmit_delay *= 2
            self._send_init(Trigger.RETRY, now)
        if self._previous_expiry is not None and now >= self._previous_expiry:
            self._openers[(self._epoch & 1) ^ 1] = None
            self._previous_expiry = None
        self._maybe_rekey(now)

    # -- frames ----------------------------------------------------------------------

    def _handle_frame(self, frame: bytes, now: float) -> RemoteProtocolError | None:
        """Act on one complete frame; returns the refusal to raise if it ended the connection."""
        kind = frame[0] & 0x0F
        try:
            if kind & FrameType.RECORD:
                self._handle_record(frame, now)
            elif kind in _INIT_FRAMES:
                self._handle_init(frame, now)
            elif kind == FrameType.RESPONSE:
                self._handle_response(frame, now)
            else:
                self._handle_refuse()
        except RemoteProtocolError as exc:
            is_init = kind in _INIT_FRAMES
            return self._refuse(
                exc,
                handshake=kind in _HANDSHAKE_FRAMES,
                ck_id=frame[TYPE_SIZE : TYPE_SIZE + CK_ID_SIZE] if is_init else None,
            )
        return None

    def _refuse(
        self, exc: RemoteProtocolError, *, handshake: bool, ck_id: bytes | None = None
    ) -> RemoteProtocolError | None:
        """Log why; drop the frame (datagrams with something to protect) or fail.

        Returns the error when the connection failed, for the public entry point to raise.
        """
        self._events.append(
            HandshakeRefused(exc.reason, ck_id) if handshake else FrameRejected(exc.reason)
        )
        starting_responder = self.role is Role.RESPONDER and self._state.state is State.START
        if self._datagram and not starting_responder:
            return None
        misdirected = self._expected_peer is not None and exc.reason is Reason.IDENTITY_MISMATCH
        if ck_id is not None and not misdirected:  # one generic answer, whatever the reason
            self._output.append(REFUSE_FRAME)  # (but not to a peer that did not send it)
        self._terminate(Trigger.FAIL, Termination.PROTOCOL_ERROR, exc.reason)
        return exc

    def _handle_init(self, frame: bytes, now: float) -> None:
        if self.role is not Role.RESPONDER or not self._state.allows(Trigger.RECV_INIT):
            raise RemoteProtocolError(Reason.UNEXPECTED_FRAME, "message 1")
        if self.ck is not None and self._config.single_handshake:
            raise RemoteProtocolError(Reason.UNEXPECTED_FRAME, "a second message 1")
        init = pull_init(frame)
        if init.rekey != (self._epoch >= 0):  # (a Listener takes a restarted peer's new session)
            raise RemoteProtocolError(
                Reason.UNEXPECTED_FRAME, "a rekey" if init.rekey else "a new session's message 1"
            )
        ck, from_ticket = self._responder_keyset(init, now)
        if self.ck is not None and ck.ck_id != self.ck.ck_id:
            raise RemoteProtocolError(Reason.CK_CHANGED, "a rekey must keep the session's CK")
        config = self._config
        check_keyset(
            ck,
            identity=config.identity,
            mission_id=config.mission_id,
            keys=self._keys,
            now=now,
            skew=config.clock_skew,
        )
        peer = ck.peer_of(config.identity)
        if self._expected_peer is not None and peer != self._expected_peer:
            raise RemoteProtocolError(Reason.IDENTITY_MISMATCH, f"{peer} as {self._expected_peer}")
        handshake = ResponderHandshake(ck, me=config.identity, peer=peer, rekey=init.rekey)
        timestamp, capabilities = handshake.read_init(init.noise_message)
        # Authentic from here on; now is it fresh?
        if timestamp <= self._keys.high_water(ck.ck_id, Role.RESPONDER):
            raise RemoteProtocolError(Reason.REPLAYED_INIT, f"timestamp {timestamp}")
        if abs(timestamp / MICROSECONDS - now) > config.clock_skew:
            raise RemoteProtocolError(Reason.CLOCK_SKEW, f"timestamp {timestamp}")
        self._keys.set_high_water(ck.ck_id, Role.RESPONDER, timestamp)
        if from_ticket:
            self._keys.cache(ck)
        response, keys = handshake.write_response(config.capabilities, capabilities)
        self._state.process(Trigger.RECV_INIT)
        self.ck, self.peer = ck, peer
        self._output.append(response)
        phase = (self._epoch + 1) & 1
        if self._epoch < 0:
            self.session_id = keys.handshake_hash
        self._install_opener(keys, phase)
        self._pending_sender = RecordSealer(keys.send, phase=phase, limit=config.record_limit)
        self._pending_capabilities = keys.peer_capabilities
        self._handshake_deadline = now + config.handshake_timeout

    def _responder_keyset(self, init: Init, now: float) -> tuple[CommunicationKeyset, bool]:
        """The CK named by message 1, from our store or else from its ticket."""
        ck = self._keys.lookup(init.ck_id)
        if ck is not None:
            return ck, False
        if init.ticket is None:
            raise RemoteProtocolError(Reason.UNKNOWN_CK, init.ck_id.hex())
        if self._limiter is None:
            self._limiter = RateLimiter()
        if not self._limiter.allow(self._source, now):
            raise RemoteProtocolError(Reason.TICKET_RATE_LIMITED, repr(self._source))
        try:
            ck = self._keys.open_ticket(init.ticket)
        except MeshError as exc:
            raise RemoteProtocolError(Reason.TICKET_INVALID, str(exc)) from None
        if ck.ck_id != init.ck_id:
            raise RemoteProtocolError(Reason.TICKET_INVALID, "ticket is for another ck_id")
        return ck, True

    def _handle_response(self, frame: bytes, now: float) -> None:
        initiation = self._initiation
        if initiation is None or not self._state.allows(Trigger.RECV_RESPONSE):
            raise RemoteProtocolError(Reason.UNEXPECTED_FRAME, "message 2")
        keys = initiation.read_response(frame, retry=self._datagram)
        self._state.process(Trigger.RECV_RESPONSE)
        self._initiation = None
        self._handshake_deadline = self._retransmit_at = None
        self._retransmit_delay = self._config.retransmit_interval
        self._epoch += 1
        if self._epoch == 0:
            self.session_id = keys.handshake_hash
        phase = self._epoch & 1
        self._install_opener(keys, phase)
        self._sender = RecordSealer(keys.send, phase=phase, limit=self._config.record_limit)
        self._output.append(self._sender.seal(RecordKind.KEY_CONFIRM, _EMPTY))
        self._keys_in_use(now, keys.peer_capabilities)

    def _handle_refuse(self) -> None:
        # A refusal is not authenticated: on datagrams, where anyone can inject one, it
        # may end a first handshake (as dropping packets would) but never a session.
        if not self._state.allows(Trigger.RECV_REFUSE) or (self._datagram and self._epoch >= 0):
            raise RemoteProtocolError(Reason.UNEXPECTED_FRAME, "refusal")
        self._terminate(Trigger.RECV_REFUSE, Termination.PEER_REFUSED)

    def _handle_record(self, frame: bytes, now: float) -> None:
        state = self._state
        if not (state.allows(Trigger.RECV_RECORD) or state.allows(Trigger.RECV_CONFIRM)):
            raise RemoteProtocolError(Reason.UNEXPECTED_FRAME, "record before the handshake")
        kind, phase, counter = unpack_record_header(frame)
        opener = self._openers[phase]
        if opener is None:
            raise RemoteProtocolError(Reason.UNKNOWN_KEY_PHASE, f"phase {phase}")
        plaintext = opener.open(frame, counter)
        pending = self._pending_sender
        if pending is not None and pending.phase == phase:  # key confirmation
            state.process(Trigger.RECV_CONFIRM)
            self._pending_sender = None
            self._sender = pending
            self._epoch += 1
            self._keys_in_use(now, self._pending_capabilities)
        if not self._datagram and phase == self._epoch & 1 and self._pending_sender is None:
            self._openers[phase ^ 1] = None  # strict order: no record of the previous epoch follows
        if kind is RecordKind.DATA:
            if not plaintext:
                raise RemoteProtocolError(Reason.MALFORMED, "empty data record")
            self._events.append(DataReceived(plaintext))
            self._maybe_rekey(now)
            return
        if plaintext:
            raise RemoteProtocolError(Reason.MALFORMED, f"{kind.name} record with a payload")
        if kind is RecordKind.CLOSE:
            self._terminate(Trigger.CLOSE, Termination.PEER_CLOSE)
        elif kind is RecordKind.REKEY_REQUEST and self.role is Role.INITIATOR:
            # a request that waited in the network while a rekey happened is stale
            if state.state is State.ESTABLISHED and phase == self._epoch & 1:
                self._start_rekey(now)
        elif kind is RecordKind.KEY_CONFIRM and self.role is Role.RESPONDER:
            pass  # its work is done above: any record under new keys confirms them
        else:
            raise RemoteProtocolError(Reason.UNEXPECTED_FRAME, f"{kind.name} from the {self.peer}")

    # -- keys ------------------------------------------------------------------------

    def _install_opener(self, keys: SessionKeys, phase: int) -> None:
        """The new epoch's receive key takes the slot of the previous epoch's, if still there."""
        self._openers[phase] = RecordOpener(keys.receive, phase=phase, datagram=self._datagram)
        self._previous_expiry = None

    def _keys_in_use(self, now: float, peer_capabilities: int) -> None:
        """The keys of a new epoch are confirmed: report it and send what waited for them."""
        self._handshake_deadline = None
        self._keys_since = now
        self._rekey_requested = False
        if self._datagram and self._openers[(self._epoch & 1) ^ 1] is not None:
            self._previous_expiry = now + self._config.previous_key_lifetime
        assert self.ck is not None and self.peer is not None
        self._events.append(
            HandshakeCompleted(self.peer, self.ck.ck_id, self._epoch, peer_capabilities)
        )
        sender = self._sender
        assert sender is not None
        while self._queued and sender.sent < sender.limit:
            self._output.append(sender.seal(RecordKind.DATA, self._queued.pop(0)))

    def _usable_keyset(self, ck_id: bytes, now: float) -> CommunicationKeyset:
        """The CK to initiate with; our own CK being unusable is the caller's problem."""
        ck = self._keys.lookup(ck_id)
        if ck is None:
            raise LocalProtocolError(f"no CK {ck_id.hex()} in the keyset store")
        config = self._config
        try:
            check_keyset(
                ck,
                identity=config.identity,
                mission_id=config.mission_id,
                keys=self._keys,
                now=now,
                skew=0.0,
            )
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot use {ck!r}: {exc.reason.value}") from None
        return ck

    def _send_init(self, trigger: Trigger, now: float) -> None:
        ck, peer = self.ck, self.peer
        assert ck is not None and peer is not None
        keys = self._keys
        timestamp = max(int(now * MICROSECONDS), keys.high_water(ck.ck_id, Role.INITIATOR) + 1)
        keys.set_high_water(ck.ck_id, Role.INITIATOR, timestamp)
        rekey = self._epoch >= 0
        self._initiation = InitiatorHandshake(
            ck,
            me=self._config.identity,
            peer=peer,
            timestamp=timestamp,
            capabilities=self._config.capabilities,
            ticket=None if rekey else self._ticket,
            rekey=rekey,
        )
        self._state.process(trigger)
        self._output.append(self._initiation.frame)
        if trigger is not Trigger.RETRY:
            self._handshake_deadline = now + self._config.handshake_timeout
        if self._datagram:
            self._retransmit_at = now + self._retransmit_delay

    def _maybe_rekey(self, now: float) -> None:
        """Start (initiator) or ask for (responder) a rekey when the keys are old or worn."""
        if (
            self._state.state is not State.ESTABLISHED
            or self._rekey_requested
            or self._config.single_handshake
        ):
            return
        sender, opener = self._sender, self._openers[self._epoch & 1]
        assert sender is not None and opener is not None
        config = self._config
        limit = config.rekey_after_records
        if (
            sender.sent < limit
            and opener.received < limit
            and now < self._keys_since + config.rekey_after_seconds
        ):
            return
        if self.role is Role.INITIATOR:
            self._start_rekey(now)
        elif sender.sent < sender.limit:
            self._output.append(sender.seal(RecordKind.REKEY_REQUEST, _EMPTY))
            self._rekey_requested = True

    def _start_rekey(self, now: float) -> None:
        assert self.ck is not None
        try:
            self.ck = self._usable_keyset(self.ck.ck_id, now)
        except LocalProtocolError:  # expired or revoked meanwhile: the session ends here
            self.close(now)
            return
        self._send_init(Trigger.START_REKEY, now)

    def _terminate(
        self, trigger: Trigger, termination: Termination, reason: Reason | None = None
    ) -> None:
        """Move to CLOSED or ERROR and forget every key and timer."""
        self._state.process(trigger)
        self._initiation = None
        self._sender = self._pending_sender = None
        self._openers = [None, None]
        self._queued.clear()
        self._handshake_deadline = self._retransmit_at = self._previous_expiry = None
        self._events.append(ConnectionTerminated(termination, reason))
