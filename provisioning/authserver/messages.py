"""The Authentication Server's wire messages: CBOR maps, every field bounded.

Two phases share one TCP stream (``docs/authentication-server.md``):

* **clear**: each message is ``uint16_be length || CBOR map`` of at most
  :data:`MAX_CLEAR_MESSAGE` bytes -- ``HELLO``, ``COOKIE``, ``START``, ``REFUSE``;
* **secure**: after ``START``, the stream carries the project's Noise session
  (``mesh.protocol``); each record's plaintext is one CBOR map --
  ``CHALLENGE``, ``ANSWER``, ``READY``, ``REQUEST``, ``KEYSET``, ``BUNDLE-REQUEST``,
  ``BUNDLE`` (a node's bundle, in parts: one record holds at most 8 KiB), ``REFUSE``.

Parsing is pure (``pull_*``/``encode``, aioquic's ``packet.py`` model): sizes are
checked before CBOR is decoded, and every field's type and bound after. Nothing
here holds a key or makes a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import cbor2

from mesh.keyset import KeysetError, check_identity
from mesh.keyset.copies import MAX_COPY_SIZE
from mesh.keyset.keyset import CK_ID_SIZE
from mesh.token.keychange import MAX_GENERATION, MAX_KEY_CHANGE_SIZE
from mesh.wire.plain import check_plain
from provisioning.authserver.errors import MessageError, Refusal

__all__ = [
    "BUNDLE_PART_SIZE",
    "CHALLENGE_SIZE",
    "LENGTH_SIZE",
    "MAC_SIZE",
    "MAX_BUNDLE_AHEAD",
    "MAX_BUNDLE_PARTS",
    "MAX_CLEAR_MESSAGE",
    "MAX_COOKIE_SIZE",
    "MAX_GENERATION",
    "MAX_LINK_BUNDLE",
    "MAX_PURPOSE_LENGTH",
    "MAX_RETRY_AFTER",
    "MAX_SECURE_MESSAGE",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "Answer",
    "BundlePart",
    "BundleRequest",
    "Challenge",
    "CookieReply",
    "Hello",
    "KeysetGrant",
    "KeysetRequest",
    "Kind",
    "Message",
    "Ready",
    "Refuse",
    "Start",
    "decode",
    "encode",
    "frame_clear",
    "pull_clear",
]

PROTOCOL_VERSION = 1
LENGTH_SIZE = 2
MAX_CLEAR_MESSAGE = 512
MAX_SECURE_MESSAGE = 8192
NONCE_SIZE = 16
CHALLENGE_SIZE = 32
MAC_SIZE = 32
MAX_COOKIE_SIZE = 64
MAX_EPOCH = 10_000
MAX_PURPOSE_LENGTH = 32
MAX_RETRY_AFTER = 3600.0
MAX_FIELDS = 8
MAX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z: past it, no date prints (a hostile AS)
BUNDLE_PART_SIZE = 7168  # bytes of bundle per record, under MAX_SECURE_MESSAGE with its map
MAX_BUNDLE_PARTS = 1024
MAX_LINK_BUNDLE = BUNDLE_PART_SIZE * MAX_BUNDLE_PARTS  # 7 MiB: a squad's, not a head-end's
MAX_BUNDLE_AHEAD = 4  # epochs past the current one (the AS's window for keysets)


class Kind(IntEnum):
    HELLO = 1
    COOKIE = 2
    START = 3
    REFUSE = 4
    CHALLENGE = 5
    ANSWER = 6
    READY = 7
    REQUEST = 8
    KEYSET = 9
    BUNDLE_REQUEST = 10
    BUNDLE = 11


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> AS, clear: who I am, which key generation my token holds, my nonce."""

    identity: str
    generation: int
    client_nonce: bytes
    cookie: bytes | None = None


@dataclass(frozen=True, slots=True)
class CookieReply:
    """AS -> client, clear: too many pending challenges from your source; echo this."""

    cookie: bytes


@dataclass(frozen=True, slots=True)
class Start:
    """AS -> client, clear: my nonce; the Noise handshake follows on the same stream."""

    server_nonce: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """Either way, clear or secure: a refusal, temporary when ``retry_after`` is set."""

    refusal: Refusal
    retry_after: float | None = None


@dataclass(frozen=True, slots=True, repr=False)
class Challenge:
    """AS -> client, secure: answer ``challenge`` with the AUTH MAC of ``generation``.

    ``key_change`` (a JWE under the token's current KEY_CHANGE key) is present when
    the AS changes the token's keys first; ``generation`` is then the new one.
    """

    challenge: bytes
    generation: int
    key_change: str | None = None

    def __repr__(self) -> str:
        return f"Challenge(generation={self.generation}, key_change={self.key_change is not None})"


@dataclass(frozen=True, slots=True)
class Answer:
    """Client -> AS, secure: the token's AUTH MAC over the challenge transcript."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """AS -> client, secure: authenticated at ``generation``; requests may follow."""

    generation: int


@dataclass(frozen=True, slots=True)
class KeysetRequest:
    """Client -> AS, secure: a CK with ``target`` for ``purpose`` (epoch: None = current)."""

    request_id: bytes
    target: str
    purpose: str
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class KeysetGrant:
    """AS -> client, secure: the CK, as our copy and the target's copy (the ticket)."""

    request_id: bytes
    ck_id: bytes
    peer: str
    not_before: int
    not_after: int
    own: str
    ticket: str


