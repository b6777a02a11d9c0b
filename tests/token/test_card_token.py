"""A card behaves like a software token: the same results and the same refusals, case by case.

Each parity test runs once per backend: the software token, and the host
:class:`CardToken` talking APDUs to the applet behind a :class:`LocalChannel`.
Card-only behaviour (pulled out and put back, another card in the reader,
personalisation of a closed card) follows. The same host over real PC/SC is
tested in ``test_pcsc.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from mesh.keyset.copies import wrap_copy
from mesh.keyset.keyset import CommunicationKeyset
from mesh.token import (
    MAX_PIN_TRIES,
    KeyChangeRefused,
    SecureElement,
    Slot,
    TokenAbsent,
    TokenError,
    TokenLocked,
    TokenNotReady,
    UnwrapFailed,
    WrongPin,
)
from mesh.token.apdu import Ins, Tag, encode_tlv, parse_command
from mesh.token.card import CardToken, LocalChannel
from mesh.token.errors import CardError, Refusal, WrongApplet
from mesh.token.keychange import KeyChange, build_key_change
from mesh.token.software import SoftwareToken
from tests.token.cards import CardRig, KnownCard, make_card
from tests.token.tokens import PIN, KnownToken, oct_jwk

WRONG = "9999"


@dataclass
class Element:
    """One backend under test: a fresh, locked element and what the test knows about it."""

    name: str
    open: Callable[[], SecureElement]
    known: KnownToken | KnownCard
    stored: Callable[[], bytes]  # what the backend keeps (file or card state), to check no change

    def unlocked(self) -> SecureElement:
        element = self.open()
        element.verify_pin(PIN)
        return element


@pytest.fixture(params=["software", "card"])
def element(request: pytest.FixtureRequest, known_token: KnownToken, card: CardRig) -> Element:
    if request.param == "software":
        return Element(
            "software",
            lambda: SoftwareToken(known_token.path),
            known_token,
            known_token.path.read_bytes,
        )
    return Element("card", lambda: card.token, request.getfixturevalue("card_template"), card.state)


def _copy(
    known: KnownToken | KnownCard, *, key: bytes | None = None, kid: str | None = None
) -> tuple[str, bytes]:
    ck = CommunicationKeyset(
        os.urandom(16), os.urandom(32), os.urandom(16), "alpha-1", "gs-1", 0, 99
    )
    copy = wrap_copy(
        ck,
        holder="alpha-1",
        kid=kid or known.kid(Slot.WRAP),
        wrap_key=oct_jwk(key or known.key(Slot.WRAP)),
    )
    return copy, ck.pair_key


def _key_change(
    known: KnownToken | KnownCard, generations: tuple[int, ...], **overrides: bytes
) -> str:
    keys = tuple(os.urandom(32) for _ in range(4))
    change = KeyChange(overrides.get("token_id", known.token_id), generations, keys)
    return build_key_change(
        change,
        kid=known.kid(Slot.KEY_CHANGE),
        current_key=overrides.get("current_key", known.key(Slot.KEY_CHANGE)),
    )


# -- parity ------------------------------------------------------------------------------------


def test_identity_without_pin_and_nothing_else(element: Element) -> None:
    token = element.open()
    info = token.info()
    assert (info.identity, info.token_id) == ("alpha-1", element.known.token_id)
    assert [info.generation(s) for s in Slot] == [1, 1, 1, 1]
    assert info.pin_tries_left == MAX_PIN_TRIES
    copy, _ = _copy(element.known)
    for operation in (
        lambda: token.unwrap(copy),
        lambda: token.mac(Slot.MAC, b"x"),
        lambda: token.derive(Slot.AUTH, b"x"),
        lambda: token.key_change(_key_change(element.known, (2, 2, 2, 2))),
    ):
        with pytest.raises(TokenNotReady):
            operation()


def test_unwrap_mac_and_derive_give_the_software_results(element: Element) -> None:
    token = element.unlocked()
    known = element.known
    copy, pair_key = _copy(known)
    assert token.unwrap(copy) == pair_key
    data = os.urandom(20_000)  # several chained commands on a card
    for slot in (Slot.MAC, Slot.AUTH):
        tag = hmac.new(known.key(slot), data, hashlib.sha256).digest()
        assert token.mac(slot, data) == tag
        assert token.verify_mac(slot, data, tag)
        assert not token.verify_mac(slot, data + b"!", tag)
        assert not token.verify_mac(slot, data, tag[:16])
    for slot in (Slot.WRAP, Slot.KEY_CHANGE):
        with pytest.raises(TokenError, match="not a MAC slot"):
            token.mac(slot, data)
    derived = token.derive(Slot.AUTH, b"context")
    assert len(derived) == 32 and derived == token.derive(Slot.AUTH, b"context")
    assert derived != token.derive(Slot.AUTH, b"other")
    with pytest.raises(TokenError, match="only AUTH"):
        token.derive(Slot.MAC, b"context")
    with pytest.raises(TokenError, match="context over"):
        token.derive(Slot.AUTH, b"x" * 257)


def test_unwrap_refusals_match(element: Element) -> None:
    token = element.unlocked()
    known = element.known
    other_generation = known.kid(Slot.WRAP)[:-1] + "2"
    cases = [
        (_copy(known, kid=other_generation)[0], Refusal.WRONG_KEY),
        (_copy(known, key=os.urandom(32))[0], Refusal.FAILED_AUTH),
        ("a.b.c.d.e", Refusal.MALFORMED),
        ("x" * 3000, Refusal.MALFORMED),
    ]
    for copy, refusal in cases:
        with pytest.raises(UnwrapFailed) as caught:
            token.unwrap(copy)
        assert caught.value.refusal is refusal, (copy[:40], caught.value)


def test_key_change_and_its_refusals_match(element: Element) -> None:
    token = element.unlocked()
    known = element.known
    before = element.stored()
    for message, refusal in [
        (_key_change(known, (2, 2, 2, 2), current_key=os.urandom(32)), Refusal.FAILED_AUTH),
        (_key_change(known, (1, 1, 1, 1)), Refusal.NOT_NEWER),
        (_key_change(known, (2, 2, 2, 2), token_id=os.urandom(16)), Refusal.WRONG_KEY),
        ("not.a.key.change.message", Refusal.MALFORMED),
    ]:
        with pytest.raises(KeyChangeRefused) as caught:
            token.key_change(message)
        assert caught.value.refusal is refusal
    assert element.stored() == before
    message = _key_change(known, (2, 3, 4, 5))
    token.key_change(message)
    assert [token.info().generation(s) for s in Slot] == [2, 3, 4, 5]
    with pytest.raises(KeyChangeRefused) as caught:
        token.key_change(message)  # replayed: its kid names the old generation now
    assert caught.value.refusal is Refusal.WRONG_KEY
    again = element.open()  # the change survives: a new session sees it
    again.verify_pin(PIN)
    assert [again.info().generation(s) for s in Slot] == [2, 3, 4, 5]


def test_pin_lockout_matches(element: Element) -> None:
    token = element.open()
    for left in range(MAX_PIN_TRIES - 1, 0, -1):
        with pytest.raises(WrongPin) as caught:
            token.verify_pin(WRONG)
        assert caught.value.tries_left == left == token.info().pin_tries_left
    with pytest.raises(TokenLocked, match="now locked"):
        token.verify_pin(WRONG)
    with pytest.raises(TokenLocked):
        token.verify_pin(PIN)
    assert element.open().info().locked


def test_a_pin_that_is_not_text_is_refused_without_spending_a_try(element: Element) -> None:
    """What ``SNRMESH_PIN`` holds for bytes not in the locale's encoding: lone surrogates."""
    token = element.open()
    before = element.stored()
    for pin in (os.fsdecode(b"24\xff8"), "24\ud8008"):
        with pytest.raises(TokenError, match="PIN must be") as caught:
            token.verify_pin(pin)
        assert pin not in str(caught.value)
    assert token.info().pin_tries_left == MAX_PIN_TRIES
    assert element.stored() == before
    token.verify_pin(PIN)


