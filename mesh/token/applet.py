"""The snrmesh card applet, sans-IO: a command APDU in, a response APDU out.

The applet is what runs *inside* the card: it holds the slot keys and never
lets one out. This implementation runs in the virtual card (``snrmesh card
emulate``) and in tests; ``docs/secure-element.md`` specifies it for a real
card. It reads no file and opens no socket: the caller hands it the stored
:class:`CardState` and a ``persist`` callback, and drives power and reset.

Rules
* Life cycle (persistent), transitions in :data:`LIFE_TRANSITIONS`:
  ``BLANK -PERSONALISE-> OPEN -CLOSE-> CLOSED``; ``OPEN`` may be personalised
  again (a desk retry), ``CLOSED`` never. :data:`ALLOWED` says which command
  runs in which state; anything else answers ``6985``.
* Session (RAM only; cleared by power off, reset, SELECT and a failed VERIFY):
  selected or not, PIN verified or not, an open command chain or not.
* Every change of the persistent state is handed to ``persist`` *before* the
  response is built: a key change is in force only once stored. If ``persist``
  fails the applet answers ``6581`` and its state is as before (atomic).
* VERIFY counts the try *before* it checks the PIN and, for the right one,
  stores the full counter again: right and wrong PINs write alike, so a write
  that fails (or is torn) tells nothing about the PIN.
* Any input yields a response with a status word from ``docs/secure-element.md``;
  the applet never raises on bad input (tested with hypothesis).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mesh.crypto import Sealer
from mesh.keyset.errors import KeysetError
from mesh.keyset.keyset import check_identity
from mesh.token import ops
from mesh.token.apdu import (
    AID,
    CLA_CHAINING,
    CLA_ISO,
    CLA_PROPRIETARY,
    ISO_INSTRUCTIONS,
    SHORT_MAX_LE,
    SW,
    WRONG_LE_BASE,
    ApduError,
    Command,
    Ins,
    Response,
    Tag,
    decode_tlv,
    encode_tlv,
    parse_command,
    wrong_pin_sw,
)
from mesh.token.cardstate import CardState, LifeCycle
from mesh.token.errors import KeyChangeRefused, Refusal, TokenError, UnwrapFailed
from mesh.token.image import MAX_ROLE_LENGTH, TokenImage
from mesh.token.interface import (
    KEY_SIZE,
    MAX_DERIVE_CONTEXT,
    MAX_PIN_LENGTH,
    SLOT_COUNT,
    TOKEN_ID_SIZE,
    Slot,
)

__all__ = [
    "ALLOWED",
    "APPLET_VERSION",
    "ATR",
    "LIFE_TRANSITIONS",
    "MAX_BUFFERED_INPUT",
    "MAX_COMMAND_DATA",
    "MAX_STREAMED_INPUT",
    "Applet",
]

APPLET_VERSION = 1
MAX_COMMAND_DATA = 4096  # largest data field of one command (announced at SELECT)
MAX_BUFFERED_INPUT = 4096  # largest chained input the applet holds (a key change)
MAX_STREAMED_INPUT = 64 * 1024 * 1024  # largest input of MAC / VERIFY MAC (a bundle)
TAG_SIZE = 32
GENERATION_SIZE = 4
MAX_GENERATION = 2 ** (8 * GENERATION_SIZE) - 1
MAX_PIN_BYTES = 4 * MAX_PIN_LENGTH  # UTF-8


def _atr(historical: bytes) -> bytes:
    """ISO 7816-3 ATR: direct convention, T=0 and T=1 offered, historical bytes, TCK."""
    body = bytes((0x80 | len(historical), 0x80, 0x01)) + historical
    tck = 0
    for byte in body:
        tck ^= byte
    return b"\x3b" + body + bytes((tck,))


ATR = _atr(b"snrmesh")

_ALL = frozenset(LifeCycle)
_PERSONALISED = frozenset({LifeCycle.OPEN, LifeCycle.CLOSED})
_IN_SERVICE = frozenset({LifeCycle.CLOSED})

ALLOWED: dict[Ins, frozenset[LifeCycle]] = {
    Ins.SELECT: _ALL,
    Ins.GET_STATUS: _ALL,
    Ins.GET_IDENTITY: _PERSONALISED,
    Ins.PERSONALISE: frozenset({LifeCycle.BLANK, LifeCycle.OPEN}),
    Ins.CLOSE: _PERSONALISED,
    Ins.VERIFY: _IN_SERVICE,
    Ins.UNWRAP: _IN_SERVICE,
    Ins.MAC: _IN_SERVICE,
    Ins.VERIFY_MAC: _IN_SERVICE,
    Ins.DERIVE: _IN_SERVICE,
    Ins.KEY_CHANGE: _IN_SERVICE,
}

LIFE_TRANSITIONS: dict[tuple[LifeCycle, Ins], LifeCycle] = {
    (LifeCycle.BLANK, Ins.PERSONALISE): LifeCycle.OPEN,
    (LifeCycle.OPEN, Ins.PERSONALISE): LifeCycle.OPEN,
    (LifeCycle.OPEN, Ins.CLOSE): LifeCycle.CLOSED,
    (LifeCycle.CLOSED, Ins.CLOSE): LifeCycle.CLOSED,
}

PIN_PROTECTED = frozenset({Ins.UNWRAP, Ins.MAC, Ins.VERIFY_MAC, Ins.DERIVE, Ins.KEY_CHANGE})
CHAINABLE = PIN_PROTECTED | {Ins.PERSONALISE}
STREAMED = frozenset({Ins.MAC, Ins.VERIFY_MAC})

# Valid (P1, P2) per instruction; P1 names the slot where there is one.
PARAMETERS: dict[Ins, frozenset[tuple[int, int]]] = {
    Ins.SELECT: frozenset({(0x04, 0x00)}),
    Ins.VERIFY: frozenset({(0x00, 0x81)}),
    Ins.UNWRAP: frozenset({(Slot.WRAP, 0)}),
    Ins.MAC: frozenset({(Slot.MAC, 0), (Slot.AUTH, 0)}),
    Ins.VERIFY_MAC: frozenset({(Slot.MAC, 0), (Slot.AUTH, 0)}),
    Ins.DERIVE: frozenset({(Slot.AUTH, 0)}),
}
_NO_PARAMETERS = frozenset({(0, 0)})

_REFUSAL_SW = {
    Refusal.MALFORMED: SW.WRONG_DATA,
    Refusal.WRONG_KEY: SW.WRONG_KEY,
    Refusal.FAILED_AUTH: SW.VERIFICATION_FAILED,
    Refusal.NOT_NEWER: SW.NOT_NEWER,
}
_PERSONALISE_TAGS = frozenset(
    {Tag.TOKEN_ID, Tag.IDENTITY, Tag.ROLE, Tag.GENERATIONS, Tag.KEYS, Tag.PIN}
)


@dataclass(slots=True, repr=False)  # a PERSONALISE buffer holds keys and PIN in the clear
class _Chain:
    """An open command chain: what it is for and what has arrived so far."""

    ins: Ins
    p1: int
    p2: int
    received: int = 0
    buffer: bytearray = field(default_factory=bytearray)
    mac: hmac.HMAC | None = None  # MAC and VERIFY MAC: the running HMAC (nothing buffered)
    tag: bytearray = field(default_factory=bytearray)  # VERIFY MAC: the tag to check


@dataclass(slots=True, repr=False)  # holds the slot keys once the PIN is verified
class _Session:
    selected: bool = False
    keys: tuple[bytes, ...] | None = None
    sealer: Sealer | None = None
    chain: _Chain | None = None


def _ok(data: bytes = b"") -> Response:
    return Response(data, SW.OK)


def _refuse(sw: int) -> Response:
    return Response(b"", sw)


class Applet:
    """One card's applet. Call :meth:`reset` on power-up and reset, :meth:`process` per APDU."""

    def __init__(self, state: CardState, *, persist: Callable[[bytes], None]) -> None:
        self._state = state
        self._persist = persist
        self._session = _Session()

    @property
    def state(self) -> CardState:
        return self._state

    @property
    def atr(self) -> bytes:
        return ATR

    def reset(self) -> None:
        """Power off, power on or reset: the session (PIN, selection, chain) is gone."""
        self._session = _Session()

    # -- dispatch ---------------------------------------------------------------------------

    def process(self, raw: bytes) -> bytes:
        try:
            response = self._process(raw)
        except ApduError as exc:
            response = _refuse(exc.sw)
        return response.encode()

    def _process(self, raw: bytes) -> Response:
        command = parse_command(raw, max_data=MAX_COMMAND_DATA)
        try:
            ins = Ins(command.ins)
        except ValueError:
            self._session.chain = None
            return _refuse(SW.INS_UNSUPPORTED)
        expected_cla = CLA_ISO if ins in ISO_INSTRUCTIONS else CLA_PROPRIETARY
        if command.cla & ~CLA_CHAINING != expected_cla:
            self._session.chain = None
            return _refuse(SW.CLA_UNSUPPORTED)
        chain = self._session.chain
        if chain is not None and (ins, command.p1, command.p2) != (chain.ins, chain.p1, chain.p2):
            self._session.chain = None
            return _refuse(SW.LAST_COMMAND_EXPECTED)
        if command.chained and ins not in CHAINABLE:
            return _refuse(SW.CHAINING_UNSUPPORTED)
        if ins is not Ins.SELECT and not self._session.selected:
            return _refuse(SW.CONDITIONS)
        if self._state.life not in ALLOWED[ins]:
            self._session.chain = None
            return _refuse(SW.CONDITIONS)
        if (command.p1, command.p2) not in PARAMETERS.get(ins, _NO_PARAMETERS):
            self._session.chain = None
            return _refuse(SW.WRONG_P1P2)
        if ins in PIN_PROTECTED and self._session.keys is None:
            self._session.chain = None
            return _refuse(SW.SECURITY_STATUS)
        if ins in CHAINABLE:
            response = self._chained(ins, command)
        else:
            response = self._execute(ins, command, command.data)
        if command.le is not None and len(response.data) > command.le:
            return _refuse(WRONG_LE_BASE | (len(response.data) % SHORT_MAX_LE))
        return response

    def _chained(self, ins: Ins, command: Command) -> Response:
        """Collect a chained input (or stream it into the HMAC); run the command on the last."""
        chain = self._session.chain
        if chain is None:
            chain = _Chain(ins, command.p1, command.p2)
            if ins in STREAMED:
                chain.mac = hmac.new(self._slot_key(command.p1), digestmod="sha256")
            self._session.chain = chain
        chain.received += len(command.data)
        limit = MAX_STREAMED_INPUT + TAG_SIZE if ins in STREAMED else MAX_BUFFERED_INPUT
        if chain.received > limit:
            self._session.chain = None
            return _refuse(SW.NO_MEMORY)
        data = command.data
        if ins is Ins.VERIFY_MAC and len(chain.tag) < TAG_SIZE:
            take = TAG_SIZE - len(chain.tag)
            chain.tag += data[:take]
            data = data[take:]
        if chain.mac is not None:
            chain.mac.update(data)
        else:
            chain.buffer += data
        if command.chained:
            return _ok()
        self._session.chain = None
        return self._execute(ins, command, bytes(chain.buffer), chain)

    def _execute(
        self, ins: Ins, command: Command, data: bytes, chain: _Chain | None = None
    ) -> Response:
        if ins is Ins.SELECT:
            return self._select(data)
        if ins is Ins.GET_STATUS:
            return self._status()
        if ins is Ins.GET_IDENTITY:
            return self._identity()
        if ins is Ins.VERIFY:
            return self._verify(data)
        if ins is Ins.PERSONALISE:
            return self._personalise(data)
        if ins is Ins.CLOSE:
            return self._close()
        if ins is Ins.UNWRAP:
            return self._unwrap(data)
        if ins is Ins.DERIVE:
            return self._derive(data)
        if ins is Ins.KEY_CHANGE:
            return self._key_change(data)
        assert chain is not None and chain.mac is not None  # MAC, VERIFY MAC: always chained
        if ins is Ins.MAC:
            return _ok(chain.mac.digest())
        if len(chain.tag) < TAG_SIZE:
            return _refuse(SW.WRONG_LENGTH)
        verified = hmac.compare_digest(chain.mac.digest(), bytes(chain.tag))
        return _ok() if verified else _refuse(SW.VERIFICATION_FAILED)

    # -- helpers ----------------------------------------------------------------------------

    def _image(self) -> TokenImage:
        image = self._state.image
        assert image is not None  # ALLOWED admits no key or identity command on a blank card
        return image

    def _slot_key(self, slot: int) -> bytes:
        keys = self._session.keys
        assert keys is not None  # PIN_PROTECTED checked before
        return keys[slot]

    def _store(self, state: CardState) -> bool:
        """Persist ``state`` and adopt it; False (state unchanged) if it could not be stored."""
        try:
            self._persist(state.encode())
        except OSError:
            return False
        self._state = state
        return True

    # -- commands ---------------------------------------------------------------------------

    def _select(self, aid: bytes) -> Response:
        self.reset()
        if not hmac.compare_digest(aid, AID):
            return _refuse(SW.APPLET_NOT_FOUND)
        self._session.selected = True
        return _ok(
            encode_tlv(
                [
                    (Tag.VERSION, bytes((APPLET_VERSION,))),
                    (Tag.LIFE_CYCLE, bytes((self._state.life,))),
                    (Tag.MAX_DATA, MAX_COMMAND_DATA.to_bytes(2, "big")),
                ]
            )
        )

    def _status(self) -> Response:
        items = [(Tag.LIFE_CYCLE, bytes((self._state.life,)))]
        image = self._state.image
        if image is not None:
            generations = b"".join(g.to_bytes(GENERATION_SIZE, "big") for g in image.generations)
            items += [
                (Tag.GENERATIONS, generations),
                (Tag.TRIES_LEFT, bytes((image.tries_left,))),
                (Tag.VERIFIED, bytes((self._session.keys is not None,))),
            ]
        return _ok(encode_tlv(items))

    def _identity(self) -> Response:
        image = self._image()
        return _ok(
            encode_tlv(
                [
                    (Tag.TOKEN_ID, image.token_id),
                    (Tag.IDENTITY, image.identity.encode()),
                    (Tag.ROLE, image.role.encode()),
                ]
            )
        )

    def _verify(self, data: bytes) -> Response:
        image = self._image()
        if not data:  # the ISO status query: verified already, or how many tries are left
            if self._session.keys is not None:
                return _ok()
            if image.tries_left <= 0:
                return _refuse(SW.PIN_BLOCKED)
            return _refuse(wrong_pin_sw(image.tries_left))
        self._session.keys = self._session.sealer = None
        try:
            pin = data.decode("utf-8")
        except UnicodeDecodeError:
            return _refuse(SW.WRONG_DATA)
        if image.tries_left <= 0:
            return _refuse(SW.PIN_BLOCKED)
        # The try is counted before the PIN is checked, right or wrong: a write made only for a
        # wrong PIN would tell the two apart to whoever makes it fail (power torn, memory full).
        counted = replace(image, tries_left=image.tries_left - 1)
        if not self._store(replace(self._state, image=counted)):
            return _refuse(SW.MEMORY_FAILURE)  # no try counted, and no PIN checked
        try:
            check = image.try_pin(pin)
        except TokenError:  # keys that open but are malformed: the stored state is damaged
            return _refuse(SW.NO_DIAGNOSIS)
        if check.keys is None:
            return _refuse(wrong_pin_sw(counted.tries_left))
        if not self._store(replace(self._state, image=check.image)):
            return _refuse(SW.MEMORY_FAILURE)  # right, but the counter stays one try down
        self._session.keys, self._session.sealer = check.keys, check.sealer
        return _ok()

    def _personalise(self, data: bytes) -> Response:
        fields = decode_tlv(data, allowed=_PERSONALISE_TAGS)
        if set(fields) != _PERSONALISE_TAGS:
            return _refuse(SW.WRONG_DATA)
        token_id, gens, keys = fields[Tag.TOKEN_ID], fields[Tag.GENERATIONS], fields[Tag.KEYS]
        if (
            len(token_id) != TOKEN_ID_SIZE
            or len(gens) != SLOT_COUNT * GENERATION_SIZE
            or len(keys) != SLOT_COUNT * KEY_SIZE
            or len(fields[Tag.PIN]) > MAX_PIN_BYTES
        ):
            return _refuse(SW.WRONG_DATA)
        generations = [
            int.from_bytes(gens[i : i + GENERATION_SIZE], "big")
            for i in range(0, len(gens), GENERATION_SIZE)
        ]
        try:
            identity = check_identity(fields[Tag.IDENTITY].decode("utf-8"))
            role = fields[Tag.ROLE].decode("utf-8")
            pin = fields[Tag.PIN].decode("utf-8")
            if (
                not role
                or len(role) > MAX_ROLE_LENGTH
                or not role.isprintable()  # as the token file's loader holds it (image.py)
                or min(generations) < 1
            ):
                return _refuse(SW.WRONG_DATA)
            image = TokenImage.create(
                pin=pin,
                token_id=token_id,
                identity=identity,
                role=role,
                keys=[keys[i : i + KEY_SIZE] for i in range(0, len(keys), KEY_SIZE)],
                generations=generations,
            )
        except (UnicodeDecodeError, KeysetError, TokenError):
            return _refuse(SW.WRONG_DATA)
        life = LIFE_TRANSITIONS[(self._state.life, Ins.PERSONALISE)]
        self._session.keys = self._session.sealer = None
        if not self._store(CardState(life, image)):
            return _refuse(SW.MEMORY_FAILURE)
        return _ok()

    def _close(self) -> Response:
        life = LIFE_TRANSITIONS[(self._state.life, Ins.CLOSE)]
        if life is not self._state.life and not self._store(replace(self._state, life=life)):
            return _refuse(SW.MEMORY_FAILURE)
        return _ok()

    def _unwrap(self, data: bytes) -> Response:
        try:
            copy = data.decode("ascii")
        except UnicodeDecodeError:
            return _refuse(SW.WRONG_DATA)
        try:
            key = ops.unwrap(copy, key=self._slot_key(Slot.WRAP), kid=self._image().kid(Slot.WRAP))
        except UnwrapFailed as exc:
            return _refuse(_REFUSAL_SW[exc.refusal])
        return _ok(key)

    def _derive(self, context: bytes) -> Response:
        if len(context) > MAX_DERIVE_CONTEXT:
            return _refuse(SW.WRONG_LENGTH)
        return _ok(ops.derive_key(Slot.AUTH, context, key=self._slot_key(Slot.AUTH)))

    def _key_change(self, data: bytes) -> Response:
        image = self._image()
        sealer = self._session.sealer
        assert sealer is not None  # set together with the keys
        try:
            change = ops.accept_key_change(
                data.decode("ascii"),
                current_key=self._slot_key(Slot.KEY_CHANGE),
                kid=image.kid(Slot.KEY_CHANGE),
                token_id=image.token_id,
                generations=image.generations,
            )
        except UnicodeDecodeError:
            return _refuse(SW.WRONG_DATA)
        except KeyChangeRefused as exc:
            return _refuse(_REFUSAL_SW[exc.refusal])
        if max(change.generations) > MAX_GENERATION:
            return _refuse(SW.WRONG_DATA)
        new_image = image.resealed(sealer, change.generations, change.keys)
        if not self._store(replace(self._state, image=new_image)):
            return _refuse(SW.MEMORY_FAILURE)
        self._session.keys = change.keys
        return _ok()
