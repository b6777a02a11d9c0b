"""Bundles: a JWS (HS256) under the token's MAC slot; any change, or the wrong token, is refused."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jws
from jwcrypto.common import base64url_decode, base64url_encode

from mesh.keyset import BundleError
from mesh.keyset.bundle import BUNDLE_TYPE, open_bundle, seal_bundle
from mesh.token import Slot, slot_kid
from tests.keyset.conftest import Fixture, seal_for
from tests.token.tokens import make_token, oct_jwk

FUZZ = settings(max_examples=200, deadline=None)


def _sign(world: Fixture, doc: Any) -> bytes:
    """A JWS over ``doc`` made with alpha-1's real MAC key (what only the desk can do)."""
    protected = {"alg": "HS256", "typ": BUNDLE_TYPE, "kid": world.alpha.known.kid(Slot.MAC)}
    signer = jws.JWS(json.dumps(doc).encode())
    signer.add_signature(
        oct_jwk(world.alpha.known.key(Slot.MAC)), alg="HS256", protected=json.dumps(protected)
    )
    return str(signer.serialize(compact=True)).encode()


def key_forms(key: bytes) -> list[bytes]:
    """Ways a key could leak into a file: raw, hex, base64url and standard base64."""
    return [
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64url_encode(key).encode(),
        base64.b64encode(key),
        base64.b64encode(key).rstrip(b"="),
    ]


def test_a_bundle_opens_with_its_token_to_what_was_sealed(world: Fixture) -> None:
    assert open_bundle(world.bundle_raw, world.alpha.token) == world.bundle


def test_plain_jwcrypto_verifies_a_bundle_with_the_mac_slot_key(world: Fixture) -> None:
    checked = jws.JWS()
    checked.deserialize(world.bundle_raw.decode())
    checked.verify(oct_jwk(world.alpha.known.key(Slot.MAC)))
    assert checked.jose_header["kid"] == slot_kid(world.alpha.known.token_id, Slot.MAC, 1)
    assert json.loads(checked.payload) == world.bundle.to_json()
    for wrong in (world.alpha.known.key(Slot.WRAP), world.gs.known.key(Slot.MAC)):
        with pytest.raises(jws.InvalidJWSSignature):
            jws.JWS().deserialize(world.bundle_raw.decode(), key=oct_jwk(wrong))


def test_every_flipped_byte_of_a_bundle_is_refused(world: Fixture) -> None:
    raw, token = world.bundle_raw, world.alpha.token
    header_end, signature_start = raw.index(b"."), raw.rindex(b".") + 1
    accepted: list[tuple[int, int]] = []
    for i in range(len(raw)):
        for mask in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80):
            flipped = bytearray(raw)
            flipped[i] ^= mask
            try:
                open_bundle(bytes(flipped), token)
            except BundleError:
                continue
            accepted.append((i, mask))
    # every region was probed: protected header, payload and signature
    assert 0 < header_end < signature_start < len(raw)
    assert accepted == [], f"accepted flips (signature starts at {signature_start})"


def test_truncated_and_extended_bundles_are_refused(world: Fixture) -> None:
    raw = world.bundle_raw
    cuts = sorted({*range(0, len(raw), 7), *range(len(raw) - 80, len(raw))})
    for n in cuts:
        with pytest.raises(BundleError):
            open_bundle(raw[:n], world.alpha.token)
    for extra in (b"A", b".", b".AAAA", b"x" * 10):
        with pytest.raises(BundleError):
            open_bundle(raw + extra, world.alpha.token)


def test_a_bundle_for_another_token_is_refused_by_name(world: Fixture) -> None:
    with pytest.raises(BundleError, match="issued for another token, not gs-1's"):
        open_bundle(world.bundle_raw, world.gs.token)


