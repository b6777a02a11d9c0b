"""The connection state machine: one table, both roles (h11's ``_state.py`` model).

Rules:

* A connection is an INITIATOR (it sends message 1) or a RESPONDER, for life;
  a rekey is a fresh handshake in the same roles.
* The initiator is ESTABLISHED when message 2 authenticates; the responder
  when the initiator's first record under the new keys decrypts (key
  confirmation). Before that, the responder has keys but no proof of a live peer.
* A responder configured with ``early_data`` (streams only) may send records
  in AWAIT_CONFIRM, under the keys of message 2 (SEND_EARLY); it still
  counts the initiator as authenticated only on confirmation.
* During REKEYING the old keys keep working in both directions; the new ones
  take over as ESTABLISHED is re-entered, so no record in flight is lost.
* CLOSE (either side's orderly close) and TIMEOUT (a handshake that did not
  finish) lead to CLOSED; FAIL (the peer misbehaved) leads to ERROR. Both are
  terminal: nothing leaves them.
* Anything not in the table is refused with :class:`LocalProtocolError`; the
  connection consults :meth:`ConnectionState.allows` before acting on a frame,
  so a frame that is not expected here is refused as UNEXPECTED_FRAME.

``docs/protocol.md`` draws this table.
"""

from __future__ import annotations

from enum import Enum

from mesh.protocol.config import Role
from mesh.protocol.errors import LocalProtocolError

__all__ = ["CARRYING", "LIVE", "TERMINAL", "TRANSITIONS", "ConnectionState", "State", "Trigger"]


class _Member(Enum):
    """Enum members are singletons compared by identity, so hashing by identity agrees
    with equality; it runs in C, where ``Enum.__hash__`` hashes the name in Python.
    State and trigger lookups happen on every frame."""

    __hash__ = object.__hash__


class State(_Member):
    START = "start"
    AWAIT_RESPONSE = "await-response"  # initiator: message 1 sent
    AWAIT_CONFIRM = "await-confirm"  # responder: message 2 sent, no record yet
    ESTABLISHED = "established"
    REKEYING = "rekeying"  # a fresh handshake runs under the current keys
    CLOSED = "closed"
    ERROR = "error"


class Trigger(_Member):
    CONNECT = "connect"  # initiator sends message 1
    RETRY = "retry"  # initiator sends a fresh message 1 (datagram loss)
    START_REKEY = "start-rekey"  # initiator sends message 1 on a live session
    RECV_INIT = "recv-init"  # responder accepts a message 1
    RECV_RESPONSE = "recv-response"  # initiator accepts message 2
    RECV_REFUSE = "recv-refuse"  # initiator receives the generic refusal
    RECV_CONFIRM = "recv-confirm"  # responder: first record under not-yet-confirmed keys
    RECV_RECORD = "recv-record"
    SEND_RECORD = "send-record"
    SEND_EARLY = "send-early"  # responder seals a record before key confirmation (early_data)
    CLOSE = "close"
    TIMEOUT = "timeout"
    FAIL = "fail"


INITIATOR, RESPONDER = Role.INITIATOR, Role.RESPONDER
S = State
T = Trigger

TERMINAL = frozenset({S.CLOSED, S.ERROR})
CARRYING = frozenset({S.ESTABLISHED, S.REKEYING})  # records flow under confirmed keys
_HANDSHAKING = {
    INITIATOR: (S.AWAIT_RESPONSE, S.REKEYING),
    RESPONDER: (S.AWAIT_CONFIRM, S.REKEYING),
}
LIVE = {  # the states each role can be in before the end
    INITIATOR: (S.START, S.AWAIT_RESPONSE, S.ESTABLISHED, S.REKEYING),
    RESPONDER: (S.START, S.AWAIT_CONFIRM, S.ESTABLISHED, S.REKEYING),
}

TRANSITIONS: dict[tuple[Role, State, Trigger], State] = {
    # initiator
    (INITIATOR, S.START, T.CONNECT): S.AWAIT_RESPONSE,
    (INITIATOR, S.AWAIT_RESPONSE, T.RETRY): S.AWAIT_RESPONSE,
    (INITIATOR, S.AWAIT_RESPONSE, T.RECV_RESPONSE): S.ESTABLISHED,
    (INITIATOR, S.AWAIT_RESPONSE, T.RECV_REFUSE): S.CLOSED,
    (INITIATOR, S.ESTABLISHED, T.START_REKEY): S.REKEYING,
    (INITIATOR, S.REKEYING, T.RETRY): S.REKEYING,
    (INITIATOR, S.REKEYING, T.RECV_RESPONSE): S.ESTABLISHED,
    (INITIATOR, S.REKEYING, T.RECV_REFUSE): S.CLOSED,
    # responder
    (RESPONDER, S.START, T.RECV_INIT): S.AWAIT_CONFIRM,
    (RESPONDER, S.AWAIT_CONFIRM, T.RECV_INIT): S.AWAIT_CONFIRM,  # the initiator retried
    (RESPONDER, S.AWAIT_CONFIRM, T.RECV_CONFIRM): S.ESTABLISHED,
    (RESPONDER, S.AWAIT_CONFIRM, T.SEND_EARLY): S.AWAIT_CONFIRM,  # only with early_data
    (RESPONDER, S.ESTABLISHED, T.RECV_INIT): S.REKEYING,
    (RESPONDER, S.REKEYING, T.RECV_INIT): S.REKEYING,  # the initiator retried its rekey
    (RESPONDER, S.REKEYING, T.RECV_CONFIRM): S.ESTABLISHED,
    # both: records flow under confirmed keys, during a rekey too
    **{
        (role, state, trigger): state
        for role in Role
        for state in CARRYING
        for trigger in (T.RECV_RECORD, T.SEND_RECORD)
    },
    # both: the ways out
    **{(role, state, T.TIMEOUT): S.CLOSED for role in Role for state in _HANDSHAKING[role]},
    **{(role, state, T.CLOSE): S.CLOSED for role in Role for state in LIVE[role]},
    **{(role, state, T.FAIL): S.ERROR for role in Role for state in LIVE[role]},
}


# the table by role, then by state: the row a connection consults for each trigger
_ROWS: dict[Role, dict[State, dict[Trigger, State]]] = {
    role: {
        state: {t: new for (r, s, t), new in TRANSITIONS.items() if (r, s) == (role, state)}
        for state in State
    }
    for role in Role
}


class ConnectionState:
    """The (role, state) pair, moved only through :data:`TRANSITIONS`.

    It keeps the table's row for its current state and whether that state is
    terminal, so the per-record checks cost one small dict lookup.
    """

    __slots__ = ("_row", "_rows", "role", "state", "terminal")

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = S.START
        self.terminal = False
        self._rows = _ROWS[role]
        self._row = self._rows[S.START]

    def allows(self, trigger: Trigger) -> bool:
        return trigger in self._row

    def process(self, trigger: Trigger) -> State:
        new = self._row.get(trigger)
        if new is None:
            raise LocalProtocolError(
                f"{trigger.value} is not allowed for a {self.role.value} in {self.state.value}"
            )
        self.state = new
        self.terminal = new in TERMINAL
        self._row = self._rows[new]
        return new
