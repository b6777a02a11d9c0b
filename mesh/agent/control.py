"""The agent's local control API: JSON lines over a Unix socket (``docs/agent.md``).

The socket is created with mode 0600 inside the agent's state folder, so only
the agent's user can drive it. A client that sends garbage gets a
``bad-request`` answer (or is disconnected if a line exceeds
:data:`MAX_LINE`); it never disturbs the agent or the other clients. Events go
to subscribed clients through a bounded queue each: a client that stops
reading loses events (and is told with a ``lagged`` event), it never blocks
the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.errors import MeshError

__all__ = ["MAX_LINE", "ControlError", "ControlServer"]

MAX_LINE = 64 * 1024
EVENT_QUEUE = 1000

Dispatch = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(MeshError):
    """A request the agent refuses; ``code`` is one of the documented error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    def __init__(self, path: str | os.PathLike[str], dispatch: Dispatch) -> None:
        self.path = os.fspath(path)
        self._dispatch = dispatch
        self._server: asyncio.Server | None = None
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._remove_stale()
        old_umask = os.umask(0o177)
        try:
            # (the reader's limit is where the "\n" may start: a line of MAX_LINE bytes, its
            # "\n" included, has it at MAX_LINE - 1)
            self._server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=MAX_LINE - 1
            )
        except OSError as exc:  # no such folder, a path too long for a socket, ...
            raise MeshError(
                f"cannot create the control socket {self.path}: {exc.strerror or exc}"
            ) from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    def _remove_stale(self) -> None:
        """Remove the socket a killed agent left; refuse a live agent's socket or another file.

        ``--control`` naming a token (or any file) used to delete it, and a second agent on
        the same state folder took the running agent's socket away from it.
        """
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise MeshError(f"cannot use the control socket {self.path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise MeshError(f"control socket {self.path} exists and is not a socket: not replaced")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except ConnectionRefusedError:  # nobody listens: stale
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError:
            pass  # an agent too busy to accept is still an agent
        finally:
            probe.close()
        raise MeshError(f"another agent is running on the control socket {self.path}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for queue in self._subscribers:
            if queue.full():  # a client that stopped reading: its last event makes room
                queue.get_nowait()
            queue.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # ours: never the socket of an agent start() refused

    @property
    def watched(self) -> bool:
        """Whether any client subscribed (so building an event is worth it)."""
        return bool(self._subscribers)

    def broadcast(self, event: str, **fields: Any) -> None:
        line = _line({"event": event, **fields})
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                    queue.put_nowait(_line({"event": "lagged"}))
                continue
            queue.put_nowait(line)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        queue: asyncio.Queue[bytes | None] | None = None
        pump: asyncio.Task[None] | None = None
        lock = asyncio.Lock()

        async def send(data: bytes) -> None:
            async with lock:
                writer.write(data)
                await writer.drain()

        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    await send(
                        _line(
                            {
                                "id": None,
                                "ok": False,
                                "error": {
                                    "code": "too-large",
                                    "message": f"request line over {MAX_LINE} bytes",
                                },
                            }
                        )
                    )
                    return
                except asyncio.IncompleteReadError:
                    return
                response = await self._answer(raw)
                await send(_line(response))
                if (
                    response.get("ok")
                    and response.get("result") == {"subscribed": True}
                    and queue is None
                ):
                    queue = asyncio.Queue(EVENT_QUEUE)
                    self._subscribers.add(queue)
                    pump = asyncio.create_task(self._pump(queue, send))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if queue is not None:
                self._subscribers.discard(queue)
            if pump is not None:
                pump.cancel()
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    @staticmethod
    async def _pump(
        queue: asyncio.Queue[bytes | None], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while (line := await queue.get()) is not None:
                await send(line)

    async def _answer(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
            # a lone surrogate ("\\ud800") is valid JSON but no text: refused here, once, rather
            # than wherever it would reach an encoder (SQLite, a socket, a log)
            json.dumps(request, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError):  # (UnicodeError is a ValueError)
            return {
                "id": None,
                "ok": False,
                "error": {"code": "bad-request", "message": "not a JSON line"},
            }
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {
                "id": None,
                "ok": False,
                "error": {"code": "bad-request", "message": "a request needs an 'op'"},
            }
        rid = request.get("id")
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            rid = None
        op = request.pop("op")
        request.pop("id", None)
        try:
            result = await self._dispatch(op, request)
        except ControlError as exc:
            return {"id": rid, "ok": False, "error": {"code": exc.code, "message": str(exc)}}
        except MeshError as exc:
            return {"id": rid, "ok": False, "error": {"code": "internal", "message": str(exc)}}
        return {"id": rid, "ok": True, "result": result}
