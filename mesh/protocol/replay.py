"""Anti-replay window for datagram records, after RFC 6479.

A ring of 64-bit blocks holds one bit per counter. Advancing the window
clears whole blocks instead of shifting the bitmap, so a jump costs at most
one pass over the ring. The window covers the highest counter seen and the
``WINDOW_SIZE - 1`` before it; older counters are refused as replays since
their bits are gone.

The caller updates the window only with counters whose AEAD tag verified:
a forged counter must not move the window (that would let a non-key-holder
make us refuse genuine records).
"""

from __future__ import annotations

__all__ = ["RING_BLOCKS", "WINDOW_SIZE", "ReplayWindow"]

BLOCK_BITS = 64
RING_BLOCKS = 64  # a power of two, as in RFC 6479
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 4032 records
_BLOCK_SHIFT = 6
_BIT_MASK = BLOCK_BITS - 1
_RING_MASK = RING_BLOCKS - 1


class ReplayWindow:
    """Accepts each counter at most once, and only within the window."""

    __slots__ = ("_blocks", "_highest")

    def __init__(self) -> None:
        self._blocks = [0] * RING_BLOCKS
        self._highest = -1

    def check_and_update(self, counter: int) -> bool:
        """Record ``counter``; False if it was seen already or is too old to tell."""
        highest = self._highest
        block_index = counter >> _BLOCK_SHIFT
        if counter > highest:
            current = highest >> _BLOCK_SHIFT if highest >= 0 else -1
            gap = min(block_index - current, RING_BLOCKS)
            blocks = self._blocks
            for step in range(1, gap + 1):
                blocks[(current + step) & _RING_MASK] = 0
            self._highest = counter
        elif highest - counter >= WINDOW_SIZE:
            return False
        slot = block_index & _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        if self._blocks[slot] & bit:
            return False
        self._blocks[slot] |= bit
        return True
