"""Application messages: what agents say to each other inside session records.

Each message is one CBOR map (RFC 8949) in one session record: ``{"t": kind,
...}``. Two families share the format:

* **end-to-end** (``chat``, ``receipt``, ``status``): between two dialogue
  mates, inside *their* session (a direct link, or a session whose frames are
  relayed), so each is authenticated to its sender and keeps forward secrecy;
* **hop-by-hop** (``routes``, ``relay``, ``ping``): between link neighbours
  only, inside the link's session: reachability, and opaque frames of other
  pairs' sessions that this hop forwards without being able to read them.

Decoding treats input as hostile: the record is size-capped before CBOR sees
it, every field is typed and bounded, unknown kinds are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cbor2

from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import check_identity
from mesh.wire.errors import WireError
from mesh.wire.plain import check_plain

__all__ = [
    "MAX_GROUP_NAME",
    "MAX_HOPS",
    "MAX_MESSAGE_SIZE",
    "MAX_RECEIPT_IDS",
    "MAX_ROUTES",
    "MAX_STATUS_TEXT",
    "MAX_TEXT",
    "MAX_TEXT_BYTES",
    "MESSAGE_ID_SIZE",
    "SESSION_ID_SIZE",
    "Chat",
    "Message",
    "Ping",
    "Receipt",
    "Relay",
    "Routes",
    "SessionGone",
    "Status",
    "check_position",
    "decode",
    "encode",
]

MESSAGE_ID_SIZE = 16
MAX_TEXT = 4000
MAX_TEXT_BYTES = 12 * 1024  # UTF-8: a chat must fit one record even when relayed
MAX_STATUS_TEXT = 200
MAX_GROUP_NAME = 64
MAX_ROUTES = 4096
MAX_RECEIPT_IDS = 512
MAX_HOPS = 8
MAX_RELAYED_FRAME = 16 * 1024 + 64
MAX_MESSAGE_SIZE = 64 * 1024
SESSION_ID_SIZE = 32  # a Noise handshake hash (SHA-256)


@dataclass(frozen=True, slots=True)
class Chat:
    """A chat message; ``group`` is set when it is one fan-out copy of a group message."""

    message_id: bytes
    text: str
    sent_at: float
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """``delivered`` (stored by the recipient) or ``read`` (seen by its user), for 1..512 ids.

    A ``read`` receipt is answered with itself by the messages' sender, so that the reader,
    which keeps sending it until then, knows it arrived (``docs/agent.md``, Storage).
    """

    message_ids: tuple[bytes, ...]
    state: str  # "delivered" | "read"


@dataclass(frozen=True, slots=True)
class Status:
    role: str
    sent_at: float
    position: tuple[float, float, float] | None = None
    battery: float | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Routes:
    """The sender's reachability: (identity, hops) it can forward to; replaces its last one."""

    reach: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Relay:
    """A frame of a ``src``-``dst`` session, forwarded hop by hop; ``ttl`` bounds the path.

    Each side of a relayed pair sends on the session it initiated, so a frame
    says whose session it belongs to: ``src_initiated`` is true for the session
    ``src`` started (``dst`` is its responder).
    """

    src: str
    dst: str
    ttl: int
    frame: bytes
    src_initiated: bool = True


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive on an idle link; on a relayed session, a probe that our mate still holds it."""


@dataclass(frozen=True, slots=True)
class SessionGone:
    """On the relayed session the sender opened: "records of yours came that I cannot read".

    ``held`` names the session of the recipient's that the sender does hold (its
    ``Connection.session_id``), or is None: if that is not the recipient's current
    session, the recipient's is dead at the sender's side (lost, or the sender
    restarted) and it opens a new one; if it is, the records were stale or forged.
    """

    held: bytes | None = None


Message = Chat | Receipt | Status | Routes | Relay | Ping | SessionGone
RECEIPT_STATES = ("delivered", "read")


def encode(message: Message) -> bytes:
    doc: dict[str, Any]
    match message:
        case Chat():
            doc = {
                "t": "chat",
                "id": message.message_id,
                "text": message.text,
                "at": message.sent_at,
            }
            if message.group is not None:
                doc["g"] = message.group
        case Receipt():
            doc = {"t": "rcpt", "ids": list(message.message_ids), "s": message.state}
        case Status():
            doc = {"t": "status", "role": message.role, "at": message.sent_at}
            if message.position is not None:
                doc["pos"] = list(message.position)
            if message.battery is not None:
                doc["bat"] = message.battery
            if message.text is not None:
                doc["text"] = message.text
        case Routes():
            doc = {"t": "routes", "r": [[name, hops] for name, hops in message.reach]}
        case Relay():
            doc = {
                "t": "relay",
                "src": message.src,
                "dst": message.dst,
                "ttl": message.ttl,
                "f": message.frame,
                "i": message.src_initiated,
            }
        case Ping():
            doc = {"t": "ping"}
        case SessionGone():
            doc = {"t": "gone"}
            if message.held is not None:
                doc["h"] = message.held
    data = cbor2.dumps(doc)
    if len(data) > MAX_MESSAGE_SIZE:
        raise WireError("message too large")
    return data


# -- decoding ------------------------------------------------------------------------------------


def _get(
    doc: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False
) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WireError(f"field {key!r} missing or of the wrong type")
    return value


def _opt_text(doc: dict[str, Any], key: str, limit: int) -> str | None:
    value: str | None = _get(doc, key, str, optional=True)
    if value is None:
        return None
    # Line breaks and tabs are fine in chat; other control characters could drive a terminal.
    if len(value) > limit or not value.replace("\n", " ").replace("\t", " ").isprintable():
        raise WireError(f"field {key!r} too long or has control characters")
    return value


def _text(doc: dict[str, Any], key: str, limit: int) -> str:
    value = _opt_text(doc, key, limit)
    if value is None:
        raise WireError(f"field {key!r} missing")
    return value


def _identity(value: Any) -> str:
    if not isinstance(value, str):
        raise WireError("identity is not text")
    try:
        return check_identity(value)
    except KeysetError as exc:
        raise WireError(str(exc)) from None


def _message_id(doc: dict[str, Any]) -> bytes:
    value: bytes = _get(doc, "id", bytes)
    if len(value) != MESSAGE_ID_SIZE:
        raise WireError("message id must be 16 bytes")
    return value


def _opt_number(doc: dict[str, Any], key: str) -> float | None:
    value = _get(doc, key, (int, float), optional=True)
    if value is None:
        return None
    return _finite(value, f"field {key!r}")


def _finite(value: int | float, what: str) -> float:
    """``value`` as a finite float: a CBOR bignum past float's range is refused, not raised."""
    try:
        number = float(value)
    except OverflowError:
        raise WireError(f"{what} is out of range") from None
    if not math.isfinite(number):
        raise WireError(f"{what} is not a finite number")
    return number


