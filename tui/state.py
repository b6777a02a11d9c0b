"""The agent's objects as the TUI sees them: frozen values parsed from control-API JSON.

Parsing is defensive because the JSON comes from another process: an object
without the fields the TUI cannot do without (an identity, a message id...)
raises :class:`AgentProtocolError`; an optional field of the wrong type reads
as "unknown" (``None``) rather than taking the app down. Unknown extra fields
are ignored, so a newer agent still works with this TUI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar

from tui.errors import AgentProtocolError

__all__ = [
    "MAX_TEXT_CHARS",
    "AgentEvent",
    "AgentInfo",
    "Alert",
    "AlertKind",
    "AlertUpdate",
    "BundleReplaced",
    "Conversation",
    "Delivery",
    "Epoch",
    "EpochUpdate",
    "Group",
    "Lagged",
    "LinkState",
    "Message",
    "MessageUpdate",
    "Mission",
    "Peer",
    "PeerUpdate",
    "ReceiptUpdate",
    "TokenStatus",
    "parse_agent_info",
    "parse_alert",
    "parse_event",
    "parse_groups",
    "parse_list",
    "parse_message",
    "parse_peer",
]

MAX_TEXT_CHARS = 4000
"""Longest message text the agent accepts (it answers ``too-large`` beyond)."""

T = TypeVar("T")
StrEnumT = TypeVar("StrEnumT", bound=StrEnum)


class LinkState(StrEnum):
    """How a dialogue mate is reached right now."""

    DIRECT = "direct"
    RELAYED = "relayed"
    OFFLINE = "offline"
    REFUSED = "refused"


class Delivery(StrEnum):
    """How far an outgoing message got; the order of the members is the order of progress."""

    PENDING = "pending"
    SENT = "sent"
    UNDELIVERABLE = "undeliverable"  # its recipient was revoked first (a receipt still wins)
    DELIVERED = "delivered"
    READ = "read"

    @property
    def rank(self) -> int:
        return _DELIVERY_ORDER.index(self)


_DELIVERY_ORDER = tuple(Delivery)


class AlertKind(StrEnum):
    REFUSED = "refused"
    EXPIRING = "expiring"
    REVOKED = "revoked"
    TOKEN = "token"
    UPLINK = "uplink"


@dataclass(frozen=True, slots=True, order=True)
class Conversation:
    """One chat: with a dialogue mate (``kind="peer"``) or a group (``kind="group"``)."""

    kind: Literal["peer", "group"]
    name: str

    @property
    def key(self) -> str:
        """A string id usable as a widget option id: ``peer:gs-1``, ``group:squad``."""
        return f"{self.kind}:{self.name}"

    @classmethod
    def from_key(cls, key: str) -> Conversation:
        kind, _, name = key.partition(":")
        if kind == "peer":
            return cls("peer", name)
        if kind == "group":
            return cls("group", name)
        raise ValueError(f"not a conversation key: {key!r}")

    def request_arguments(self) -> dict[str, str]:
        """The ``"peer"``/``"group"`` argument of ``history`` and ``mark_read``."""
        return {self.kind: self.name}


@dataclass(frozen=True, slots=True)
class Peer:
    identity: str
    role: str
    state: LinkState
    via: str | None
    last_seen: float | None
    position: tuple[float, float, float] | None
    battery: float | None
    text: str | None
    ck_expires: float | None
    refused_reason: str | None


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    direction: Literal["in", "out"]
    peer: str
    group: str | None
    text: str
    at: float
    state: Delivery
    read: bool

    @property
    def conversation(self) -> Conversation:
        return Conversation("group", self.group) if self.group else Conversation("peer", self.peer)

    @property
    def unread(self) -> bool:
        return self.direction == "in" and not self.read


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: int
    at: float
    kind: AlertKind
    peer: str | None
    message: str
    repeats: int = 0  # the same cause again since it was raised (``at`` is the latest)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Mission:
    name: str
    id: str
    start: float | None
    end: float | None
    epoch_seconds: float | None


@dataclass(frozen=True, slots=True)
class Epoch:
    index: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class TokenStatus:
    state: Literal["ok", "absent", "error"]
    message: str


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """The ``hello`` result: who this node is and what the agent is doing."""

    identity: str
    role: str
    mission: Mission
    epoch: Epoch | None
    token: TokenStatus
    listen: str
    links: int | None
    version: str


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    peer: Peer


@dataclass(frozen=True, slots=True)
class MessageUpdate:
    message: Message


@dataclass(frozen=True, slots=True)
class ReceiptUpdate:
    message_id: str
    peer: str
    state: Delivery


@dataclass(frozen=True, slots=True)
class AlertUpdate:
    alert: Alert


@dataclass(frozen=True, slots=True)
class EpochUpdate:
    epoch: Epoch


@dataclass(frozen=True, slots=True)
class Lagged:
    """The agent dropped events for this client (it read too slowly): refetch everything."""


@dataclass(frozen=True, slots=True)
class BundleReplaced:
    """The agent took a bundle fetched from its AS: mates, groups and keysets may differ."""


AgentEvent = (
    PeerUpdate | MessageUpdate | ReceiptUpdate | AlertUpdate | EpochUpdate | Lagged | BundleReplaced
)


# -- field readers ----------------------------------------------------------------------------


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise AgentProtocolError(f"{what} is not a JSON object")
    return value


def _required_str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise AgentProtocolError(f"{what}: {key!r} is missing or not a string")
    return value


def _required_number(obj: Mapping[str, Any], key: str, what: str) -> float:
    value = _number(obj.get(key))
    if value is None:
        raise AgentProtocolError(f"{what}: {key!r} is missing or not a number")
    return value


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past float's range: unknown, like any other bad value
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _enum(enum: type[StrEnumT], value: Any, key: str, what: str) -> StrEnumT:
    try:
        return enum(value)
    except ValueError:
        raise AgentProtocolError(
            f"{what}: {key!r} is {value!r}, not one of the API's values"
        ) from None


def _position(value: Any) -> tuple[float, float, float] | None:
    if not isinstance(value, list) or len(value) != 3:
        return None
    numbers = [_number(v) for v in value]
    if any(n is None for n in numbers):
        return None
    lat, lon, alt = (float(n) for n in numbers if n is not None)
    return (lat, lon, alt)


# -- parsers ----------------------------------------------------------------------------------


def parse_peer(value: Any) -> Peer:
    obj = _object(value, "peer")
    identity = _required_str(obj, "identity", "peer")
    what = f"peer {identity}"
    return Peer(
        identity=identity,
        role=_str(obj.get("role")) or "?",
        state=_enum(LinkState, obj.get("state"), "state", what),
        via=_str(obj.get("via")),
        last_seen=_number(obj.get("last_seen")),
        position=_position(obj.get("position")),
        battery=_number(obj.get("battery")),
        text=_str(obj.get("text")),
        ck_expires=_number(obj.get("ck_expires")),
        refused_reason=_str(obj.get("refused_reason")),
    )


def parse_message(value: Any) -> Message:
    obj = _object(value, "message")
    message_id = _required_str(obj, "id", "message")
    what = f"message {message_id}"
    direction = obj.get("direction")
    if direction not in ("in", "out"):
        raise AgentProtocolError(f"{what}: 'direction' is {direction!r}, not 'in' or 'out'")
    text = obj.get("text")
    group = _str(obj.get("group")) or None
    peer = obj.get("peer")
    # A message we sent to a group has no single recipient: the agent leaves "peer" empty.
    if not isinstance(peer, str) or not (peer or (group and direction == "out")):
        raise AgentProtocolError(f"{what}: 'peer' is missing or not a string")
    return Message(
        id=message_id,
        direction="in" if direction == "in" else "out",
        peer=peer,
        group=group,
        text=text if isinstance(text, str) else "",
        at=_required_number(obj, "at", what),
        # Incoming messages carry no delivery state (null): they are delivered by definition.
        state=_enum(
            Delivery,
            obj.get("state") or ("delivered" if direction == "in" else "sent"),
            "state",
            what,
        ),
        read=obj.get("read") is True,
    )


def parse_alert(value: Any) -> Alert:
    obj = _object(value, "alert")
    alert_id = _int(obj.get("alert_id"))
    if alert_id is None:
        raise AgentProtocolError("alert: 'alert_id' is missing or not an integer")
    what = f"alert {alert_id}"
    message = obj.get("message")
    repeats = _int(obj.get("repeats"))  # (absent from agents older than it)
    return Alert(
        alert_id=alert_id,
        at=_required_number(obj, "at", what),
        kind=_enum(AlertKind, obj.get("kind"), "kind", what),
        peer=_str(obj.get("peer")),
        message=message if isinstance(message, str) else "",
        repeats=repeats if repeats is not None and repeats > 0 else 0,
    )


def parse_epoch(value: Any) -> Epoch:
    obj = _object(value, "epoch")
    index = _int(obj.get("index"))
    if index is None:
        raise AgentProtocolError("epoch: 'index' is missing or not an integer")
    return Epoch(
        index, _required_number(obj, "start", "epoch"), _required_number(obj, "end", "epoch")
    )


def parse_groups(value: Any) -> tuple[Group, ...]:
    """``{"name": ["member", ...]}`` to groups sorted by name; non-string members are dropped."""
    obj = _object(value, "groups")
    groups = []
    for name, members in obj.items():
        if not isinstance(members, list):
            raise AgentProtocolError(f"group {name}: members are not a list")
        groups.append(Group(name, tuple(m for m in members if isinstance(m, str))))
    return tuple(sorted(groups, key=lambda g: g.name))


def parse_agent_info(value: Any) -> AgentInfo:
    obj = _object(value, "hello result")
    mission = obj.get("mission")
    mission_obj = mission if isinstance(mission, dict) else {}
    token = obj.get("token")
    token_obj = token if isinstance(token, dict) else {}
    token_state = token_obj.get("state")
    epoch = obj.get("epoch")
    return AgentInfo(
        identity=_required_str(obj, "identity", "hello result"),
        role=_str(obj.get("role")) or "?",
        mission=Mission(
            name=_str(mission_obj.get("name")) or "?",
            id=_str(mission_obj.get("id")) or "",
            start=_number(mission_obj.get("start")),
            end=_number(mission_obj.get("end")),
            epoch_seconds=_number(mission_obj.get("epoch_seconds")),
        ),
        epoch=None if epoch is None else parse_epoch(epoch),
        token=TokenStatus(
            state=token_state if token_state in ("ok", "absent") else "error",
            message=_str(token_obj.get("message")) or "",
        ),
        listen=_str(obj.get("listen")) or "",
        links=_int(obj.get("links")),
        version=_str(obj.get("version")) or "",
    )


def parse_list(items: Any, parse: Callable[[Any], T], what: str) -> tuple[list[T], list[str]]:
    """Parse a list of objects, keeping the good ones and the reasons the others were dropped.

    One malformed peer should not hide all the others, but it should not go unnoticed either.
    """
    if not isinstance(items, list):
        raise AgentProtocolError(f"{what} is not a list")
    good: list[T] = []
    problems: list[str] = []
    for item in items:
        try:
            good.append(parse(item))
        except AgentProtocolError as exc:
            problems.append(str(exc))
    return good, problems


def parse_event(name: str, fields: Mapping[str, Any]) -> AgentEvent | None:
    """Turn an ``{"event": name, ...}`` line into a typed update; unknown names give ``None``."""
    if name == "peer":
        return PeerUpdate(parse_peer(fields.get("peer")))
    if name == "message":
        return MessageUpdate(parse_message(fields.get("message")))
    if name == "receipt":
        state = _enum(Delivery, fields.get("state"), "state", "receipt")
        return ReceiptUpdate(
            message_id=_required_str(fields, "message_id", "receipt"),
            peer=_required_str(fields, "peer", "receipt"),
            state=state,
        )
    if name == "alert":
        return AlertUpdate(parse_alert(fields.get("alert")))
    if name == "epoch":
        return EpochUpdate(parse_epoch(fields.get("epoch")))
    if name == "lagged":
        return Lagged()
    if name == "bundle":
        return BundleReplaced()
    return None
