"""A mission: a named validity window split into epochs.

Every CK is valid for exactly one epoch, so keys change routinely (ESAC 1) and
a stolen CK is worth one pair for one epoch. The desk, the bundle and the agent
share this one definition of where epochs start and end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import MISSION_ID_SIZE

__all__ = ["MAX_EPOCHS", "MAX_MISSION_NAME", "Epoch", "Mission"]

MAX_EPOCHS = 10_000
MAX_MISSION_NAME = 64
MIN_EPOCH_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Epoch:
    index: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Mission:
    mission_id: bytes
    name: str
    start: int
    end: int
    epoch_seconds: int

    def __post_init__(self) -> None:
        if len(self.mission_id) != MISSION_ID_SIZE:
            raise KeysetError(f"mission id must be {MISSION_ID_SIZE} bytes")
        if not self.name or len(self.name) > MAX_MISSION_NAME or not self.name.isprintable():
            raise KeysetError(f"mission name must be 1-{MAX_MISSION_NAME} printable characters")
        if self.epoch_seconds < MIN_EPOCH_SECONDS:
            raise KeysetError(f"an epoch must last at least {MIN_EPOCH_SECONDS} s")
        if self.end <= self.start:
            raise KeysetError("mission ends before it starts")
        if self.epoch_count > MAX_EPOCHS:
            raise KeysetError(f"mission has more than {MAX_EPOCHS} epochs")

    @property
    def epoch_count(self) -> int:
        return -(-(self.end - self.start) // self.epoch_seconds)

    def epochs(self) -> Iterator[Epoch]:
        """Epochs in order; the last one is cut at the mission's end."""
        for index in range(self.epoch_count):
            start = self.start + index * self.epoch_seconds
            yield Epoch(index, start, min(start + self.epoch_seconds, self.end))

    def epoch_at(self, now: float) -> Epoch | None:
        if not self.start <= now < self.end:
            return None
        index = int((now - self.start) // self.epoch_seconds)
        start = self.start + index * self.epoch_seconds
        return Epoch(index, start, min(start + self.epoch_seconds, self.end))