@dataclass(frozen=True, slots=True)
class BundleRequest:
    """Client -> AS, secure: my bundle, with CKs for every mate ``ahead`` epochs past this one.

    What a field node asks after its keys changed (its desk bundle no longer
    opens) or to carry the next epochs' keysets into the field.
    """

    request_id: bytes
    ahead: int = 1


@dataclass(frozen=True, slots=True, repr=False)
class BundlePart:
    """AS -> client, secure: part ``index`` of ``count`` of the bundle asked by ``request_id``."""

    request_id: bytes
    index: int
    count: int
    data: bytes

    def __repr__(self) -> str:
        return f"BundlePart({self.index + 1}/{self.count}, {len(self.data)} bytes)"


Message = (
    Hello
    | CookieReply
    | Start
    | Refuse
    | Challenge
    | Answer
    | Ready
    | KeysetRequest
    | KeysetGrant
    | BundleRequest
    | BundlePart
)
_CLEAR = (Hello, CookieReply, Start, Refuse)


def encode(message: Message) -> bytes:
    """The CBOR map of ``message`` (without the clear phase's length prefix)."""
    body: dict[str, Any]
    match message:
        case Hello():
            body = {
                "t": Kind.HELLO,
                "v": PROTOCOL_VERSION,
                "id": message.identity,
                "gen": message.generation,
                "cn": message.client_nonce,
            }
            if message.cookie is not None:
                body["ck"] = message.cookie
        case CookieReply():
            body = {"t": Kind.COOKIE, "ck": message.cookie}
        case Start():
            body = {"t": Kind.START, "sn": message.server_nonce}
        case Refuse():
            body = {"t": Kind.REFUSE, "why": message.refusal.value}
            if message.retry_after is not None:
                body["ra"] = message.retry_after
        case Challenge():
            body = {"t": Kind.CHALLENGE, "ch": message.challenge, "gen": message.generation}
            if message.key_change is not None:
                body["kc"] = message.key_change
        case Answer():
            body = {"t": Kind.ANSWER, "mac": message.mac}
        case Ready():
            body = {"t": Kind.READY, "gen": message.generation}
        case KeysetRequest():
            body = {
                "t": Kind.REQUEST,
                "rid": message.request_id,
                "to": message.target,
                "for": message.purpose,
            }
            if message.epoch is not None:
                body["ep"] = message.epoch
        case KeysetGrant():
            body = {
                "t": Kind.KEYSET,
                "rid": message.request_id,
                "ck": message.ck_id,
                "peer": message.peer,
                "nbf": message.not_before,
                "exp": message.not_after,
                "own": message.own,
                "tkt": message.ticket,
            }
        case BundleRequest():
            body = {"t": Kind.BUNDLE_REQUEST, "rid": message.request_id, "ah": message.ahead}
        case BundlePart():
            body = {
                "t": Kind.BUNDLE,
                "rid": message.request_id,
                "i": message.index,
                "n": message.count,
                "d": message.data,
            }
    return cbor2.dumps(body)


def frame_clear(message: Message) -> bytes:
    """A clear-phase message with its length prefix."""
    if not isinstance(message, _CLEAR):
        raise MessageError(f"{type(message).__name__} is not a clear-phase message")
    body = encode(message)
    if len(body) > MAX_CLEAR_MESSAGE:
        raise MessageError("clear message too large")
    return len(body).to_bytes(LENGTH_SIZE, "big") + body


def pull_clear(buffer: bytes) -> tuple[Message, int] | None:
    """The first clear message of ``buffer`` and the bytes it used, or None if incomplete."""
    if len(buffer) < LENGTH_SIZE:
        return None
    size = int.from_bytes(buffer[:LENGTH_SIZE], "big")
    if not 0 < size <= MAX_CLEAR_MESSAGE:
        raise MessageError(f"clear message of {size} bytes (1..{MAX_CLEAR_MESSAGE})")
    if len(buffer) < LENGTH_SIZE + size:
        return None
    message = decode(buffer[LENGTH_SIZE : LENGTH_SIZE + size], limit=MAX_CLEAR_MESSAGE)
    if not isinstance(message, _CLEAR):
        raise MessageError("a secure-phase message sent in the clear")
    return message, LENGTH_SIZE + size


# -- decoding -------------------------------------------------------------------------------


def _bytes(body: dict[str, Any], key: str, size: int, *, exact: bool = True) -> bytes:
    value = body.get(key)
    if type(value) is not bytes or (len(value) != size if exact else not 0 < len(value) <= size):
        raise MessageError(f"field {key!r} must be {'' if exact else 'up to '}{size} bytes")
    return value


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body.get(key)
    if type(value) is not int or not low <= value <= high:
        raise MessageError(f"field {key!r} must be an integer in {low}..{high}")
    return value


