"""ISO 7816-4 APDUs for the snrmesh applet: pure encoding and decoding, no I/O.

Both ends use this module: the applet (:mod:`mesh.token.applet`) parses
commands and builds responses, the host (:mod:`mesh.token.card`) builds
commands and parses responses. ``docs/secure-element.md`` is the reference for
every command, status word and data object named here.

* A command is ``CLA INS P1 P2 [Lc data] [Le]`` in short (Lc <= 255, Le <= 256)
  or extended form (Lc <= 65,535, Le <= 65,536; ISO 7816-3 cases 2E/3E/4E).
* Input larger than one command travels in a chain (ISO 7816-4 5.3.3): every
  command but the last has bit ``0x10`` of CLA set and identical INS/P1/P2.
* A response is ``[data] SW1 SW2``. Responses of this applet never exceed
  :data:`SHORT_MAX_LE` bytes of data, so GET RESPONSE is never needed.
* Data fields are simple TLV: one tag byte, a BER length (``0x00``-``0x7F``,
  ``0x81 xx`` or ``0x82 xx xx``, shortest form only) and the value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from mesh.token.errors import CardError

__all__ = [
    "AID",
    "CLA_CHAINING",
    "CLA_ISO",
    "CLA_PROPRIETARY",
    "EXTENDED_MAX_DATA",
    "SHORT_MAX_DATA",
    "SHORT_MAX_LE",
    "SW",
    "ApduError",
    "Command",
    "Ins",
    "Response",
    "Tag",
    "chain",
    "decode_tlv",
    "encode_tlv",
    "is_defined_sw",
    "parse_command",
    "parse_response",
    "wrong_pin_sw",
]

AID = bytes.fromhex("F0534E524D45534801")  # proprietary RID F0 + "SNRMESH" + version 1
HEADER_SIZE = 4
SW_SIZE = 2
SHORT_MAX_DATA = 255
SHORT_MAX_LE = 256
EXTENDED_MAX_DATA = 65_535
EXTENDED_MAX_LE = 65_536
CLA_ISO = 0x00
CLA_PROPRIETARY = 0x80
CLA_CHAINING = 0x10
MAX_TLV_ITEMS = 16
_LEN_1 = 0x81
_LEN_2 = 0x82


class Ins(IntEnum):
    """Instruction bytes. ``SELECT`` and ``VERIFY`` are ISO (CLA 00), the rest proprietary (80)."""

    GET_IDENTITY = 0x10
    GET_STATUS = 0x12
    VERIFY = 0x20
    UNWRAP = 0x30
    MAC = 0x32
    VERIFY_MAC = 0x34
    DERIVE = 0x36
    KEY_CHANGE = 0x40
    PERSONALISE = 0x50
    CLOSE = 0x52
    SELECT = 0xA4


ISO_INSTRUCTIONS = frozenset({Ins.SELECT, Ins.VERIFY})


class SW(IntEnum):
    """Status words the applet may answer (plus ``63Cx`` and ``6Cxx``, see below)."""

    OK = 0x9000
    VERIFICATION_FAILED = 0x6300  # a MAC or an AES-GCM tag did not verify
    MEMORY_FAILURE = 0x6581  # the new state could not be stored; nothing changed
    WRONG_LENGTH = 0x6700
    LAST_COMMAND_EXPECTED = 0x6883  # another command arrived in the middle of a chain
    CHAINING_UNSUPPORTED = 0x6884  # this instruction cannot be chained
    SECURITY_STATUS = 0x6982  # PIN not verified
    PIN_BLOCKED = 0x6983
    NOT_NEWER = 0x6984  # key change not newer than the keys held
    CONDITIONS = 0x6985  # wrong life-cycle state for this command
    WRONG_DATA = 0x6A80
    APPLET_NOT_FOUND = 0x6A82
    NO_MEMORY = 0x6A84  # a chain longer than the applet buffers
    WRONG_P1P2 = 0x6A86
    WRONG_KEY = 0x6A88  # for another token or key generation; or no identity yet
    INS_UNSUPPORTED = 0x6D00
    CLA_UNSUPPORTED = 0x6E00
    NO_DIAGNOSIS = 0x6F00


WRONG_PIN_BASE = 0x63C0  # 63Cx: wrong PIN, x tries left
WRONG_LE_BASE = 0x6C00  # 6Cxx: Le too small, xx = the exact length available
_SW_VALUES = frozenset(int(sw) for sw in SW)


def wrong_pin_sw(tries_left: int) -> int:
    return WRONG_PIN_BASE | (tries_left & 0x0F)


def is_defined_sw(sw: int) -> bool:
    """True for every status word ``docs/secure-element.md`` defines."""
    return sw in _SW_VALUES or sw & 0xFFF0 == WRONG_PIN_BASE or sw & 0xFF00 == WRONG_LE_BASE


class Tag(IntEnum):
    """Data-object tags of the TLV data fields."""

    VERSION = 0xC0  # applet version, 1 byte
    LIFE_CYCLE = 0xC1  # 1 byte, see applet.LifeCycle
    MAX_DATA = 0xC2  # largest command data field the applet accepts, 2 bytes
    TOKEN_ID = 0xC3  # 16 bytes
    IDENTITY = 0xC4  # UTF-8
    ROLE = 0xC5  # UTF-8
    GENERATIONS = 0xC6  # 4 x uint32 big-endian
    TRIES_LEFT = 0xC7  # 1 byte
    KEYS = 0xC8  # 4 x 32 bytes (PERSONALISE only)
    PIN = 0xC9  # UTF-8 (PERSONALISE only)
    VERIFIED = 0xCA  # 1 byte, 0 or 1


class ApduError(CardError):
    """A malformed command (the applet answers ``sw``) or response (the host refuses it)."""

    def __init__(self, sw: int, message: str) -> None:
        super().__init__(message)
        self.sw = sw


@dataclass(frozen=True, slots=True)
class Command:
    cla: int
    ins: int
    p1: int = 0
    p2: int = 0
    data: bytes = b""
    le: int | None = None  # expected response length; None = no response data expected

    @property
    def chained(self) -> bool:
        """More commands of the same chain follow this one."""
        return bool(self.cla & CLA_CHAINING)

    def encode(self) -> bytes:
        """Short form when it fits, extended form otherwise (ISO 7816-3 12.1.3)."""
        for name, value in (("CLA", self.cla), ("INS", self.ins), ("P1", self.p1), ("P2", self.p2)):
            if not 0 <= value <= 0xFF:
                raise ValueError(f"{name} out of range")
        if len(self.data) > EXTENDED_MAX_DATA:
            raise ValueError(f"command data over {EXTENDED_MAX_DATA} bytes")
        if self.le is not None and not 1 <= self.le <= EXTENDED_MAX_LE:
            raise ValueError("Le out of range")
        head = bytes((self.cla, self.ins, self.p1, self.p2))
        extended = len(self.data) > SHORT_MAX_DATA or (self.le or 0) > SHORT_MAX_LE
        if not extended:
            lc = bytes((len(self.data),)) + self.data if self.data else b""
            le = b"" if self.le is None else bytes((self.le % SHORT_MAX_LE,))
            return head + lc + le
        lc = len(self.data).to_bytes(2, "big") + self.data if self.data else b""
        le = b"" if self.le is None else (self.le % EXTENDED_MAX_LE).to_bytes(2, "big")
        return head + b"\x00" + lc + le


def parse_command(raw: bytes, *, max_data: int) -> Command:
    """Decode one command APDU; ``ApduError(WRONG_LENGTH)`` when its lengths disagree."""
    size = len(raw)
    if size < HEADER_SIZE:
        raise ApduError(SW.WRONG_LENGTH, "command shorter than its header")
    cla, ins, p1, p2 = raw[:HEADER_SIZE]
    body = raw[HEADER_SIZE:]
    data, le = b"", None
    if not body:
        pass  # case 1
    elif len(body) == 1:  # case 2S
        le = body[0] or SHORT_MAX_LE
    elif body[0] != 0:  # cases 3S, 4S
        lc = body[0]
        if len(body) == 1 + lc:
            data = body[1:]
        elif len(body) == 2 + lc:
            data, le = body[1:-1], body[-1] or SHORT_MAX_LE
        else:
            raise ApduError(SW.WRONG_LENGTH, "Lc disagrees with the command length")
    elif len(body) == 3:  # case 2E
        le = int.from_bytes(body[1:], "big") or EXTENDED_MAX_LE
    elif len(body) > 3:  # cases 3E, 4E
        lc = int.from_bytes(body[1:3], "big")
        if lc == 0:
            raise ApduError(SW.WRONG_LENGTH, "extended Lc of zero")
        if len(body) == 3 + lc:
            data = body[3:]
        elif len(body) == 5 + lc:
            data, le = body[3:-2], int.from_bytes(body[-2:], "big") or EXTENDED_MAX_LE
        else:
            raise ApduError(SW.WRONG_LENGTH, "extended Lc disagrees with the command length")
    else:
        raise ApduError(SW.WRONG_LENGTH, "truncated extended length")
    if len(data) > max_data:
        raise ApduError(SW.WRONG_LENGTH, f"command data over {max_data} bytes")
    return Command(cla, ins, p1, p2, bytes(data), le)


@dataclass(frozen=True, slots=True)
class Response:
    data: bytes
    sw: int

    @property
    def ok(self) -> bool:
        return self.sw == SW.OK

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(SW_SIZE, "big")


def parse_response(raw: bytes) -> Response:
    if len(raw) < SW_SIZE or len(raw) > SHORT_MAX_LE + SW_SIZE:
        raise ApduError(SW.NO_DIAGNOSIS, f"card answered {len(raw)} bytes (not a response APDU)")
    return Response(bytes(raw[:-SW_SIZE]), int.from_bytes(raw[-SW_SIZE:], "big"))


def chain(
    cla: int, ins: int, p1: int, p2: int, data: bytes, *, max_data: int, le: int | None
) -> list[Command]:
    """Split ``data`` into commands of at most ``max_data`` bytes, chained by CLA bit 0x10."""
    if max_data < 1:
        raise ValueError("max_data must be positive")
    pieces = [data[i : i + max_data] for i in range(0, len(data), max_data)] or [b""]
    last = len(pieces) - 1
    return [
        Command(
            cla | (CLA_CHAINING if i < last else 0), ins, p1, p2, piece, le if i == last else None
        )
        for i, piece in enumerate(pieces)
    ]


# -- simple TLV ---------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < _LEN_1:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((_LEN_1, n))
    if n <= 0xFFFF:
        return bytes((_LEN_2,)) + n.to_bytes(2, "big")
    raise ValueError("TLV value over 65,535 bytes")


def encode_tlv(items: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes((tag,)) + _length(len(value)) + value for tag, value in items)


def decode_tlv(raw: bytes, *, allowed: frozenset[int]) -> dict[int, bytes]:
    """Decode simple TLV strictly: known tags once each, shortest lengths, nothing trailing.

    Raises ``ApduError(WRONG_DATA)``; the applet answers that status word.
    """
    items: dict[int, bytes] = {}
    i = 0
    while i < len(raw):
        if len(items) >= MAX_TLV_ITEMS:
            raise ApduError(SW.WRONG_DATA, "too many data objects")
        tag = raw[i]
        if tag not in allowed or tag in items:
            raise ApduError(SW.WRONG_DATA, f"unexpected or repeated tag {tag:02X}")
        if i + 1 >= len(raw):
            raise ApduError(SW.WRONG_DATA, "data object without a length")
        first = raw[i + 1]
        if first < _LEN_1:
            length, start = first, i + 2
        elif first in (_LEN_1, _LEN_2):
            width = first - 0x80
            if i + 2 + width > len(raw):
                raise ApduError(SW.WRONG_DATA, "truncated length")
            length = int.from_bytes(raw[i + 2 : i + 2 + width], "big")
            start = i + 2 + width
            if length < (_LEN_1 if width == 1 else 0x100):
                raise ApduError(SW.WRONG_DATA, "length not in its shortest form")
        else:
            raise ApduError(SW.WRONG_DATA, "unsupported length form")
        end = start + length
        if end > len(raw):
            raise ApduError(SW.WRONG_DATA, "data object runs past the data field")
        items[tag] = bytes(raw[start:end])
        i = end
    return items
