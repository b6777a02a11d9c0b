"""The transition table: what it allows, and that it refuses everything else."""

from __future__ import annotations

import pytest

from mesh.protocol import LocalProtocolError, Role, State
from mesh.protocol.state import LIVE, TERMINAL, TRANSITIONS, ConnectionState, Trigger


def test_terminal_states_have_no_exit() -> None:
    assert not [key for key in TRANSITIONS if key[1] in TERMINAL]


def test_every_live_state_can_fail_and_close() -> None:
    for role in Role:
        for state in LIVE[role]:
            assert TRANSITIONS[role, state, Trigger.FAIL] is State.ERROR
            assert TRANSITIONS[role, state, Trigger.CLOSE] is State.CLOSED


def test_every_state_in_the_table_is_reachable_for_its_role() -> None:
    """No dead rows: a state appears for a role only if that role can get there."""
    for role in Role:
        reachable, frontier = {State.START}, [State.START]
        while frontier:
            state = frontier.pop()
            for (r, s, _), new in TRANSITIONS.items():
                if (r, s) == (role, state) and new not in reachable:
                    reachable.add(new)
                    frontier.append(new)
        assert {s for r, s, _ in TRANSITIONS if r is role} <= reachable
        assert reachable == set(LIVE[role]) | TERMINAL


def test_roles_are_not_interchangeable() -> None:
    assert (Role.RESPONDER, State.START, Trigger.CONNECT) not in TRANSITIONS
    assert (Role.INITIATOR, State.START, Trigger.RECV_INIT) not in TRANSITIONS
    assert (Role.INITIATOR, State.ESTABLISHED, Trigger.RECV_CONFIRM) not in TRANSITIONS


def test_initiator_path() -> None:
    machine = ConnectionState(Role.INITIATOR)
    for trigger, state in [
        (Trigger.CONNECT, State.AWAIT_RESPONSE),
        (Trigger.RETRY, State.AWAIT_RESPONSE),
        (Trigger.RECV_RESPONSE, State.ESTABLISHED),
        (Trigger.START_REKEY, State.REKEYING),
        (Trigger.SEND_RECORD, State.REKEYING),
        (Trigger.RECV_RESPONSE, State.ESTABLISHED),
        (Trigger.CLOSE, State.CLOSED),
    ]:
        assert machine.process(trigger) is state
    assert machine.terminal
    with pytest.raises(LocalProtocolError):
        machine.process(Trigger.SEND_RECORD)


def test_responder_needs_confirmation() -> None:
    machine = ConnectionState(Role.RESPONDER)
    machine.process(Trigger.RECV_INIT)
    assert not machine.allows(Trigger.SEND_RECORD)
    assert machine.allows(Trigger.SEND_EARLY)  # only what early_data sends; nothing changes
    assert machine.process(Trigger.SEND_EARLY) is State.AWAIT_CONFIRM
    assert machine.allows(Trigger.RECV_CONFIRM) and not machine.allows(Trigger.RECV_RECORD)
    assert machine.process(Trigger.RECV_CONFIRM) is State.ESTABLISHED
    assert machine.process(Trigger.FAIL) is State.ERROR
    with pytest.raises(LocalProtocolError):
        machine.process(Trigger.CLOSE)