def test_a_bundle_for_an_older_key_generation_says_the_node_was_rekeyed(
    world: Fixture, tmp_path: Path
) -> None:
    rekeyed = make_token(
        tmp_path / "alpha-1.token", token_id=world.alpha.known.token_id, generation=2
    )
    with pytest.raises(BundleError, match=r"older key generation of alpha-1's token.*rekeyed"):
        open_bundle(world.bundle_raw, rekeyed.open())


def test_a_validly_signed_bundle_naming_another_node_is_refused(world: Fixture) -> None:
    other = replace(world.bundle, identity="gs-1")
    with pytest.raises(BundleError, match="names another node"):
        open_bundle(seal_for(world.alpha, other), world.alpha.token)


def test_a_bundle_signed_with_another_key_under_our_kid_is_refused(world: Fixture) -> None:
    forged = seal_bundle(
        world.bundle, kid=world.alpha.known.kid(Slot.MAC), mac_key=world.gs.known.key(Slot.MAC)
    )
    with pytest.raises(BundleError, match="integrity check failed"):
        open_bundle(forged, world.alpha.token)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none", "typ": BUNDLE_TYPE},
        {"alg": "HS512", "typ": BUNDLE_TYPE},
        {"alg": "HS256", "typ": "JWT"},
        {"alg": "HS256", "typ": BUNDLE_TYPE, "kid": 7},
    ],
    ids=["alg-none", "hs512", "typ", "kid-not-text"],
)
def test_headers_other_than_hs256_bundle_are_refused(
    world: Fixture, header: dict[str, Any]
) -> None:
    body = base64url_encode(json.dumps(world.bundle.to_json()))
    raw = f"{base64url_encode(json.dumps(header))}.{body}.".encode()
    with pytest.raises(BundleError, match=r"not a snrmesh bundle|names no key"):
        open_bundle(raw, world.alpha.token)


def test_a_bundle_holds_no_plaintext_key(world: Fixture) -> None:
    payload = base64url_decode(world.bundle_raw.split(b".")[1].decode())
    secrets = [world.ck.pair_key, *world.alpha.known.keys, *world.gs.known.keys]
    for secret in secrets:
        for form in key_forms(secret):
            assert form not in world.bundle_raw
            assert form not in payload


# -- fuzzing ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def _edit(doc: Any, data: st.DataObject) -> Any:
    """Replace one value somewhere in ``doc`` (a path chosen by hypothesis)."""
    if isinstance(doc, dict) and doc and data.draw(st.integers(0, 3)):
        key = data.draw(st.sampled_from(sorted(doc)))
        return {**doc, key: _edit(doc[key], data)}
    if isinstance(doc, list) and doc and data.draw(st.integers(0, 3)):
        i = data.draw(st.integers(0, len(doc) - 1))
        return [*doc[:i], _edit(doc[i], data), *doc[i + 1 :]]
    return data.draw(json_values)


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_open_bundle_on_arbitrary_bytes(world: Fixture, raw: bytes) -> None:
    with pytest.raises(BundleError):
        open_bundle(raw, world.alpha.token)


@FUZZ
@given(data=st.data())
def test_open_bundle_on_byte_edits(world: Fixture, data: st.DataObject) -> None:
    raw = bytearray(world.bundle_raw)
    for i in data.draw(st.sets(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
        raw[i] ^= data.draw(st.integers(1, 255))  # distinct positions, each really changed
    with pytest.raises(BundleError):
        open_bundle(bytes(raw), world.alpha.token)


@FUZZ
@given(data=st.data())
def test_open_bundle_on_validly_signed_edited_payloads(world: Fixture, data: st.DataObject) -> None:
    """Past the MAC, the parser still only raises BundleError (desk bugs must not crash nodes)."""
    doc = _edit(world.bundle.to_json(), data)
    try:
        bundle = open_bundle(_sign(world, doc), world.alpha.token)
    except BundleError:
        return
    assert bundle.identity == "alpha-1" and bundle.token_id == world.alpha.known.token_id
