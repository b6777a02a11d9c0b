"""Parsers: known layouts, sizes within budget, and hypothesis on arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from mesh.protocol.frames import (
    INIT_FRAME_SIZE,
    MAX_FRAME_SIZE,
    MAX_RECORD_PLAINTEXT,
    MAX_RECORDS_PER_KEY,
    MAX_TICKET_SIZE,
    NOISE_INIT_SIZE,
    RECORD_HEADER_SIZE,
    RECORD_OVERHEAD,
    REFUSE_FRAME,
    RESPONSE_FRAME_SIZE,
    Init,
    RecordKind,
    frame_size,
    pack_record_header,
    pull_init,
    push_init,
    unpack_record_header,
)

CK_ID = bytes(range(16))
NOISE = bytes(NOISE_INIT_SIZE)


def test_sizes_fit_the_budgets() -> None:
    assert RECORD_OVERHEAD == 24  # issue #3: per-record overhead <= 24 bytes
    assert INIT_FRAME_SIZE == 75 and RESPONSE_FRAME_SIZE == 51 and len(REFUSE_FRAME) == 1
    assert INIT_FRAME_SIZE + RESPONSE_FRAME_SIZE + RECORD_OVERHEAD <= 160


def test_init_round_trip_with_and_without_ticket() -> None:
    plain = push_init(Init(CK_ID, NOISE))
    assert plain[0] == 0x11 and frame_size(plain) == len(plain) == INIT_FRAME_SIZE
    assert pull_init(plain) == Init(CK_ID, NOISE)
    ticketed = push_init(Init(CK_ID, NOISE, "a.b.c.d.e"))
    assert ticketed[0] == 0x12 and frame_size(ticketed) == len(ticketed)
    assert pull_init(ticketed) == Init(CK_ID, NOISE, "a.b.c.d.e")
    rekey = push_init(Init(CK_ID, NOISE, rekey=True))
    assert rekey[0] == 0x15 and frame_size(rekey) == len(rekey) == INIT_FRAME_SIZE
    assert pull_init(rekey) == Init(CK_ID, NOISE, rekey=True)
    with pytest.raises(LocalProtocolError):
        push_init(Init(CK_ID, NOISE, "a.b.c.d.e", rekey=True))  # a rekey's mate holds the CK


@pytest.mark.parametrize("kind", list(RecordKind))
@pytest.mark.parametrize("phase", [0, 1])
def test_record_header_round_trip(kind: RecordKind, phase: int) -> None:
    counter = MAX_RECORDS_PER_KEY - 1
    header = pack_record_header(kind, phase, counter, 16 + 5)
    assert len(header) == RECORD_HEADER_SIZE
    assert header[0] >> 4 == 1 and header[0] & 0x08
    assert unpack_record_header(header) == (kind, phase, counter)
    assert frame_size(header) == RECORD_HEADER_SIZE + 21


def test_frame_size_waits_for_enough_header() -> None:
    assert frame_size(b"") is None
    assert frame_size(b"\x18\x00") is None  # record: length not complete yet
    assert frame_size(b"\x12" + CK_ID) is None  # ticket length not there yet
    assert frame_size(b"\x14") == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x21", Reason.UNSUPPORTED_VERSION),
        (b"\x01", Reason.UNSUPPORTED_VERSION),
        (b"\x10", Reason.MALFORMED),
        (b"\x16", Reason.MALFORMED),
        (b"\x18\x00\x0f", Reason.MALFORMED),  # shorter than a tag
        (b"\x18\x00\x00", Reason.MALFORMED),  # zero length
        (b"\x18" + (MAX_RECORD_PLAINTEXT + 17).to_bytes(2, "big"), Reason.OVERSIZE),
        (b"\x12" + CK_ID + b"\x00\x00", Reason.MALFORMED),
        (b"\x12" + CK_ID + (MAX_TICKET_SIZE + 1).to_bytes(2, "big"), Reason.OVERSIZE),
    ],
)
def test_frame_size_refuses_bad_headers_at_once(data: bytes, reason: Reason) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        frame_size(data)
    assert caught.value.reason is reason


def test_ticket_must_be_ascii() -> None:
    frame = bytearray(push_init(Init(CK_ID, NOISE, "abc")))
    frame[19] = 0xFF
    with pytest.raises(RemoteProtocolError) as caught:
        pull_init(bytes(frame))
    assert caught.value.reason is Reason.MALFORMED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=10))
def test_frame_size_on_arbitrary_bytes(data: bytes, offset: int) -> None:
    """Never anything but a size, None, or RemoteProtocolError; sizes stay bounded."""
    try:
        size = frame_size(data, offset)
    except RemoteProtocolError:
        return
    if size is not None:
        assert 1 <= size <= MAX_FRAME_SIZE


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=INIT_FRAME_SIZE, max_size=INIT_FRAME_SIZE), st.sampled_from([0x11, 0x15]))
def test_pull_init_on_arbitrary_init_frames(body: bytes, kind: int) -> None:
    frame = bytes([kind]) + body[1:]
    init = pull_init(frame)
    assert len(init.ck_id) == 16 and len(init.noise_message) == NOISE_INIT_SIZE
    assert push_init(init) == frame
