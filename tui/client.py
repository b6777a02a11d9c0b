"""The asyncio side of the control API: one connection, requests by id, the event stream.

This is a thin pump around :mod:`tui.wire`: a reader task splits the socket
into lines, hands each response to the request waiting on its ``id`` and
queues each event for :meth:`ControlClient.next_event`. When the connection
ends, every waiting request and the event stream fail with the same typed
error, so the caller has one place to notice and reconnect
(:func:`connect_with_retry`, with :class:`RetryPolicy` backoff).

Loop-only: every method must be called on the event loop that connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tui.errors import AgentProtocolError, AgentUnavailable, RequestRefused, TuiError
from tui.wire import MAX_LINE_BYTES, Event, Response, decode_line, encode_request

__all__ = [
    "CONNECT_TIMEOUT",
    "REQUEST_TIMEOUT",
    "ControlClient",
    "RetryPolicy",
    "connect_with_retry",
]

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the agent to accept a connection."""
REQUEST_TIMEOUT = 10.0
"""Seconds to wait for the answer to one request before calling the agent unavailable."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff between reconnection attempts: ``first * factor**n``, capped."""

    first: float = 0.25
    factor: float = 2.0
    longest: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.longest, self.first * self.factor ** min(attempt, 32))


class ControlClient:
    """One open connection to the agent's control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._failure: TuiError | None = None
        self._read_task = asyncio.create_task(self._read_loop(), name="snrmesh-control-reader")

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> ControlClient:
        """Open the socket; a missing socket or a stopped agent is :class:`AgentUnavailable`."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(
                    os.fspath(path), limit=MAX_LINE_BYTES
                )
        except TimeoutError:
            raise AgentUnavailable(f"agent at {os.fspath(path)} did not accept in time") from None
        except FileNotFoundError:
            raise AgentUnavailable(f"no agent socket at {os.fspath(path)}") from None
        except ConnectionRefusedError:
            raise AgentUnavailable(f"agent at {os.fspath(path)} is not running") from None
        except OSError as exc:
            raise AgentUnavailable(f"cannot reach agent at {os.fspath(path)}: {exc}") from None
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def request(self, op: str, **arguments: Any) -> Mapping[str, Any]:
        """Send one request and return its ``result``; ``"ok": false`` raises RequestRefused."""
        self._raise_if_closed()
        request_id = self._next_id
        self._next_id += 1
        data = encode_request(request_id, op, arguments)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            self._fail(AgentUnavailable(f"connection to the agent lost: {exc}"))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response = await future
        except TimeoutError:
            self._pending.pop(request_id, None)
            raise AgentUnavailable(f"agent did not answer {op!r} in {REQUEST_TIMEOUT:g}s") from None
        if not response.ok:
            raise RequestRefused(response.error_code, response.error_message)
        return response.result

    async def next_event(self) -> Event:
        """Wait for the next pushed event (after ``subscribe``); raises once the connection ends."""
        self._raise_if_closed()
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)  # wake any other waiter too
            self._raise_if_closed()
            raise AgentUnavailable("connection to the agent closed")
        return event

    async def close(self) -> None:
        self._fail(AgentUnavailable("connection closed by the TUI"))
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        failure = self._failure
        if isinstance(failure, AgentProtocolError):
            raise AgentProtocolError(str(failure))
        if failure is not None:
            raise AgentUnavailable(str(failure))

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise AgentProtocolError("agent closed the connection mid-line") from None
                    raise AgentUnavailable("the agent closed the control connection") from None
                except asyncio.LimitOverrunError:
                    raise AgentProtocolError(
                        f"agent sent a line longer than {MAX_LINE_BYTES} bytes"
                    ) from None
                item = decode_line(line)
                if isinstance(item, Event):
                    self._events.put_nowait(item)
                    continue
                future = self._pending.pop(item.request_id, None)
                if future is None:
                    raise AgentProtocolError(
                        f"agent answered request {item.request_id}, never sent"
                    )
                if not future.done():
                    future.set_result(item)
        except TuiError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(AgentUnavailable(f"connection to the agent lost: {exc}"))

    def _fail(self, failure: TuiError) -> None:
        if self._failure is not None:
            return
        self._failure = failure
        for future in self._pending.values():
            if not future.done():
                future.set_exception(
                    AgentProtocolError(str(failure))
                    if isinstance(failure, AgentProtocolError)
                    else AgentUnavailable(str(failure))
                )
        self._pending.clear()
        self._events.put_nowait(None)
        self._writer.close()


async def connect_with_retry(
    path: str | os.PathLike[str],
    policy: RetryPolicy,
    on_retry: Callable[[AgentUnavailable, float], None],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ControlClient:
    """Connect, waiting ``policy.delay(n)`` after the n-th failure; ``on_retry`` hears each one.

    Never gives up: an operator's TUI should sit and wait for its agent to come back.
    """
    attempt = 0
    while True:
        try:
            return await ControlClient.connect(path)
        except AgentUnavailable as exc:
            delay = policy.delay(attempt)
            on_retry(exc, delay)
            await sleep(delay)
            attempt += 1
