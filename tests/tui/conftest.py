"""Fixtures for the TUI tests: a short socket path, an app on a fixed clock, and async tests.

``async def`` tests run on a fresh event loop each (no plugin needed) and are
cut off after :data:`TEST_TIMEOUT` seconds, so a hung reconnection fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from tests.tui.fake_agent import FIXED_NOW
from tui.app import SnrmeshApp
from tui.client import RetryPolicy

TEST_TIMEOUT = 20.0
FAST_RETRY = RetryPolicy(first=0.05, factor=2.0, longest=0.2)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**arguments), TEST_TIMEOUT))
    return True


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A socket path short enough for AF_UNIX (pytest's tmp_path can pass 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="snrtui-", dir="/tmp"))
    try:
        yield folder / "control.sock"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def make_app(path: Path | str, *, retry: RetryPolicy = FAST_RETRY) -> SnrmeshApp:
    """The app on the fake agent's fixed clock, retrying fast."""
    return SnrmeshApp(path, clock=lambda: FIXED_NOW, retry=retry)


async def wait_until(pilot: Pilot[None], condition: Callable[[], bool], what: str) -> None:
    """Let the app run until ``condition()`` holds; fail with ``what`` after 5 s."""
    for _ in range(250):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def loaded(pilot: Pilot[None]) -> None:
    """Wait until the app has connected and loaded the agent's state."""
    app = pilot.app
    assert isinstance(app, SnrmeshApp)
    await wait_until(pilot, lambda: app.state.online and bool(app.state.peers), "the first load")