def _number(doc: dict[str, Any], key: str) -> float:
    value = _opt_number(doc, key)
    if value is None:
        raise WireError(f"field {key!r} missing")
    return value


def check_position(values: list[int | float]) -> tuple[float, float, float]:
    """``[lat, lon, alt]`` as a position a mate accepts (degrees, metres), or :class:`WireError`."""
    lat, lon, alt = (_finite(x, "position") for x in values)
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and -1e5 <= alt <= 1e6):
        raise WireError("position out of range")
    return (lat, lon, alt)


def decode(data: bytes) -> Message:
    """Decode one message, or raise :class:`WireError`."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise WireError("message too large")
    try:
        check_plain(data)  # before cbor2: what it would take exponential time over (plain.py)
        doc = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise WireError("message is not valid CBOR") from None
    if not isinstance(doc, dict):
        raise WireError("message is not a CBOR map")
    kind = doc.get("t")
    if kind == "chat":
        group = _opt_text(doc, "g", MAX_GROUP_NAME)
        text = _text(doc, "text", MAX_TEXT)
        if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise WireError("chat text too large")
        return Chat(
            _message_id(doc),
            text,
            _number(doc, "at"),
            None if group is None else _identity(group),
        )
    if kind == "rcpt":
        state = _get(doc, "s", str)
        if state not in RECEIPT_STATES:
            raise WireError("unknown receipt state")
        message_ids = _get(doc, "ids", list)
        if not 0 < len(message_ids) <= MAX_RECEIPT_IDS or not all(
            isinstance(m, bytes) and len(m) == MESSAGE_ID_SIZE for m in message_ids
        ):
            raise WireError(f"a receipt carries 1..{MAX_RECEIPT_IDS} ids of 16 bytes")
        return Receipt(tuple(message_ids), state)
    if kind == "status":
        pos = _get(doc, "pos", list, optional=True)
        position = None
        if pos is not None:
            if len(pos) != 3 or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in pos
            ):
                raise WireError("position must be [lat, lon, alt]")
            position = check_position(pos)
        battery = _opt_number(doc, "bat")
        if battery is not None and not 0 <= battery <= 100:
            raise WireError("battery out of range")
        return Status(
            _text(doc, "role", 32),
            _number(doc, "at"),
            position,
            battery,
            _opt_text(doc, "text", MAX_STATUS_TEXT),
        )
    if kind == "routes":
        entries = _get(doc, "r", list)
        if len(entries) > MAX_ROUTES:
            raise WireError("too many routes")
        reach = []
        for entry in entries:
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or type(entry[1]) is not int
                or not 1 <= entry[1] <= MAX_HOPS
            ):
                raise WireError("route entries must be [identity, hops 1..8]")
            reach.append((_identity(entry[0]), entry[1]))
        return Routes(tuple(reach))
    if kind == "relay":
        ttl = _get(doc, "ttl", int)
        frame: bytes = _get(doc, "f", bytes)
        if not 0 <= ttl <= MAX_HOPS or not frame or len(frame) > MAX_RELAYED_FRAME:
            raise WireError("relay ttl or frame size out of range")
        initiated = doc.get("i")
        if not isinstance(initiated, bool):
            raise WireError("relay needs a boolean 'i'")
        return Relay(_identity(doc.get("src")), _identity(doc.get("dst")), ttl, frame, initiated)
    if kind == "ping":
        return Ping()
    if kind == "gone":
        held = _get(doc, "h", bytes, optional=True)
        if held is not None and len(held) != SESSION_ID_SIZE:
            raise WireError(f"a session id is {SESSION_ID_SIZE} bytes")
        return SessionGone(held)
    raise WireError("unknown message kind")
