"""The event loop the Authentication Server and its clients run on: uvloop, else asyncio's.

The AS is a pump around a sans-IO core, so what a link costs beyond the
protocol is the event loop's: accepting, reading, writing and closing a TCP
connection three round trips long. On loopback asyncio's pure-Python selector
loop spends about 0.3 ms of CPU per such link on each side; uvloop (asyncio's
loop on libuv, in C, the same ``asyncio`` API) about a quarter of that, which
is the difference between a 2-core AS keeping up with a meter fleet or not
(``docs/authentication-server.md``, Performance). Where uvloop is not
installed (it is a dependency on Linux and macOS only), or with
``SNRMESH_EVENT_LOOP=asyncio``, the same code runs on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["ENV_VARIABLE", "loop_factory", "loop_name", "run"]

ENV_VARIABLE = "SNRMESH_EVENT_LOOP"  # "asyncio" forces asyncio's own loop
T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default loop."""
    if os.environ.get(ENV_VARIABLE, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop  # only the AS's commands load it: the agent never does
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: what :func:`run` will use (for reports)."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` chooses."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