def _text(body: dict[str, Any], key: str, limit: int) -> str:
    value = body.get(key)
    if type(value) is not str or not 0 < len(value) <= limit:
        raise MessageError(f"field {key!r} must be text of 1..{limit} characters")
    return value


def _identity(body: dict[str, Any], key: str) -> str:
    try:
        return check_identity(_text(body, key, 64))
    except KeysetError as exc:
        raise MessageError(f"field {key!r}: {exc}") from None


def _copy(body: dict[str, Any], key: str) -> str:
    value = _text(body, key, MAX_COPY_SIZE)
    if not value.isascii():
        raise MessageError(f"field {key!r} is not a JWE compact serialization")
    return value


def _retry(body: dict[str, Any]) -> float | None:
    value = body.get("ra")
    if value is None:
        return None
    # compared, not converted: an int of any size compares exactly with a float (NaN and
    # infinities fail the range), where math.isfinite(2**1024) would raise OverflowError
    if type(value) not in (int, float) or not 0 <= value <= MAX_RETRY_AFTER:
        raise MessageError(f"retry-after must be 0..{MAX_RETRY_AFTER:g} seconds")
    return float(value)


def decode(data: bytes, *, limit: int = MAX_SECURE_MESSAGE) -> Message:
    """Parse one CBOR message of at most ``limit`` bytes; :class:`MessageError` on any defect."""
    if len(data) > limit:
        raise MessageError(f"message over {limit} bytes")
    try:
        check_plain(data)  # before cbor2: shared references could freeze it (mesh/wire/plain.py)
        body = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise MessageError("message is not CBOR") from None
    if type(body) is not dict or len(body) > MAX_FIELDS or not all(type(k) is str for k in body):
        raise MessageError("message is not a small CBOR map with text keys")
    kind = body.get("t")
    if type(kind) is not int or kind not in Kind._value2member_map_:
        raise MessageError("unknown message type")
    match kind:  # an int: the cases compare by value, with no Enum call per message
        case Kind.HELLO:
            _int(body, "v", PROTOCOL_VERSION, PROTOCOL_VERSION)
            cookie = body.get("ck")
            return Hello(
                identity=_identity(body, "id"),
                generation=_int(body, "gen", 1, MAX_GENERATION),
                client_nonce=_bytes(body, "cn", NONCE_SIZE),
                cookie=None if cookie is None else _bytes(body, "ck", MAX_COOKIE_SIZE, exact=False),
            )
        case Kind.COOKIE:
            return CookieReply(_bytes(body, "ck", MAX_COOKIE_SIZE, exact=False))
        case Kind.START:
            return Start(_bytes(body, "sn", NONCE_SIZE))
        case Kind.REFUSE:
            why = body.get("why")
            if type(why) is not str or why not in Refusal._value2member_map_:
                raise MessageError("unknown refusal")
            return Refuse(Refusal(why), _retry(body))
        case Kind.CHALLENGE:
            kc = body.get("kc")
            return Challenge(
                challenge=_bytes(body, "ch", CHALLENGE_SIZE),
                generation=_int(body, "gen", 1, MAX_GENERATION),
                key_change=None if kc is None else _text(body, "kc", MAX_KEY_CHANGE_SIZE),
            )
        case Kind.ANSWER:
            return Answer(_bytes(body, "mac", MAC_SIZE))
        case Kind.READY:
            return Ready(_int(body, "gen", 1, MAX_GENERATION))
        case Kind.REQUEST:
            purpose = _text(body, "for", MAX_PURPOSE_LENGTH)
            if not purpose.isascii() or not purpose.isprintable():
                raise MessageError("purpose must be printable ASCII")
            ep = body.get("ep")
            return KeysetRequest(
                request_id=_bytes(body, "rid", NONCE_SIZE),
                target=_identity(body, "to"),
                purpose=purpose,
                epoch=None if ep is None else _int(body, "ep", 0, MAX_EPOCH),
            )
        case Kind.KEYSET:
            return KeysetGrant(
                request_id=_bytes(body, "rid", NONCE_SIZE),
                ck_id=_bytes(body, "ck", CK_ID_SIZE),
                peer=_identity(body, "peer"),
                not_before=_int(body, "nbf", 0, MAX_TIME),
                not_after=_int(body, "exp", 0, MAX_TIME),
                own=_copy(body, "own"),
                ticket=_copy(body, "tkt"),
            )
        case Kind.BUNDLE_REQUEST:
            return BundleRequest(
                request_id=_bytes(body, "rid", NONCE_SIZE),
                ahead=_int(body, "ah", 0, MAX_BUNDLE_AHEAD),
            )
        case Kind.BUNDLE:
            count = _int(body, "n", 1, MAX_BUNDLE_PARTS)
            return BundlePart(
                request_id=_bytes(body, "rid", NONCE_SIZE),
                index=_int(body, "i", 0, count - 1),
                count=count,
                data=_bytes(body, "d", BUNDLE_PART_SIZE, exact=False),
            )
    raise MessageError("unknown message type")  # pragma: no cover - Kind is exhaustive
