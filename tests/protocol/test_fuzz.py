"""Random mutations (hypothesis) of a whole session, on datagrams and on a stream.

Whatever is mutated, only :class:`RemoteProtocolError` may escape, nothing but
genuine plaintext comes out (each at most once, in order on a stream), and
every datagram that differs from the genuine one is refused and logged.
"""

from __future__ import annotations

from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.crypto.noise import KeyPair
from mesh.keyset.keyset import CommunicationKeyset
from mesh.protocol import (
    Connection,
    ConnectionTerminated,
    FrameRejected,
    HandshakeRefused,
    MemoryKeyStore,
    Role,
    State,
    Transport,
)
from mesh.protocol.frames import REFUSE_FRAME
from tests.protocol.harness import NOW, config, deliver, drain, make_pair, received_data

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MESSAGES = [b"alpha %d" % n for n in range(3)]


@st.composite
def mutations(draw: st.DrawFn, frame: bytes) -> bytes:
    """One random damage: bit flips, a cut, an insertion, a splice, or a byte overwrite."""
    data = bytearray(frame)
    kind = draw(st.sampled_from(["flip", "cut", "insert", "overwrite", "truncate"]))
    index = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
    if kind == "flip":
        data[index] ^= draw(st.integers(min_value=1, max_value=255))
    elif kind == "cut":
        del data[index : index + draw(st.integers(min_value=1, max_value=8))]
    elif kind == "insert":
        data[index:index] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=8))
        data[index : index + len(chunk)] = chunk
    else:
        del data[index:]
    return bytes(data)


@SETTINGS
@given(st.data())
def test_random_mutations_on_datagrams(data: st.DataObject) -> None:
    pair = make_pair(Transport.DATAGRAM)
    wire = pair.wire()
    sends = {"i": list(MESSAGES), "r": [b"bravo"]}
    delivered: dict[str, list[bytes]] = {"i": [], "r": []}
    for step in range(6):  # INIT, RESPONSE, CONFIRM+data, then data both ways
        for side, other in (("i", "r"), ("r", "i")):
            if step >= 2 and sends[side]:
                getattr(wire, "initiator" if side == "i" else "responder").send_data(
                    sends[side].pop(0), NOW
                )
            for frame in wire.take(side):
                for _ in range(data.draw(st.integers(min_value=0, max_value=2))):
                    mutated = data.draw(mutations(frame))
                    if mutated == frame or (other == "i" and mutated == REFUSE_FRAME):
                        continue  # not an attack / the one documented unauthenticated frame
                    if other == "r" and wire.responder.state is State.START:
                        target = pair.responder()  # a fresh source for each forged message 1
                        assert deliver(target, mutated) is not None
                        *events, end = drain(target)  # refused, and that source is done
                        assert isinstance(end, ConnectionTerminated)
                    else:
                        target = wire.initiator if other == "i" else wire.responder
                        assert deliver(target, mutated) is None
                        events = drain(target)
                    assert len(events) == 1 and isinstance(
                        events[0], HandshakeRefused | FrameRejected
                    ), events
                assert deliver(wire.initiator if other == "i" else wire.responder, frame) is None
                receiver = wire.initiator if other == "i" else wire.responder
                delivered[other] += received_data(drain(receiver))
    assert delivered["r"] == MESSAGES and delivered["i"] == [b"bravo"]


# The responder's ephemeral key, pinned in the stream test: a fresh responder then answers
# the recorded message 1 exactly as the genuine one did, so the recorded stream (message 1,
# key confirmation, records) replays whole into a victim and mutations reach its records.
RESPONDER_EPHEMERAL = KeyPair.generate()


def _victim(ck: CommunicationKeyset) -> Connection:
    """A responder that holds the CK but no high-water mark (else message 1 is a replay)."""
    return Connection(
        config=config("bravo", Transport.STREAM), keys=MemoryKeyStore([ck]), role=Role.RESPONDER
    )


@SETTINGS
@given(st.data())
def test_random_mutations_on_a_stream(data: st.DataObject) -> None:
    pair = make_pair(Transport.STREAM)
    wire = pair.wire()
    [init] = wire.take("i")
    with mock.patch.object(KeyPair, "generate", lambda: RESPONDER_EPHEMERAL):
        wire.to("r", init)
        [response] = wire.take("r")
        wire.to("i", response)
        for message in MESSAGES:
            wire.initiator.send_data(message, NOW)
        genuine = b"".join(wire.take("i"))  # key confirmation and three records
        stream = init + genuine
        control = _victim(pair.ck)  # the recording itself opens: the test can fail
        assert deliver(control, stream) is None
        assert received_data(drain(control)) == MESSAGES
        victim = _victim(pair.ck)
        mutated = data.draw(mutations(stream))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(mutated)), max_size=4)))
        error = None
        for start, end in zip([0, *cuts], [*cuts, len(mutated)], strict=True):
            error = deliver(victim, mutated[start:end])
            if error is not None:
                break
    events = drain(victim)
    got = received_data(events)
    assert got == MESSAGES[: len(got)]  # only genuine data, in order, nothing invented
    if error is not None:
        assert victim.state is State.ERROR
        assert isinstance(events[-2], HandshakeRefused | FrameRejected)
    if mutated != stream:
        assert error is not None or got != MESSAGES or victim.state is not State.ESTABLISHED
