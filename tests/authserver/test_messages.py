"""Wire messages: round trips, bounds, and hostile bytes (hypothesis)."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioning.authserver.errors import MessageError, Refusal
from provisioning.authserver.messages import (
    MAX_CLEAR_MESSAGE,
    Answer,
    Challenge,
    CookieReply,
    Hello,
    KeysetGrant,
    KeysetRequest,
    Ready,
    Refuse,
    Start,
    decode,
    encode,
    frame_clear,
    pull_clear,
)

SAMPLES = [
    Hello("meter-0000001", 3, b"n" * 16),
    Hello("alpha-1", 1, b"n" * 16, b"c" * 16),
    CookieReply(b"c" * 16),
    Start(b"s" * 16),
    Refuse(Refusal.BUSY, 1.5),
    Refuse(Refusal.POLICY),
    Challenge(b"x" * 32, 2, "a.b.c.d.e"),
    Answer(b"m" * 32),
    Ready(2),
    KeysetRequest(b"r" * 16, "gs-1", "metering", 3),
    KeysetGrant(b"r" * 16, b"k" * 16, "gs-1", 10, 20, "a.b.c.d.e", "f.g.h.i.j"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


def test_clear_framing_pulls_one_message_and_leaves_the_rest() -> None:
    data = frame_clear(Start(b"s" * 16)) + b"\x00\x01noise"
    message, used = pull_clear(data)  # type: ignore[misc]
    assert message == Start(b"s" * 16) and data[used:] == b"\x00\x01noise"
    assert pull_clear(data[:5]) is None


@pytest.mark.parametrize(
    "body",
    [
        {"t": 1, "v": 1, "id": "Bad Name", "gen": 1, "cn": b"n" * 16},
        {"t": 1, "v": 2, "id": "a", "gen": 1, "cn": b"n" * 16},
        {"t": 1, "v": 1, "id": "a", "gen": 0, "cn": b"n" * 16},
        {"t": 1, "v": 1, "id": "a", "gen": True, "cn": b"n" * 16},
        {"t": 1, "v": 1, "id": "a", "gen": 1, "cn": b"n" * 15},
        {"t": 4, "why": "because"},
        {"t": 4, "why": "busy", "ra": float("nan")},
        {"t": 4, "why": "busy", "ra": 2**1024},  # past float's range: was OverflowError
        {"t": 4, "why": "busy", "ra": -(2**1024)},
        {"t": 4, "why": "busy", "ra": float("inf")},
        {"t": 4, "why": "busy", "ra": 3601},
        {"t": 8, "rid": b"r" * 16, "to": "gs-1", "for": "x" * 33},
        {
            "t": 9,
            "rid": b"r" * 16,
            "ck": b"k" * 16,
            "peer": "a",
            "nbf": 1,
            "exp": 2,
            "own": "é",
            "tkt": "x",
        },
        {
            "t": 9,
            "rid": b"r" * 16,
            "ck": b"k" * 16,
            "peer": "a",
            "nbf": 1,
            "exp": 253_402_300_800,
            "own": "a.b.c.d.e",
            "tkt": "f.g.h.i.j",
        },  # after year 9999
        {"t": 99},
        {str(i): i for i in range(9)},
    ],
)
def test_malformed_fields_refused(body: dict[str, object]) -> None:
    with pytest.raises(MessageError):
        decode(cbor2.dumps(body))


def test_oversize_and_secure_messages_in_clear_refused() -> None:
    with pytest.raises(MessageError):
        pull_clear((MAX_CLEAR_MESSAGE + 1).to_bytes(2, "big"))
    body = encode(Ready(1))
    with pytest.raises(MessageError):
        pull_clear(len(body).to_bytes(2, "big") + body)


@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_raise_message_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(data)
    with contextlib.suppress(MessageError):
        pull_clear(data)


@given(st.sampled_from(SAMPLES), st.integers(0, 200), st.integers(0, 255))
def test_mutated_messages_never_raise_anything_else(message: object, pos: int, byte: int) -> None:
    data = bytearray(encode(message))  # type: ignore[arg-type]
    data[pos % len(data)] = byte
    with contextlib.suppress(MessageError):
        decode(bytes(data))


def _fields(message: object) -> dict[str, object]:
    return dict(cbor2.loads(encode(message)))  # type: ignore[arg-type]


HOSTILE_VALUES = [
    None, True, -1, 0, 2**64, -(2**64), 2**1024, -(2**1024), float("nan"), float("inf"),
    "", "x" * 5000, "é", b"", b"\x00" * 5000, [], {}, [[[[]]]],
    cbor2.CBORTag(2, b"\xff" * 200), cbor2.CBORTag(4, [-1, 2**1024]),
]  # fmt: skip


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_field_replaced_by_a_hostile_value_raises_only_message_errors(
    message: object,
) -> None:
    """A sweep of each field of each message, in the clear framing and the secure one."""
    body = _fields(message)
    for key in [*body, "extra"]:
        for value in HOSTILE_VALUES:
            data = cbor2.dumps({**body, key: value})
            with contextlib.suppress(MessageError):
                decode(data)
            with contextlib.suppress(MessageError):
                pull_clear(len(data).to_bytes(2, "big") + data)
