"""A small blocking client of the control API, for the command line.

(The TUI has its own asyncio client with reconnection; the CLI only needs one
request, or one stream of events, per run.)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from mesh.errors import MeshError

__all__ = ["ControlClient", "ControlUnavailable", "RequestFailed", "default_control_path"]

MAX_LINE = 16 * 1024 * 1024  # responses: a long history is large; requests are capped by the agent


class ControlUnavailable(MeshError):
    """No agent answers on that control socket."""


class RequestFailed(MeshError):
    """The agent refused a request (its error code and message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


def default_control_path() -> str:
    """``$SNRMESH_CONTROL``, else the control socket of the default state folder."""
    if path := os.environ.get("SNRMESH_CONTROL"):
        return path
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "snrmesh", "control.sock")


class ControlClient:
    def __init__(self, path: str, *, timeout: float | None = 10.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise ControlUnavailable(
                f"no agent is listening on {path} (is 'snrmesh agent' running? --control?)"
            ) from None
        except OSError as exc:
            self._sock.close()
            # (a path too long for a socket has no strerror: it said "None")
            raise ControlUnavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self._file = self._sock.makefile("rb")
        self._next_id = 0

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_LINE + 1)
        except TimeoutError:
            raise ControlUnavailable("the agent did not answer in time") from None
        except OSError as exc:  # reset: the agent died or dropped us
            raise ControlUnavailable(f"the control connection broke: {exc.strerror}") from None
        if not line:
            raise ControlUnavailable("the agent closed the control connection")
        try:
            obj = json.loads(line)
        except ValueError:
            raise ControlUnavailable("the agent sent something that is not JSON") from None
        if not isinstance(obj, dict):
            raise ControlUnavailable("the agent sent something that is not an object")
        return obj

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        self._next_id += 1
        rid = self._next_id
        try:
            self._sock.sendall(json.dumps({"id": rid, "op": op, **args}).encode() + b"\n")
        except TimeoutError:
            raise ControlUnavailable("the agent did not take the request in time") from None
        except OSError:  # a broken pipe: the agent refused a request too long to read,
            pass  # and its answer (id null) may wait to be read; else _read says it broke
        while True:
            reply = self._read()
            if reply.get("id") == rid and "ok" in reply:
                break
            if "id" in reply and reply["id"] is None and reply.get("ok") is False:
                break  # a request the agent could not read (too long, not JSON): ours
        if not reply["ok"]:
            error = reply.get("error") or {}
            raise RequestFailed(str(error.get("code")), str(error.get("message")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    def events(self) -> Iterator[dict[str, Any]]:
        """Subscribe now; the iterator then yields events until the agent goes away.

        The answer to ``subscribe`` is waited for with the timeout, as any other (a wedged
        agent is an error, not a silent hang); only the events are waited for without one.
        """
        self.request("subscribe")
        self._sock.settimeout(None)
        return self._event_stream()

    def _event_stream(self) -> Iterator[dict[str, Any]]:
        while True:
            obj = self._read()
            if "event" in obj:
                yield obj
