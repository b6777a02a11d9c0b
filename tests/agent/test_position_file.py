"""``--position-file`` (e.g. written by a GPS daemon) is another program's file: read bounded,
and only a position a mate accepts goes in the heartbeat; anything else falls back to
``--position``, since mates drop a whole heartbeat whose position is out of range."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mesh.agent.agent import MAX_POSITION_FILE, Agent

FALLBACK = (1.0, 2.0, 3.0)


def _position_from(path: Path) -> tuple[float, float, float] | None:
    agent = SimpleNamespace(  # just what Agent._position reads
        config=SimpleNamespace(position_file=path, simulate_track=False),
        _own_status={"position": FALLBACK},
    )
    return Agent._position(agent)  # type: ignore[arg-type]


def test_a_good_position_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "gps"
    path.write_text("48.85,2.35,35\n")
    assert _position_from(path) == (48.85, 2.35, 35.0)


@pytest.mark.parametrize(
    "content",
    [
        b"91,0,0",  # out of range: every mate would drop the heartbeat
        b"nan,0,0",
        b"1e400,0,0",
        b"48.85,2.35",
        b"\xff\xfe",
        b"48.85,2.35,35" + b" " * MAX_POSITION_FILE,  # past the bound: not read
        b"",
    ],
)
def test_a_bad_position_file_falls_back_to_the_given_position(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "gps"
    path.write_bytes(content)
    assert _position_from(path) == FALLBACK


def test_a_missing_position_file_falls_back_too(tmp_path: Path) -> None:
    assert _position_from(tmp_path / "nowhere") == FALLBACK
