"""The card host over the real PC/SC stack: pyscard -> pcscd -> vpcd -> the virtual card.

Readers by name, typed errors for every failure, the PIN lockout kept by the
card across power cycles, a card pulled out and put back, forged key changes,
and inputs large enough to need extended length and chaining.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from mesh.sim.pcscd import PrivatePcscd
from mesh.token import (
    MAX_PIN_TRIES,
    KeyChangeRefused,
    ReaderUnavailable,
    Refusal,
    Slot,
    TokenAbsent,
    TokenLocked,
    WrongApplet,
    WrongPin,
)
from mesh.token.emulator import VirtualCard
from mesh.token.keychange import KeyChange, build_key_change
from mesh.token.pcsc import PcscToken
from tests.card.conftest import CardSlot
from tests.token.tokens import PIN

WRONG = "9999"
KEYS = tuple(bytes([i]) * 32 for i in range(4))


def personalised(slot: CardSlot, *, identity: str = "alpha-1") -> tuple[PcscToken, bytes]:
    slot.insert()
    token = PcscToken(slot.reader.name)
    token_id = os.urandom(16)
    token.personalise(
        pin=PIN,
        token_id=token_id,
        identity=identity,
        role="soldier",
        keys=KEYS,
        generations=[1] * 4,
    )
    return token, token_id


def test_readers_are_chosen_by_name_or_unique_part(
    pcscd: PrivatePcscd, slots: list[CardSlot]
) -> None:
    with pytest.raises(ReaderUnavailable, match="2 readers present"):
        PcscToken(None)
    for name in ("no such reader", "vcard"):
        with pytest.raises(ReaderUnavailable, match="readers: "):
            PcscToken(name)
    with pytest.raises(TokenAbsent, match="no card in reader"):
        PcscToken("VCARD 00 01")  # a unique part, any case: that reader, which is empty
    slots[1].insert()
    assert PcscToken("vcard 00 01").reader == pcscd.readers[1].name


def test_a_card_without_the_applet_is_refused(slots: list[CardSlot]) -> None:
    class NotOurs(VirtualCard):
        def handle(self, payload: bytes) -> bytes | None:
            return super().handle(payload) if len(payload) == 1 else bytes.fromhex("6A82")

    slots[0].insert(NotOurs(slots[0].state))
    with pytest.raises(WrongApplet, match="not a snrmesh card"):
        PcscToken(slots[0].reader.name)


def test_personalise_unlock_and_use_a_card_with_large_inputs(slots: list[CardSlot]) -> None:
    token, token_id = personalised(slots[0])
    assert token.info().identity == "alpha-1" and token.info().token_id == token_id
    token.verify_pin(PIN)
    data = os.urandom(1 << 20)  # 1 MiB: extended-length commands, chained
    tag = hmac.new(KEYS[Slot.MAC], data, hashlib.sha256).digest()
    assert token.mac(Slot.MAC, data) == tag
    assert token.verify_mac(Slot.MAC, data, tag)
    assert not token.verify_mac(Slot.MAC, data[:-1], tag)
    assert len(token.derive(Slot.AUTH, b"x" * 256)) == 32


def test_wrong_pins_lock_the_card_for_good(slots: list[CardSlot]) -> None:
    token, _ = personalised(slots[0])
    for left in range(MAX_PIN_TRIES - 1, 0, -1):
        with pytest.raises(WrongPin) as caught:
            token.verify_pin(WRONG)
        assert caught.value.tries_left == left
    slots[0].pull()  # the counter is the card's: a power cycle does not reset it
    slots[0].insert()
    again = PcscToken(slots[0].reader.name)
    assert again.info().pin_tries_left == 1
    with pytest.raises(TokenLocked, match="now locked"):
        again.verify_pin(WRONG)
    with pytest.raises(TokenLocked):
        again.verify_pin(PIN)


def test_a_card_pulled_out_is_absent_and_unlocked_again_when_back(slots: list[CardSlot]) -> None:
    token, _ = personalised(slots[0])
    token.verify_pin(PIN)
    before = token.mac(Slot.MAC, b"x")
    slots[0].pull()
    with pytest.raises(TokenAbsent):
        token.check_present()
    with pytest.raises(TokenAbsent):
        token.mac(Slot.MAC, b"x")
    slots[0].insert()
    token.check_present()
    assert token.mac(Slot.MAC, b"x") == before  # no PIN asked again: the host re-verified it


def test_another_card_put_in_is_refused(slots: list[CardSlot]) -> None:
    token, _ = personalised(slots[0])
    token.verify_pin(PIN)
    slots[0].pull()
    other = slots[0].state.with_name("other.state")
    slots[0].state, original = other, slots[0].state
    personalised(slots[0], identity="bravo-1")
    with pytest.raises(WrongApplet, match="bravo-1"):
        token.check_present()
    slots[0].pull()
    slots[0].state = original
    slots[0].insert()
    token.check_present()


def _change(token_id: bytes, generations: tuple[int, ...], key: bytes, kid_generation: int) -> str:
    change = KeyChange(token_id, generations, tuple(os.urandom(32) for _ in range(4)))
    kid = f"{token_id.hex()}.{int(Slot.KEY_CHANGE)}.{kid_generation}"
    return build_key_change(change, kid=kid, current_key=key)


def test_forged_key_changes_are_refused_and_the_card_is_unchanged(slots: list[CardSlot]) -> None:
    token, token_id = personalised(slots[0])
    token.verify_pin(PIN)
    state = slots[0].state.read_bytes()
    current = KEYS[Slot.KEY_CHANGE]
    for message, refusal in [
        (_change(token_id, (2, 2, 2, 2), os.urandom(32), 1), Refusal.FAILED_AUTH),  # bad MAC
        (_change(token_id, (1, 1, 1, 1), current, 1), Refusal.NOT_NEWER),  # old generation
    ]:
        with pytest.raises(KeyChangeRefused) as caught:
            token.key_change(message)
        assert caught.value.refusal is refusal
    assert slots[0].state.read_bytes() == state
    assert token.mac(Slot.MAC, b"x") == hmac.new(KEYS[Slot.MAC], b"x", hashlib.sha256).digest()
    genuine = _change(token_id, (2, 2, 2, 2), current, 1)
    token.key_change(genuine)
    slots[0].pull()
    slots[0].insert()
    token.check_present()
    assert [token.info().generation(s) for s in Slot] == [2, 2, 2, 2]
    with pytest.raises(KeyChangeRefused):
        token.key_change(genuine)  # replayed
