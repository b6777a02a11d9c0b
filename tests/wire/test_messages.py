"""The application wire format: round trips, bounds, and hostile input."""

from __future__ import annotations

import contextlib
import os

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import MeshError
from mesh.wire import (
    MAX_TEXT,
    Chat,
    Ping,
    Receipt,
    Relay,
    Routes,
    SessionGone,
    Status,
    WireError,
    decode,
    encode,
)

MID = os.urandom(16)


@pytest.mark.parametrize(
    "message",
    [
        Chat(MID, "hello\nsquad", 1.5),
        Chat(MID, "to the group", 2.0, group="squad"),
        Receipt((MID,), "delivered"),
        Receipt((MID, MID[::-1]), "read"),
        Status("uav", 3.0, (48.85, 2.35, 120.0), 87.5, "on station"),
        Status("soldier", 4.0),
        Routes((("alpha-1", 1), ("gs-1", 3))),
        Relay("alpha-1", "gs-1", 5, b"\x18" * 40),
        Ping(),
        SessionGone(),
        SessionGone(bytes(range(32))),
    ],
)
def test_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"t": "chat", "id": MID, "text": "x" * (MAX_TEXT + 1), "at": 1.0}, "too long"),
        ({"t": "chat", "id": MID, "text": "bell\x07", "at": 1.0}, "control"),
        ({"t": "chat", "id": MID[:8], "text": "x", "at": 1.0}, "16 bytes"),
        ({"t": "chat", "id": MID, "text": "x", "at": float("nan")}, "finite"),
        ({"t": "chat", "id": MID, "text": "x", "at": 1.0, "g": "Bad Group"}, "invalid identity"),
        ({"t": "rcpt", "ids": [MID], "s": "lost"}, "receipt state"),
        ({"t": "rcpt", "ids": [], "s": "read"}, "1..512 ids"),
        ({"t": "rcpt", "ids": [MID] * 513, "s": "read"}, "1..512 ids"),
        ({"t": "rcpt", "ids": [MID[:4]], "s": "read"}, "1..512 ids"),
        ({"t": "status", "role": "uav", "at": 1.0, "pos": [91, 0, 0]}, "out of range"),
        ({"t": "status", "role": "uav", "at": 1.0, "bat": 101}, "battery"),
        # CBOR bignums past float's range: refused, where float() raises OverflowError
        ({"t": "chat", "id": MID, "text": "x", "at": 10**400}, "out of range"),
        ({"t": "status", "role": "uav", "at": 1.0, "bat": 10**400}, "out of range"),
        ({"t": "status", "role": "uav", "at": 1.0, "pos": [10**400, 0, 0]}, "out of range"),
        ({"t": "status", "role": "uav", "at": -(10**400)}, "out of range"),
        ({"t": "routes", "r": [["alpha-1", 9]]}, "hops"),
        ({"t": "routes", "r": [["alpha-1", True]]}, "hops"),
        ({"t": "relay", "src": "a", "dst": "b", "ttl": 9, "f": b"x", "i": True}, "ttl"),
        ({"t": "relay", "src": "a", "dst": "b", "ttl": 1, "f": b"x"}, "boolean"),
        ({"t": "relay", "src": "a", "dst": "b", "ttl": 1, "f": b""}, "frame"),
        ({"t": "gone", "h": b"\x00" * 31}, "32 bytes"),
        ({"t": "gone", "h": "not bytes"}, "h"),
        ({"t": "nope"}, "unknown"),
        ([1, 2], "map"),
    ],
)
def test_malformed_messages_are_refused(doc: object, why: str) -> None:
    with pytest.raises(WireError, match=why):
        decode(cbor2.dumps(doc))


def test_oversize_input_is_refused_before_parsing() -> None:
    with pytest.raises(WireError, match="too large"):
        decode(b"\xa0" * (64 * 1024 + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    try:
        decode(data)
    except MeshError as exc:
        assert isinstance(exc, WireError)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "t",
                        "id",
                        "text",
                        "at",
                        "g",
                        "s",
                        "r",
                        "f",
                        "src",
                        "dst",
                        "ttl",
                        "pos",
                        "bat",
                        "role",
                    ]
                ),
                children,
                max_size=6,
            )
        ),
        max_leaves=12,
    )
)
def test_random_cbor_documents_raise_only_wire_errors(doc: object) -> None:
    with contextlib.suppress(WireError):
        decode(cbor2.dumps(doc))


HOSTILE_VALUES = [
    None, True, -1, 2**64, -(2**64), 10**400, -(10**400), float("nan"), float("inf"), 1e308,
    "", "x" * 5000, b"", b"\x00" * 513, [], [10**400] * 3, {}, [[[[[]]]]],
    cbor2.CBORTag(2, b"\xff" * 64), cbor2.CBORTag(4, [-1, 10**400]), cbor2.CBORTag(30, [1, 0]),
]  # fmt: skip
VALID_DOCS = [
    {"t": "chat", "id": MID, "text": "hi", "at": 1.0, "g": "squad"},
    {"t": "rcpt", "ids": [MID], "s": "read"},
    {"t": "status", "role": "uav", "at": 1.0, "pos": [1.0, 2.0, 3.0], "bat": 50, "x": "ok"},
    {"t": "routes", "r": [["alpha-1", 1]]},
    {"t": "relay", "src": "a", "dst": "b", "ttl": 1, "f": b"x", "i": True},
]


@pytest.mark.parametrize("doc", VALID_DOCS, ids=lambda d: str(d["t"]))
def test_every_field_of_every_message_replaced_by_a_hostile_value_raises_only_wire_errors(
    doc: dict[str, object],
) -> None:
    """A sweep (not a sample): each field, and each position element, gets each value."""
    cases = [{**doc, key: value} for key in doc for value in HOSTILE_VALUES]
    cases += [
        {**doc, "pos": [*doc["pos"][:i], value, *doc["pos"][i + 1 :]]}  # type: ignore[index]
        for i in range(3)
        for value in HOSTILE_VALUES
        if "pos" in doc
    ]
    for case in cases:
        with contextlib.suppress(WireError):
            decode(cbor2.dumps(case))