def test_a_wrong_pin_ends_an_unlocked_session(element: Element) -> None:
    token = element.unlocked()
    with pytest.raises(WrongPin):
        token.verify_pin(WRONG)
    with pytest.raises(TokenNotReady):
        token.mac(Slot.MAC, b"x")
    token.verify_pin(PIN)
    assert token.info().pin_tries_left == MAX_PIN_TRIES


# -- card only -----------------------------------------------------------------------------------


def test_a_pulled_card_is_absent_then_unlocked_again_when_back(
    card: CardRig, card_template: KnownCard
) -> None:
    token = card.unlocked()
    copy, pair_key = _copy(card_template)
    card.channel.remove()
    for operation in (token.check_present, lambda: token.unwrap(copy)):
        with pytest.raises(TokenAbsent):
            operation()
    card.channel.insert()
    token.check_present()  # re-selects and re-verifies the remembered PIN
    assert token.unwrap(copy) == pair_key


def test_another_card_in_the_reader_is_refused_and_never_sees_the_pin(
    card: CardRig, card_template: KnownCard
) -> None:
    token = card.unlocked()
    stranger = make_card(identity="bravo-1")
    card.channel.remove()
    card.channel.applet = stranger.rig().applet
    sent: list[bytes] = []
    process = card.channel.applet.process
    card.channel.applet.process = lambda raw: sent.append(raw) or process(raw)  # type: ignore[method-assign]
    card.channel.insert()
    with pytest.raises(WrongApplet, match="bravo-1"):
        token.check_present()
    with pytest.raises(WrongApplet):
        token.mac(Slot.MAC, b"x")
    assert all(parse_command(raw, max_data=4096).ins != Ins.VERIFY for raw in sent)


