"""The virtual card without pcscd: vpcd framing, controls, and the state file across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.token import TokenCorrupt
from mesh.token.apdu import AID, SW, Command, Ins, parse_response
from mesh.token.applet import ATR
from mesh.token.card import CardToken, LocalChannel
from mesh.token.emulator import FrameDecoder, VirtualCard, encode_frame
from mesh.token.open import is_card, open_token
from mesh.token.software import SoftwareToken
from tests.token.cards import KnownCard
from tests.token.tokens import PIN, KnownToken

SELECT = Command(0x00, Ins.SELECT, 0x04, 0x00, AID, 256).encode()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6), st.data())
def test_frames_survive_any_split_of_the_stream(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder, out, last = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == frames


def test_controls_answer_the_atr_and_end_the_session(
    tmp_path: Path, card_template: KnownCard
) -> None:
    path = tmp_path / "card.state"
    path.write_bytes(card_template.state)
    card = VirtualCard(path)
    assert card.handle(b"\x04") == ATR
    assert card.handle(b"\x01") is None
    assert parse_response(card.handle(SELECT) or b"").sw == SW.OK
    verify = Command(0x00, Ins.VERIFY, 0, 0x81, PIN.encode()).encode()
    assert parse_response(card.handle(verify) or b"").sw == SW.OK
    status = Command(0x00, Ins.VERIFY, 0, 0x81).encode()
    assert parse_response(card.handle(status) or b"").sw == SW.OK
    card.handle(b"\x02")  # reset: no applet selected, no PIN verified
    card.handle(SELECT)
    assert parse_response(card.handle(status) or b"").sw == 0x63C5


def test_the_state_file_is_the_card(tmp_path: Path) -> None:
    path = tmp_path / "new.card"
    blank = CardToken(LocalChannel(VirtualCard(path).applet))
    assert not path.exists()  # a blank card writes nothing until personalised
    blank.personalise(
        pin=PIN,
        token_id=b"\x01" * 16,
        identity="alpha-1",
        role="soldier",
        keys=[b"\x02" * 32] * 4,
        generations=[1] * 4,
    )
    assert path.stat().st_mode & 0o077 == 0
    again = CardToken(LocalChannel(VirtualCard(path).applet))  # "restarted"
    assert again.info().identity == "alpha-1"
    again.verify_pin(PIN)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(TokenCorrupt):
        VirtualCard(path)


def test_token_specs_name_files_or_readers(known_token: KnownToken) -> None:
    assert is_card("pcsc:") and is_card("pcsc:Virtual PCD 00 00")
    assert not is_card(str(known_token.path)) and not is_card("./pcsc:odd-file-name")
    token = open_token(str(known_token.path))
    assert isinstance(token, SoftwareToken) and token.info().identity == "alpha-1"
