"""The host side of a snrmesh card: a :class:`SecureElement` spoken to in APDUs.

:class:`CardToken` turns every interface call into the commands of
``docs/secure-element.md`` and every status word back into the error the
software token raises for the same case. How the bytes reach the card is a
:class:`CardChannel`: PC/SC (:mod:`mesh.token.pcsc`) in the field, or
:class:`LocalChannel` (the applet in this process) in tests and benchmarks.

Sessions. Each operation holds the card for its duration (one PC/SC
transaction). When the channel reports a new card session -- first contact,
a reset by another program, or the card pulled out and put back -- the host
selects the applet, checks it is the same card (token id) and, if a PIN was
verified before, verifies it again: the host keeps the PIN in memory for that,
as a card middleware does, so an agent recovers by itself when its card
returns. It never sends the PIN to a card whose token id differs.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from mesh.keyset.copies import MAX_COPY_SIZE
from mesh.token import ops
from mesh.token.apdu import (
    AID,
    CLA_ISO,
    CLA_PROPRIETARY,
    SHORT_MAX_DATA,
    SHORT_MAX_LE,
    SW,
    WRONG_PIN_BASE,
    ApduError,
    Command,
    Ins,
    Response,
    Tag,
    chain,
    decode_tlv,
    encode_tlv,
    parse_response,
)
from mesh.token.applet import Applet
from mesh.token.cardstate import LifeCycle
from mesh.token.errors import (
    CardError,
    KeyChangeRefused,
    Refusal,
    TokenAbsent,
    TokenError,
    TokenLocked,
    TokenNotReady,
    UnwrapFailed,
    WrongApplet,
    WrongPin,
)
from mesh.token.image import MAX_ROLE_LENGTH, check_pin, is_identity
from mesh.token.interface import (
    KEY_SIZE,
    MAX_PIN_TRIES,
    SLOT_COUNT,
    TOKEN_ID_SIZE,
    SecureElement,
    Slot,
    SlotInfo,
    TokenInfo,
)
from mesh.token.keychange import MAX_KEY_CHANGE_SIZE

__all__ = ["CardChannel", "CardToken", "LocalChannel"]

PIN_REFERENCE = 0x81
GENERATION_SIZE = 4
MAX_GENERATION = 2 ** (8 * GENERATION_SIZE) - 1
TAG_SIZE = 32
_LIFE_WORDS = {
    LifeCycle.BLANK: "blank (not personalised)",
    LifeCycle.OPEN: "personalised but not closed (personalisation unfinished)",
    LifeCycle.CLOSED: "in service",
}


class CardChannel(Protocol):
    """A way to exchange APDUs with one card."""

    @property
    def name(self) -> str:
        """The reader's name, for messages."""

    def transaction(self) -> AbstractContextManager[bool]:
        """Hold the card for one operation; yield True if the card session is new.

        New means the host must select and unlock again: first contact, a reset
        by another program, a card pulled out and put back. Raises
        ``TokenAbsent`` when there is no card.
        """

    def transmit(self, apdu: bytes) -> bytes:
        """Send a command APDU, return the response APDU (inside :meth:`transaction`)."""

    def close(self) -> None: ...


