"""Fixtures for multi-agent tests: real processes on 127.0.0.1, stopped by PID afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.sim import Simulation


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[object]:
    made: list[Simulation] = []

    def make(*args: object, **kwargs: object) -> Simulation:
        kwargs.setdefault("workdir", tmp_path / f"sim{len(made)}")
        sim = Simulation(*args, **kwargs)  # type: ignore[arg-type]
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.close()
