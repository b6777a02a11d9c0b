"""The RFC 6479 window, against a plain set-based model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.protocol.replay import WINDOW_SIZE, ReplayWindow


def test_window_is_at_least_2048() -> None:
    assert WINDOW_SIZE >= 2048


def test_each_counter_once_in_any_order() -> None:
    window = ReplayWindow()
    order = [5, 3, 4, 0, 1, 2, 100, 99, 64, 63]
    assert all(window.check_and_update(n) for n in order)
    assert not any(window.check_and_update(n) for n in order)


def test_old_counters_fall_out_of_the_window() -> None:
    window = ReplayWindow()
    assert window.check_and_update(0)
    assert window.check_and_update(WINDOW_SIZE)  # 0 is now too old to tell
    assert not window.check_and_update(0)
    assert window.check_and_update(1)  # still inside: WINDOW_SIZE - 1 behind
    assert window.check_and_update(10 * WINDOW_SIZE)  # a jump clears the whole ring
    assert not window.check_and_update(10 * WINDOW_SIZE)
    assert window.check_and_update(10 * WINDOW_SIZE - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3 * WINDOW_SIZE), max_size=300))
def test_matches_a_reference_model(counters: list[int]) -> None:
    window, seen, highest = ReplayWindow(), set(), -1
    for n in counters:
        expected = n not in seen and (n > highest or highest - n < WINDOW_SIZE)
        assert window.check_and_update(n) == expected
        if expected:
            seen.add(n)
            highest = max(highest, n)
