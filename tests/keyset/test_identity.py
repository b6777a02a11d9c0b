"""Node identities: the one rule every message, CK and copy header is checked against."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.keyset import KeysetError, check_identity

ALLOWED = "abcdefghijklmnopqrstuvwxyz0123456789-_."


def by_the_rule(identity: str) -> bool:
    """The rule as the docs state it, spelled out character by character."""
    return (
        0 < len(identity) <= 64
        and all(c in ALLOWED for c in identity)
        and identity[0] in "abcdefghijklmnopqrstuvwxyz0123456789"
    )


@given(st.one_of(st.text(max_size=70), st.text(alphabet=ALLOWED + "A\n é/", max_size=70)))
def test_check_identity_accepts_exactly_the_rule(identity: str) -> None:
    if by_the_rule(identity):
        assert check_identity(identity) == identity
    else:
        with pytest.raises(KeysetError):
            check_identity(identity)


@pytest.mark.parametrize("bad", ["", "-a", ".a", "_a", "a\n", "A", "a b", "é", "\uff41", "a" * 65])
def test_check_identity_refuses(bad: str) -> None:
    with pytest.raises(KeysetError):
        check_identity(bad)
