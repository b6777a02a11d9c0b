"""A ``kid`` read from hostile input (a ticket, a copy, a key change) is refused, typed.

JSON lets a header carry any string, a lone surrogate (``"\\ud800"``) among them; such a
``kid`` used to reach ``str.encode`` in the token's constant-time comparison and raise
``UnicodeEncodeError`` out of a responder's handshake, before any authentication -- on a
software token and on the card applet alike (both run ``mesh/token/ops.py``).
"""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.crypto import b64url
from mesh.keyset.copies import COPY_TYPE, open_copy, read_wrapped_kid
from mesh.keyset.errors import KeysetError
from mesh.protocol import MemoryKeyStore, Reason, Transport
from mesh.token import Slot, ops, slot_kid
from mesh.token.apdu import SW, Command, Ins, chain
from mesh.token.applet import MAX_COMMAND_DATA
from mesh.token.errors import KeyChangeRefused, UnwrapFailed
from mesh.token.interface import is_slot_kid
from mesh.token.keychange import KEY_CHANGE_TYPE, key_change_kid
from tests.protocol.harness import Pair, deliver, make_ck
from tests.protocol.test_attacks import assert_refused
from tests.protocol.test_tickets import connect_with, first_frame
from tests.token.cards import CardRig
from tests.token.test_applet import selected, send, verify
from tests.token.tokens import PIN, KnownToken

HOSTILE = ["\ud800", "\udfff" * 3, "é", "", "x", " ", "0" * 32 + ".0.1\n", "0" * 32 + ".0.-1"]


def forged(kid: str, typ: str = COPY_TYPE, **fields: object) -> str:
    """A compact JWE whose header names ``kid`` (``\\u`` escapes kept: json.dumps' default)."""
    header = {"alg": "A256KW", "enc": "A256GCM", "typ": typ, "kid": kid, **fields}
    parts = [json.dumps(header).encode(), b"k" * 40, b"i" * 12, b"c" * 32, b"t" * 16]
    return ".".join(b64url(p) for p in parts)


def ticket(kid: str) -> str:
    return forged(
        kid,
        ck=b64url(b"C" * 16),
        mis=b64url(b"M" * 16),
        a="alpha",
        b="bravo",
        **{"for": "bravo", "nbf": 0, "exp": 1},
    )


@pytest.mark.parametrize("kid", [*HOSTILE, "0" * 32 + ".0.1" + "\ud800"])
def test_a_hostile_kid_is_refused_by_the_token_with_its_own_error(
    known_token: KnownToken, kid: str
) -> None:
    token = known_token.open()
    with pytest.raises(UnwrapFailed):
        token.unwrap(ticket(kid))
    with pytest.raises(UnwrapFailed):
        ops.unwrap(ticket(kid), key=known_token.key(Slot.WRAP), kid=known_token.kid(Slot.WRAP))
    with pytest.raises(KeysetError):
        read_wrapped_kid(ticket(kid))
    with pytest.raises(KeyChangeRefused):
        key_change_kid(forged(kid, typ=KEY_CHANGE_TYPE))


@pytest.mark.parametrize("transport", list(Transport))
@pytest.mark.parametrize("kid", ["\ud800", "é"])
def test_a_responder_on_a_real_token_refuses_a_ticket_with_a_hostile_kid(
    known_token: KnownToken, kid: str, transport: Transport
) -> None:
    """Before the fix this raised UnicodeEncodeError out of ``receive_data`` (no refusal)."""
    token = known_token.open()
    ck = make_ck("alpha", "bravo")
    bravo = MemoryKeyStore(ticket_opener=functools.partial(open_copy, token))
    pair = Pair(ck, MemoryKeyStore([ck]), bravo, transport)
    victim = pair.responder()
    assert deliver(victim, first_frame(connect_with(pair, ticket(kid)))) is not None
    assert_refused(victim, Reason.TICKET_INVALID)


def test_every_kid_the_project_makes_has_the_checked_form(known_token: KnownToken) -> None:
    for slot in Slot:
        for generation in (1, 2, 2**31 - 1, 2**64):
            assert is_slot_kid(slot_kid(known_token.token_id, slot, generation))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_a_kid_that_passes_is_short_ascii(text: str) -> None:
    """What passes compares and encodes like any ASCII string (no surrogate gets through)."""
    if is_slot_kid(text):
        assert text.isascii() and len(text) <= 32 + 1 + 1 + 1 + 20
        assert text.encode() == text.encode("ascii")


def test_the_card_applet_answers_a_hostile_kid_with_a_status_word(card: CardRig) -> None:
    """The applet runs the same ``ops``: it used to raise, ending ``card emulate`` for all."""
    applet = selected(card)
    verify(applet, PIN)
    for kid in ("\ud800", "é"):
        parts = chain(
            0x80, Ins.UNWRAP, 0, 0, ticket(kid).encode(), max_data=MAX_COMMAND_DATA, le=256
        )
        answers = [send(applet, command)[1] for command in parts]
        assert answers[-1] == SW.WRONG_DATA, hex(answers[-1])  # "not a wrapped key"
        assert send(applet, Command(0x80, Ins.GET_STATUS, le=256))[1] == SW.OK  # still serving
