"""APDU encoding and parsing (ISO 7816-3/4): every case, strict TLV, chains; hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.token.apdu import (
    CLA_CHAINING,
    EXTENDED_MAX_DATA,
    SHORT_MAX_DATA,
    SW,
    ApduError,
    Command,
    Tag,
    chain,
    decode_tlv,
    encode_tlv,
    is_defined_sw,
    parse_command,
    parse_response,
    wrong_pin_sw,
)

FUZZ = settings(max_examples=300, deadline=None)
ALL_TAGS = frozenset(Tag)

commands = st.builds(
    Command,
    cla=st.integers(0, 0xFF),
    ins=st.integers(0, 0xFF),
    p1=st.integers(0, 0xFF),
    p2=st.integers(0, 0xFF),
    data=st.binary(max_size=700),
    le=st.none() | st.integers(1, 300),
)


@FUZZ
@given(commands)
def test_every_command_survives_encode_then_parse(command: Command) -> None:
    assert parse_command(command.encode(), max_data=EXTENDED_MAX_DATA) == command


@pytest.mark.parametrize(
    ("raw", "data", "le"),
    [
        ("80120000", b"", None),  # case 1
        ("8012000000", b"", 256),  # case 2S, Le 00 = 256
        ("80300000020102", b"\x01\x02", None),  # case 3S
        ("8030000002010200", b"\x01\x02", 256),  # case 4S
        ("80120000000100", b"", 256),  # case 2E
        ("8030000000000201020000", b"\x01\x02", 65536),  # case 4E, Le 0000 = 65536
    ],
)
def test_the_iso_cases_parse_as_specified(raw: str, data: bytes, le: int | None) -> None:
    command = parse_command(bytes.fromhex(raw), max_data=EXTENDED_MAX_DATA)
    assert (command.data, command.le) == (data, le)


def test_long_data_uses_extended_length_and_short_data_does_not() -> None:
    short = Command(0x80, 0x30, data=b"x" * SHORT_MAX_DATA, le=256).encode()
    assert short[4] == SHORT_MAX_DATA and len(short) == 4 + 1 + SHORT_MAX_DATA + 1
    extended = Command(0x80, 0x30, data=b"x" * (SHORT_MAX_DATA + 1), le=256).encode()
    assert extended[4:7] == b"\x00\x01\x00" and extended[-2:] == b"\x01\x00"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "80",
        "801200",
        "803000000301",
        "80300000020102FFFF",
        "803000000000",
        "8030000000000001",
        "8030000000000301",
    ],
)
def test_inconsistent_lengths_are_wrong_length(raw: str) -> None:
    with pytest.raises(ApduError) as caught:
        parse_command(bytes.fromhex(raw), max_data=EXTENDED_MAX_DATA)
    assert caught.value.sw == SW.WRONG_LENGTH


def test_data_beyond_the_card_buffer_is_wrong_length() -> None:
    raw = Command(0x80, 0x30, data=b"x" * 300).encode()
    with pytest.raises(ApduError) as caught:
        parse_command(raw, max_data=299)
    assert caught.value.sw == SW.WRONG_LENGTH


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_parse_or_raise_only_apdu_error(raw: bytes) -> None:
    try:
        command = parse_command(raw, max_data=512)
    except ApduError as exc:
        assert exc.sw == SW.WRONG_LENGTH
    else:
        assert len(command.data) <= 512


def test_chains_split_data_and_flag_all_but_the_last() -> None:
    parts = chain(0x80, 0x32, 1, 0, bytes(range(250)) * 4, max_data=300, le=256)
    assert [len(p.data) for p in parts] == [300, 300, 300, 100]
    assert [p.chained for p in parts] == [True, True, True, False]
    assert [p.le for p in parts] == [None, None, None, 256]
    assert all((p.cla & ~CLA_CHAINING, p.ins, p.p1) == (0x80, 0x32, 1) for p in parts)
    assert b"".join(p.data for p in parts) == bytes(range(250)) * 4
    assert [p.data for p in chain(0x80, 0x12, 0, 0, b"", max_data=10, le=None)] == [b""]


def test_responses_split_data_from_status_word() -> None:
    response = parse_response(bytes.fromhex("0102039000"))
    assert (response.data, response.sw, response.ok) == (b"\x01\x02\x03", SW.OK, True)
    for raw in (b"\x90", b"\x00" * 300):
        with pytest.raises(ApduError):
            parse_response(raw)


def test_defined_status_words() -> None:
    assert all(is_defined_sw(int(sw)) for sw in SW)
    assert is_defined_sw(wrong_pin_sw(3)) and wrong_pin_sw(3) == 0x63C3
    assert is_defined_sw(0x6C20)
    assert not is_defined_sw(0x6A83) and not is_defined_sw(0x6400)


# -- TLV -------------------------------------------------------------------------------------


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(ALL_TAGS)), st.binary(max_size=600), max_size=8))
def test_tlv_round_trips(items: dict[int, bytes]) -> None:
    assert decode_tlv(encode_tlv(items.items()), allowed=ALL_TAGS) == items


@pytest.mark.parametrize(
    "raw",
    [
        "C001",  # truncated value
        "C0",  # no length
        "C00100C00100",  # repeated tag
        "FF0100",  # unknown tag
        "C0817F" + "00" * 0x7F,  # 0x81 form for a length that fits in one byte
        "C08200FF" + "00" * 0xFF,  # 0x82 form for a length that fits in 0x81
        "C08301000000",  # unsupported length form
        "C081",  # truncated length
    ],
)
def test_tlv_decoding_is_strict(raw: str) -> None:
    with pytest.raises(ApduError) as caught:
        decode_tlv(bytes.fromhex(raw), allowed=ALL_TAGS)
    assert caught.value.sw == SW.WRONG_DATA


@FUZZ
@given(st.binary(max_size=300))
def test_random_tlv_decodes_or_raises_wrong_data(raw: bytes) -> None:
    try:
        decode_tlv(raw, allowed=ALL_TAGS)
    except ApduError as exc:
        assert exc.sw == SW.WRONG_DATA
