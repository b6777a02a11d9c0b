"""JSON-lines framing of the agent's control API, with no I/O (see docs/agent.md).

One JSON object per ``\\n``-terminated UTF-8 line: requests up to
:data:`MAX_REQUEST_BYTES`, answers up to :data:`MAX_LINE_BYTES`.
This module turns requests into bytes and lines into :class:`Response` or
:class:`Event` values; ``tui.client`` only moves the bytes. Anything the
agent sends that the API does not allow raises :class:`AgentProtocolError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tui.errors import AgentProtocolError, LocalRequestError

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_REQUEST_BYTES",
    "Event",
    "Response",
    "decode_line",
    "encode_request",
]

MAX_REQUEST_BYTES = 64 * 1024
"""Longest request line the agent accepts, the ``\\n`` included."""
MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest line we accept from the agent: a history of long messages is large."""


@dataclass(frozen=True, slots=True)
class Response:
    """The agent's one answer to the request with the same ``request_id``."""

    request_id: int
    ok: bool
    result: Mapping[str, Any]
    error_code: str = ""
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """Something the agent pushed after ``subscribe``: ``name`` and its other fields."""

    name: str
    fields: Mapping[str, Any]


def encode_request(request_id: int, op: str, arguments: Mapping[str, Any]) -> bytes:
    """Return one request line; a line the agent would have to refuse for size is ours to stop."""
    if "id" in arguments or "op" in arguments:
        raise LocalRequestError("request arguments may not be named 'id' or 'op'")
    line = json.dumps({"id": request_id, "op": op, **arguments}, ensure_ascii=False) + "\n"
    data = line.encode("utf-8")
    if len(data) > MAX_REQUEST_BYTES:
        raise LocalRequestError(
            f"request {op!r} is {len(data)} bytes; the limit is {MAX_REQUEST_BYTES}"
        )
    return data


def decode_line(line: bytes) -> Response | Event:
    """Parse one line from the agent (with or without its ``\\n``)."""
    if len(line) > MAX_LINE_BYTES:
        raise AgentProtocolError(
            f"agent sent a {len(line)}-byte line; the limit is {MAX_LINE_BYTES}"
        )
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise AgentProtocolError(f"agent sent a line that is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise AgentProtocolError("agent sent a JSON line that is not an object")
    if "event" in obj:
        name = obj["event"]
        if not isinstance(name, str):
            raise AgentProtocolError("agent sent an event whose name is not a string")
        return Event(name, {k: v for k, v in obj.items() if k != "event"})
    request_id = obj.get("id")
    ok = obj.get("ok")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not isinstance(ok, bool):
        raise AgentProtocolError("agent sent a line that is neither an event nor a response")
    if ok:
        result = obj.get("result", {})
        if not isinstance(result, dict):
            raise AgentProtocolError(f"response {request_id}: 'result' is not an object")
        return Response(request_id, True, result)
    error = obj.get("error")
    if not isinstance(error, dict):
        raise AgentProtocolError(f"response {request_id}: 'ok' is false but 'error' is missing")
    code, message = error.get("code"), error.get("message")
    return Response(
        request_id,
        False,
        {},
        code if isinstance(code, str) else "internal",
        message if isinstance(message, str) else "the agent gave no reason",
    )