class CardToken(SecureElement):
    """A secure element on a card. Thread-safe: one operation at a time."""

    def __init__(self, channel: CardChannel) -> None:
        self._channel = channel
        self._lock = threading.RLock()
        self._pin: str | None = None  # kept to unlock the card again after a reset
        self._bound: bytes | None = None  # the token id of the card this object serves
        self._life = LifeCycle.BLANK
        self._info: TokenInfo | None = None
        self._max_data = SHORT_MAX_DATA
        self._started = False  # selected and checked in the current card session
        with self._session():
            pass

    @property
    def reader(self) -> str:
        return self._channel.name

    @property
    def life_cycle(self) -> LifeCycle:
        return self._life

    def close(self) -> None:
        self._pin = None
        self._channel.close()

    # -- APDU plumbing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        with self._lock, self._channel.transaction() as fresh:
            if fresh or not self._started:
                self._started = False
                self._start()
                self._started = True
            yield

    def _send(self, command: Command) -> Response:
        return parse_response(self._channel.transmit(command.encode()))

    def _call(self, ins: Ins, data: bytes = b"", *, p1: int = 0, p2: int = 0) -> Response:
        """One command, or a chain of them when ``data`` exceeds what the card takes at once."""
        cla = CLA_ISO if ins in (Ins.SELECT, Ins.VERIFY) else CLA_PROPRIETARY
        response = Response(b"", SW.NO_DIAGNOSIS)
        for command in chain(cla, ins, p1, p2, data, max_data=self._max_data, le=SHORT_MAX_LE):
            response = self._send(command)
            if not response.ok:
                break
        return response

    def _expect(self, ins: Ins, response: Response, size: int | None = None) -> bytes:
        if not response.ok:
            raise self._error(ins, response.sw)
        if size is not None and len(response.data) != size:
            raise CardError(f"card in {self.reader} answered {ins.name} with a malformed result")
        return response.data

    def _error(self, ins: Ins, sw: int) -> TokenError:
        """The error the software token raises for the case the status word reports."""
        meaning = _MEANINGS.get((ins, sw)) or _MEANINGS.get((None, sw))
        if meaning is not None:
            return meaning()
        if ins is Ins.VERIFY and sw & 0xFFF0 == WRONG_PIN_BASE:
            left = sw & 0x0F
            if left == 0:
                return TokenLocked("wrong PIN; the token is now locked")
            return WrongPin(left)
        if sw == SW.CONDITIONS:
            return TokenNotReady(f"the card in {self.reader} is {_LIFE_WORDS[self._life]}")
        if sw == SW.APPLET_NOT_FOUND:
            return WrongApplet(f"the card in {self.reader} is not a snrmesh card (no applet)")
        return CardError(f"card in {self.reader} answered {sw:04X} to {ins.name}")

    def _tlv(self, ins: Ins, data: bytes) -> dict[int, bytes]:
        try:
            return decode_tlv(data, allowed=frozenset(Tag))
        except ApduError:
            raise CardError(f"card in {self.reader} answered {ins.name} with bad data") from None

    # -- session start ----------------------------------------------------------------------

    def _start(self) -> None:
        """Select the applet, read its state, check it is our card, unlock it again."""
        fci = self._tlv(Ins.SELECT, self._expect(Ins.SELECT, self._call(Ins.SELECT, AID, p1=4)))
        announced = fci.get(Tag.MAX_DATA, b"")
        if len(announced) not in (0, 2):  # 2 bytes: a chunk an extended-length APDU can carry
            raise CardError(f"card in {self.reader} answered SELECT with malformed data")
        max_data = int.from_bytes(announced, "big")
        self._max_data = max(1, max_data) if max_data else SHORT_MAX_DATA
        self._refresh()
        if self._pin is not None and self._life is LifeCycle.CLOSED:
            self._verify(self._pin)

    def _refresh(self) -> None:
        status = self._tlv(Ins.GET_STATUS, self._expect(Ins.GET_STATUS, self._call(Ins.GET_STATUS)))
        try:
            self._life = LifeCycle(status.get(Tag.LIFE_CYCLE, b"\x00")[0])
        except (ValueError, IndexError):
            raise CardError(f"card in {self.reader} reports an unknown life cycle") from None
        if self._life is LifeCycle.BLANK:
            if self._bound is not None:
                raise WrongApplet(f"the card in {self.reader} is blank, not the card opened")
            self._info = None
            return
        ident = self._tlv(
            Ins.GET_IDENTITY, self._expect(Ins.GET_IDENTITY, self._call(Ins.GET_IDENTITY))
        )
        try:
            token_id = ident[Tag.TOKEN_ID]
            identity = ident[Tag.IDENTITY].decode()
            role = ident[Tag.ROLE].decode()
            gens = status[Tag.GENERATIONS]
            tries = status[Tag.TRIES_LEFT][0]
        except (KeyError, IndexError, UnicodeDecodeError):
            raise CardError(f"card in {self.reader} answered with incomplete data") from None
        if (
            len(token_id) != TOKEN_ID_SIZE
            or len(gens) != SLOT_COUNT * GENERATION_SIZE
            or not is_identity(identity)
            or not 0 < len(role) <= MAX_ROLE_LENGTH
            or not role.isprintable()  # held as a token file's header is (image.py)
        ):
            raise CardError(f"card in {self.reader} answered with malformed data")
        if self._bound is not None and not hmac.compare_digest(token_id, self._bound):
            raise WrongApplet(f"another card is in {self.reader} ({identity}, not the card opened)")
        self._bound = token_id
        generations = [
            int.from_bytes(gens[i : i + GENERATION_SIZE], "big")
            for i in range(0, len(gens), GENERATION_SIZE)
        ]
        self._info = TokenInfo(
            token_id=token_id,
            identity=identity,
            role=role,
            slots=tuple(SlotInfo(Slot(i), g) for i, g in enumerate(generations)),
            pin_tries_left=min(tries, MAX_PIN_TRIES),
        )

    def _verify(self, pin: str) -> None:
        response = self._call(Ins.VERIFY, pin.encode(), p2=PIN_REFERENCE)
        if response.ok:
            self._pin = pin
        else:
            self._pin = None
        self._refresh()
        self._expect(Ins.VERIFY, response)

    # -- personalisation (desk only) ---------------------------------------------------------

    def personalise(
        self,
        *,
        pin: str,
        token_id: bytes,
        identity: str,
        role: str,
        keys: Sequence[bytes],
        generations: Sequence[int],
    ) -> None:
        """Write identity, keys and PIN to a blank (or unfinished) card, then close it for good.

        A card already closed is refused, like an existing token file. If
        anything fails before CLOSE the card stays open and can be personalised
        again; once closed, only a key change can alter its keys.
        """
        check_pin(pin)
        if len(keys) != SLOT_COUNT or any(len(k) != KEY_SIZE for k in keys):
            raise TokenError(f"a token needs {SLOT_COUNT} keys of {KEY_SIZE} bytes")
        gens = list(generations)
        if len(gens) != SLOT_COUNT or not all(1 <= g <= MAX_GENERATION for g in gens):
            raise TokenError(f"a card holds {SLOT_COUNT} generations in [1, {MAX_GENERATION}]")
        data = encode_tlv(
            [
                (Tag.TOKEN_ID, token_id),
                (Tag.IDENTITY, identity.encode()),
                (Tag.ROLE, role.encode()),
                (
                    Tag.GENERATIONS,
                    b"".join(g.to_bytes(GENERATION_SIZE, "big") for g in generations),
                ),
                (Tag.KEYS, b"".join(keys)),
                (Tag.PIN, pin.encode()),
            ]
        )
        with self._session():
            if self._life is LifeCycle.CLOSED:
                owner = self._info.identity if self._info is not None else "?"
                raise TokenError(
                    f"the card in {self.reader} is already personalised (for {owner}) and "
                    "closed; refusing to overwrite"
                )
            self._expect(Ins.PERSONALISE, self._call(Ins.PERSONALISE, data))
            self._bound = None
            self._refresh()
            self._expect(Ins.CLOSE, self._call(Ins.CLOSE))
            self._refresh()

    # -- SecureElement ----------------------------------------------------------------------

    def info(self) -> TokenInfo:
        if self._info is None:
            raise TokenNotReady(f"the card in {self.reader} is blank (not personalised)")
        return self._info

    def check_present(self) -> None:
        with self._session():
            self._expect(Ins.GET_STATUS, self._call(Ins.GET_STATUS))

    def verify_pin(self, pin: str) -> None:
        check_pin(pin)
        with self._session():
            self._verify(pin)

    def unwrap(self, copy: str) -> bytes:
        if not isinstance(copy, str) or len(copy) > MAX_COPY_SIZE or not copy.isascii():
            raise UnwrapFailed("not a wrapped key: wrapped key too large or not text")
        with self._session():
            response = self._call(Ins.UNWRAP, copy.encode(), p1=Slot.WRAP)
            return self._expect(Ins.UNWRAP, response, KEY_SIZE)

    def mac(self, slot: Slot, data: bytes) -> bytes:
        ops.check_mac_slot(slot)
        with self._session():
            return self._expect(Ins.MAC, self._call(Ins.MAC, data, p1=slot), TAG_SIZE)

    def verify_mac(self, slot: Slot, data: bytes, tag: bytes) -> bool:
        ops.check_mac_slot(slot)
        if len(tag) != TAG_SIZE:
            self.mac(slot, data)  # the same refusals as a software token, then "no match"
            return False
        with self._session():
            response = self._call(Ins.VERIFY_MAC, tag + data, p1=slot)
            if response.sw == SW.VERIFICATION_FAILED:
                return False
            self._expect(Ins.VERIFY_MAC, response)
            return True

    def derive(self, slot: Slot, context: bytes) -> bytes:
        ops.check_derive(slot, context)
        with self._session():
            return self._expect(Ins.DERIVE, self._call(Ins.DERIVE, context, p1=slot), KEY_SIZE)

    def key_change(self, message: str) -> None:
        if not isinstance(message, str) or len(message) > MAX_KEY_CHANGE_SIZE:
            raise KeyChangeRefused("key-change message too large or not text")
        if not message.isascii():
            raise KeyChangeRefused("key-change message is not a JWE compact serialization")
        with self._session():
            response = self._call(Ins.KEY_CHANGE, message.encode())
            self._refresh()
            self._expect(Ins.KEY_CHANGE, response)


