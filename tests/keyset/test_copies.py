"""CK copies: standard JWE (A256KW/A256GCM) that a token, or plain jwcrypto, can open."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwe
from jwcrypto.common import base64url_decode, base64url_encode

from mesh.errors import MeshError
from mesh.keyset import KeysetError, decrypt_copy, open_copy, read_copy_header, wrap_copy
from mesh.keyset.copies import MAX_COPY_SIZE
from mesh.token import KEY_SIZE, Slot, UnwrapFailed, slot_kid
from tests.keyset.conftest import Fixture
from tests.token.tokens import oct_jwk

FUZZ = settings(max_examples=200, deadline=None)
REFUSED = (KeysetError, UnwrapFailed)


def _with_header(copy: str, **changes: object) -> str:
    """``copy`` with its protected header edited (the rest of the JWE kept as is)."""
    parts = copy.split(".")
    header = json.loads(base64url_decode(parts[0]))
    header.update(changes)
    parts[0] = base64url_encode(json.dumps(header, separators=(",", ":")))
    return ".".join(parts)


def test_plain_jwcrypto_decrypts_a_copy_with_the_wrap_slot_key(world: Fixture) -> None:
    for party, copy in ((world.alpha, world.alpha_copy), (world.gs, world.gs_copy)):
        message = jwe.JWE()
        message.deserialize(copy, key=oct_jwk(party.known.key(Slot.WRAP)))
        assert message.payload == world.ck.pair_key
        header = json.loads(message.objects["protected"])
        assert (header["alg"], header["enc"], header["typ"]) == ("A256KW", "A256GCM", "snrmesh-ck")
        assert header["kid"] == slot_kid(party.known.token_id, Slot.WRAP, 1)
        assert header["for"] == party.known.identity
        assert base64url_decode(header["ck"]) == world.ck.ck_id


def test_plain_jwcrypto_refuses_a_copy_under_another_key(world: Fixture) -> None:
    for key in (world.gs.known.key(Slot.WRAP), world.alpha.known.key(Slot.MAC)):
        with pytest.raises(jwe.InvalidJWEData):
            jwe.JWE().deserialize(world.alpha_copy, key=oct_jwk(key))


def test_each_party_opens_its_own_copy_to_the_same_ck(world: Fixture) -> None:
    mine = open_copy(world.alpha.token, world.alpha_copy)
    theirs = open_copy(world.gs.token, world.gs_copy)
    for ck in (mine, theirs):
        assert ck.pair_key == world.ck.pair_key
        assert (ck.ck_id, ck.mission_id) == (world.ck.ck_id, world.ck.mission_id)
        assert (ck.party_a, ck.party_b) == ("alpha-1", "gs-1")
        assert (ck.not_before, ck.not_after) == (world.ck.not_before, world.ck.not_after)
    assert world.ck.pair_key.hex() not in repr(mine)


def test_a_copy_for_another_token_is_refused(world: Fixture) -> None:
    with pytest.raises(KeysetError, match="for alpha-1, not for this token"):
        open_copy(world.gs.token, world.alpha_copy)
    with pytest.raises(UnwrapFailed, match="another token or key generation"):
        world.gs.token.unwrap(world.alpha_copy)


def test_a_copy_for_another_key_generation_is_refused(world: Fixture) -> None:
    stale = wrap_copy(
        world.ck,
        holder="alpha-1",
        kid=slot_kid(world.alpha.known.token_id, Slot.WRAP, 2),
        wrap_key=oct_jwk(world.alpha.known.key(Slot.WRAP)),
    )
    with pytest.raises(UnwrapFailed, match="another token or key generation"):
        world.alpha.token.unwrap(stale)


def test_a_copy_with_our_kid_but_another_key_fails_authentication(world: Fixture) -> None:
    forged = wrap_copy(
        world.ck,
        holder="alpha-1",
        kid=world.alpha.known.kid(Slot.WRAP),
        wrap_key=oct_jwk(os.urandom(KEY_SIZE)),
    )
    with pytest.raises(UnwrapFailed, match="failed authentication"):
        world.alpha.token.unwrap(forged)


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": 2**40},
        {"nbf": 0},
        {"b": "gs-2"},
        {"ck": base64url_encode(bytes(16))},
        {"mis": base64url_encode(bytes(16))},
        {"extra": 1},
    ],
    ids=["longer-window", "earlier-window", "other-party", "other-ck", "other-mission", "extra"],
)
def test_the_protected_header_is_authenticated(world: Fixture, changes: dict[str, object]) -> None:
    edited = _with_header(world.alpha_copy, **changes)
    read_copy_header(edited)  # still well-formed...
    with pytest.raises(UnwrapFailed, match="failed authentication"):
        open_copy(world.alpha.token, edited)  # ...but the GCM tag no longer matches
    with pytest.raises(KeysetError):
        decrypt_copy(edited, oct_jwk(world.alpha.known.key(Slot.WRAP)))


def test_every_flipped_byte_of_a_copy_is_rejected(world: Fixture) -> None:
    copy, key = world.alpha_copy, oct_jwk(world.alpha.known.key(Slot.WRAP))
    assert open_copy(world.alpha.token, copy).pair_key == world.ck.pair_key  # the probe is sound
    accepted = []
    for i in range(len(copy)):
        for mask in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40):
            flipped = copy[:i] + chr(ord(copy[i]) ^ mask) + copy[i + 1 :]
            try:
                open_copy(world.alpha.token, flipped)
            except REFUSED:
                pass
            else:
                accepted.append((i, mask, "token"))
            try:
                decrypt_copy(flipped, key)
            except KeysetError:
                pass
            else:
                accepted.append((i, mask, "decrypt_copy"))
    assert accepted == []


def test_truncated_copies_are_rejected(world: Fixture) -> None:
    copy = world.alpha_copy
    for n in range(len(copy)):
        with pytest.raises(REFUSED):
            open_copy(world.alpha.token, copy[:n])


def test_wrap_copy_refuses_a_holder_who_is_not_a_party(world: Fixture) -> None:
    with pytest.raises(KeysetError, match="not a party"):
        wrap_copy(
            world.ck,
            holder="uav-1",
            kid=world.alpha.known.kid(Slot.WRAP),
            wrap_key=oct_jwk(world.alpha.known.key(Slot.WRAP)),
        )


@pytest.mark.parametrize(
    ("copy", "reason"),
    [
        ("a.b.c.d", "not a JWE compact"),
        ("x" * (MAX_COPY_SIZE + 1), "too large"),
        ("!!!.b.c.d.e", "base64url JSON"),
        (base64url_encode("[1]") + ".AAAA" * 4, "not a JSON object"),
        (base64url_encode("[" * 1500) + ".AAAA" * 4, "base64url JSON"),
        (base64url_encode("{}") + ".AAA=" + ".AAAA" * 3, "canonical base64url"),
        (base64url_encode("{}") + ".AAAA" * 3 + ".AAB", "canonical base64url"),
    ],
    ids=[
        "four-parts",
        "too-large",
        "bad-b64",
        "list-header",
        "deeply-nested",
        "padded",
        "unused-bits-set",
    ],
)
def test_malformed_copies_have_typed_errors(copy: str, reason: str) -> None:
    with pytest.raises(KeysetError, match=reason):
        read_copy_header(copy)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"alg": "dir"}, "alg A256KW"),
        ({"typ": "JWT"}, "typ snrmesh-ck"),
        ({"for": "uav-1"}, "holder is not a party"),
        ({"a": "Alpha 1"}, "invalid identity"),
        ({"nbf": "soon"}, "'nbf' missing or not int"),
        ({"exp": True}, "'exp' missing or not int"),
        ({"ck": base64url_encode(bytes(8))}, "'ck' must be 16 bytes"),
        ({"kid": None}, "'kid' missing"),
    ],
)
def test_copy_headers_are_checked_field_by_field(
    world: Fixture, changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(KeysetError, match=reason):
        read_copy_header(_with_header(world.alpha_copy, **changes))


# -- fuzzing ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)


B64ISH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.=+/"


def _parsed_or_refused(text: str) -> None:
    try:
        header = read_copy_header(text)
    except KeysetError:
        return
    assert header.holder in (header.party_a, header.party_b)


@FUZZ
@given(text=st.text(max_size=3000))
def test_read_copy_header_on_any_text(text: str) -> None:
    _parsed_or_refused(text)


@FUZZ
@given(
    text=st.text(alphabet=B64ISH)
    | st.lists(st.text(alphabet=B64ISH), min_size=5, max_size=5).map(".".join)
)
def test_read_copy_header_on_base64ish_text(text: str) -> None:
    _parsed_or_refused(text)


@FUZZ
@given(data=st.data())
def test_read_copy_header_on_edited_headers(world: Fixture, data: st.DataObject) -> None:
    header = json.loads(base64url_decode(world.alpha_copy.split(".")[0]))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        header[data.draw(st.sampled_from([*header, "zz"]))] = data.draw(json_values)
    edited = _with_header(world.alpha_copy, **header)
    try:
        parsed = read_copy_header(edited)
    except KeysetError:
        return
    assert parsed.holder in (parsed.party_a, parsed.party_b)
    with pytest.raises(REFUSED):  # whatever parsed, a token never accepts an edited header
        open_copy(world.alpha.token, edited)


@FUZZ
@given(text=st.text(max_size=600) | st.builds(lambda s: "." * 4 + s, st.text(max_size=100)))
def test_unwrap_on_any_text_raises_only_typed_errors(world: Fixture, text: str) -> None:
    with pytest.raises(MeshError):
        open_copy(world.alpha.token, text)
    with pytest.raises(UnwrapFailed):
        world.alpha.token.unwrap(text)