def test_a_closed_card_is_not_personalised_again(card: CardRig) -> None:
    before = card.state()
    with pytest.raises(TokenError, match=r"already personalised .*alpha-1"):
        card.token.personalise(
            pin=PIN,
            token_id=os.urandom(16),
            identity="bravo-1",
            role="soldier",
            keys=[os.urandom(32)] * 4,
            generations=[1] * 4,
        )
    assert card.state() == before


def test_a_blank_card_tells_it_is_blank() -> None:
    token = CardRig.load().token
    with pytest.raises(TokenNotReady, match="blank"):
        token.info()
    with pytest.raises(TokenNotReady, match="blank"):
        token.verify_pin(PIN)


def test_an_unfinished_personalisation_can_be_redone() -> None:
    rig = CardRig.load()
    rig.fail_writes = False
    token: CardToken = rig.token
    close = rig.applet.process

    def no_close(raw: bytes) -> bytes:
        if parse_command(raw, max_data=4096).ins == Ins.CLOSE:
            return bytes.fromhex("6581")
        return close(raw)

    rig.applet.process = no_close  # type: ignore[method-assign]
    args = dict(role="soldier", keys=[os.urandom(32)] * 4, generations=[1] * 4)
    with pytest.raises(TokenError, match="memory failure"):
        token.personalise(pin=PIN, token_id=os.urandom(16), identity="alpha-1", **args)  # type: ignore[arg-type]
    rig.applet.process = close  # type: ignore[method-assign]
    token.personalise(pin=PIN, token_id=os.urandom(16), identity="alpha-2", **args)  # type: ignore[arg-type]
    assert token.info().identity == "alpha-2"


def _hostile(known: KnownCard, answer: Callable[[Ins, bytes], bytes | None]) -> LocalChannel:
    """A reader whose card answers ``answer(ins, honest response)`` instead, where not None."""
    applet = known.rig().applet
    honest = applet.process

    def process(raw: bytes) -> bytes:
        response = honest(raw)
        forged = answer(Ins(parse_command(raw, max_data=65_535).ins), response)
        return response if forged is None else forged

    applet.process = process  # type: ignore[method-assign]
    return LocalChannel(applet)


def _identity(identity: bytes, role: bytes, token_id: bytes) -> bytes:
    items = [(Tag.TOKEN_ID, token_id), (Tag.IDENTITY, identity), (Tag.ROLE, role)]
    return encode_tlv(items) + bytes.fromhex("9000")


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            lambda ins, ok: (
                encode_tlv([(Tag.VERSION, b"\x01"), (Tag.MAX_DATA, (70_000).to_bytes(3, "big"))])
                + ok[-2:]
                if ins is Ins.SELECT
                else None
            ),
            id="max-data-over-extended-length",
        ),
        pytest.param(
            lambda ins, ok: (
                _identity(b"alpha-1\x1b[2J", b"soldier", ok[2:18])
                if ins is Ins.GET_IDENTITY
                else None
            ),
            id="identity-with-escapes",
        ),
        pytest.param(
            lambda ins, ok: (
                _identity(b"alpha-1", b"s" * 200, ok[2:18]) if ins is Ins.GET_IDENTITY else None
            ),
            id="role-too-long",
        ),
    ],
)
def test_a_card_answering_out_of_spec_is_a_card_error_not_a_crash(
    card_template: KnownCard, answer: Callable[[Ins, bytes], bytes | None]
) -> None:
    """The card's answers are read like a token file: held to the desk's rules before use."""
    with pytest.raises(CardError, match="malformed"):
        token = CardToken(_hostile(card_template, answer))
        token.verify_pin(PIN)
        token.mac(Slot.MAC, os.urandom(70_000))  # one command of 70,000 bytes: no APDU holds it