def _meaning(
    kind: Callable[..., TokenError], message: str, **kwargs: Refusal
) -> Callable[[], TokenError]:
    return lambda: kind(message, **kwargs)


_MEANINGS: dict[tuple[Ins | None, int], Callable[[], TokenError]] = {
    (None, SW.SECURITY_STATUS): _meaning(TokenNotReady, "verify the PIN first"),
    (None, SW.MEMORY_FAILURE): _meaning(
        TokenError, "the card could not store its new state (memory failure); nothing changed"
    ),
    (Ins.VERIFY, SW.PIN_BLOCKED): _meaning(
        TokenLocked, "token is locked after too many wrong PINs"
    ),
    (Ins.UNWRAP, SW.WRONG_DATA): _meaning(
        UnwrapFailed, "not a wrapped key (refused by the card)", refusal=Refusal.MALFORMED
    ),
    (Ins.UNWRAP, SW.WRONG_KEY): _meaning(
        UnwrapFailed, "wrapped for another token or key generation", refusal=Refusal.WRONG_KEY
    ),
    (Ins.UNWRAP, SW.VERIFICATION_FAILED): _meaning(
        UnwrapFailed, "wrapped key failed authentication", refusal=Refusal.FAILED_AUTH
    ),
    (Ins.KEY_CHANGE, SW.WRONG_DATA): _meaning(
        KeyChangeRefused, "key-change message is malformed (refused by the card)"
    ),
    (Ins.KEY_CHANGE, SW.WRONG_KEY): _meaning(
        KeyChangeRefused,
        "key change is for another token or key generation",
        refusal=Refusal.WRONG_KEY,
    ),
    (Ins.KEY_CHANGE, SW.VERIFICATION_FAILED): _meaning(
        KeyChangeRefused, "key-change message failed authentication", refusal=Refusal.FAILED_AUTH
    ),
    (Ins.KEY_CHANGE, SW.NOT_NEWER): _meaning(
        KeyChangeRefused,
        "key change is not newer than the keys held (replay?)",
        refusal=Refusal.NOT_NEWER,
    ),
    (Ins.PERSONALISE, SW.WRONG_DATA): _meaning(
        TokenError, "the card refused the personalisation data"
    ),
}


class LocalChannel:
    """An applet in this process, behind the same interface as a reader (tests, benchmarks).

    :meth:`remove` and :meth:`insert` play the card leaving and returning: the
    applet loses its session (as a card loses power) and the host sees a new
    card session on its next operation.
    """

    def __init__(self, applet: Applet, name: str = "local applet") -> None:
        self.applet = applet
        self._name = name
        self._present = True
        self._fresh = True

    @property
    def name(self) -> str:
        return self._name

    def remove(self) -> None:
        self._present = False
        self.applet.reset()

    def insert(self) -> None:
        self._present = True
        self._fresh = True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[bool]:
        if not self._present:
            raise TokenAbsent(f"no card in {self._name}")
        fresh, self._fresh = self._fresh, False
        if fresh:
            self.applet.reset()
        yield fresh

    def transmit(self, apdu: bytes) -> bytes:
        if not self._present:
            self._fresh = True
            raise TokenAbsent(f"the card was removed from {self._name}")
        return self.applet.process(apdu)

    def close(self) -> None:
        self._present = False
