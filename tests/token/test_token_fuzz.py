"""Hypothesis: the token-file decoder raises only typed errors on any input.

Random bytes mostly stop at the magic or the checksum, so two strategies get
past it: arbitrary CBOR after the magic, and well-typed-looking headers with
random field values, each with a correct SHA-256 trailer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import MeshError
from mesh.token import TokenError
from mesh.token.software import SoftwareToken
from tests.token.tokens import PIN, KnownToken

MAGIC = b"SNRTOKEN\x01"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _near_misses(value: Any) -> st.SearchStrategy[Any]:
    """Values a sloppy or hostile writer might put where ``value`` belongs."""
    if isinstance(value, bytes):
        return st.sampled_from(
            [value.decode("latin-1"), value[:-1], value + b"\x00", list(value), b""]
        )
    if isinstance(value, bool) or not isinstance(value, int | str | list) or value == []:
        return cbor_values
    if isinstance(value, int):
        return st.sampled_from([float(value), True, value - 1, value + 1, -value, str(value)])
    if isinstance(value, str):
        return st.sampled_from([value.encode(), "", value * 3, [value]])
    return st.sampled_from([value[:-1], [*value, value[-1]], tuple(value), {}])


def _mutate(header: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """One to three edits of a valid header: replace, delete or add a field or an element."""
    doc = {k: list(v) if isinstance(v, list) else v for k, v in header.items()}
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="edits")):
        key = data.draw(st.sampled_from([*doc, "extra"]), label="key")
        if key not in doc:
            doc[key] = data.draw(cbor_values, label="added")
            continue
        target: Any = doc[key]
        if isinstance(target, list) and target and data.draw(st.booleans(), label="element"):
            i = data.draw(st.integers(min_value=0, max_value=len(target) - 1), label="index")
            target[i] = data.draw(_near_misses(target[i]) | cbor_values, label="element value")
        elif data.draw(st.integers(min_value=0, max_value=9), label="delete?") == 0:
            del doc[key]
        else:
            doc[key] = data.draw(_near_misses(target) | cbor_values, label="value")
    return doc


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-fuzz") / "probe.token"


def _with_trailer(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _load(path: Path, raw: bytes, *, try_pin: bool = False) -> None:
    path.write_bytes(raw)
    try:
        token = SoftwareToken(path)
    except TokenError:
        return
    info = token.info()  # a token that loads answers GET STATUS without raising
    assert 0 <= info.pin_tries_left <= 5
    if try_pin:
        try:
            token.verify_pin(PIN)
        except MeshError as exc:
            assert isinstance(exc, TokenError), repr(exc)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_arbitrary_bytes(probe: Path, raw: bytes) -> None:
    _load(probe, raw)


@FUZZ
@given(body=st.binary(max_size=300))
def test_arbitrary_body_with_a_valid_checksum(probe: Path, body: bytes) -> None:
    _load(probe, _with_trailer(MAGIC + body))


@FUZZ
@given(doc=cbor_values)
def test_arbitrary_cbor_with_a_valid_checksum(probe: Path, doc: Any) -> None:
    _load(probe, _with_trailer(MAGIC + cbor2.dumps(doc)))


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_mutated_header_with_a_valid_checksum(
    probe: Path, token_template: KnownToken, data: st.DataObject
) -> None:
    raw = token_template.path.read_bytes()
    header = _mutate(cbor2.loads(raw[len(MAGIC) : -32]), data)
    kdf = header.get("kdf")
    cheap = isinstance(kdf, list) and len(kdf) == 4 and kdf[1] == 2**15 and kdf[2] == 8
    _load(probe, _with_trailer(MAGIC + cbor2.dumps(header)), try_pin=cheap)
