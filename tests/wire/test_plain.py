"""The plain-CBOR gate: what our encoders write passes, what could freeze cbor2 does not."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.wire import decode as wire_decode
from mesh.wire.errors import WireError
from mesh.wire.plain import MAX_DEPTH, NotPlain, check_plain
from provisioning.authserver.errors import MessageError
from provisioning.authserver.messages import decode as as_decode
from provisioning.authserver.messages import encode as as_encode
from tests.authserver.test_messages import SAMPLES


def shared_dag(levels: int) -> bytes:
    """A map whose key is an array DAG built with shared references (tags 28 and 29): ~6
    bytes a level, and 2^levels steps for cbor2 to hash it (the secure-phase fuzz review)."""
    cur = b"\xd8\x1c\x82\x01\x01"
    for i in range(1, levels):
        cur = b"\xd8\x1c\x82" + cur + b"\xd8\x1d" + cbor2.dumps(levels - i)
    return b"\xa2" + cbor2.dumps("t") + cbor2.dumps(1) + cur + cbor2.dumps(1)


def test_the_shared_reference_dag_is_refused_before_cbor2_sees_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = shared_dag(60)  # ~390 bytes: cbor2 alone ran for over 30 s
    assert len(data) < 512
    with pytest.raises(NotPlain):
        check_plain(data)

    def never(*_: object) -> object:
        raise AssertionError("cbor2 decoded a message the gate should have refused")

    monkeypatch.setattr(cbor2, "loads", never)
    with pytest.raises(MessageError):
        as_decode(data, limit=512)
    with pytest.raises(WireError):
        wire_decode(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (cbor2.dumps({(1, 2): 1}), "map key"),  # an array key: a tuple, hashed
        (cbor2.dumps({b"k": 1}), "map key"),
        (cbor2.dumps(cbor2.CBORTag(258, [1])), "tag 258"),  # a set
        (cbor2.dumps(cbor2.CBORTag(28, 1)), "tag 28"),
        (cbor2.dumps(cbor2.CBORTag(2, 5)), "bignum"),  # a bignum around no byte string
        (b"\x9f\x01\xff", "indefinite"),
        (b"\x5f\x41\x01\xff", "indefinite"),
        (b"\x81" * (MAX_DEPTH + 2) + b"\x01", "deep"),
        (b"\x82\x01", "truncated"),
        (b"\x59\xff\xff", "truncated"),
        (b"\x9b" + b"\xff" * 8, "truncated"),  # an array claiming 2^64 items
        (b"\x01\x01", "after the item"),
        (b"", "truncated"),
        (b"\x1c", "reserved"),
    ],
)
def test_outside_the_plain_subset_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(NotPlain, match=why):
        check_plain(data)


def test_every_as_message_we_write_is_plain() -> None:
    for message in SAMPLES:
        check_plain(as_encode(message))


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # bignums past 64 bits included
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(plain_values)
def test_what_cbor2_writes_of_plain_values_passes(value: object) -> None:
    check_plain(cbor2.dumps(value))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_pass_or_raise_not_plain_and_passing_bytes_are_one_cbor_item(
    data: bytes,
) -> None:
    try:
        check_plain(data)
    except NotPlain:
        return
    with contextlib.suppress(cbor2.CBORDecodeError, ValueError, OverflowError):
        cbor2.loads(data)  # whatever it says, it says it at once: no tags, no shared keys
