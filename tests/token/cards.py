"""Cards with keys the test knows: the applet in this process, behind a :class:`LocalChannel`.

One personalisation (one scrypt) per session: ``KnownCard.state`` is the card's
stored state right after the desk closed it; every test gets a fresh applet
from those bytes, a recording ``persist`` callback and a host
:class:`CardToken`, so it may lock, key-change or pull the card at will.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mesh.token import KEY_SIZE, SLOT_COUNT, TOKEN_ID_SIZE, Slot, slot_kid
from mesh.token.applet import Applet
from mesh.token.card import CardToken, LocalChannel
from mesh.token.cardstate import CardState
from tests.token.tokens import PIN

__all__ = ["CardRig", "KnownCard", "make_card"]


@dataclass(frozen=True)
class KnownCard:
    state: bytes
    token_id: bytes
    identity: str
    keys: tuple[bytes, ...]
    generation: int

    def key(self, slot: Slot) -> bytes:
        return self.keys[int(slot)]

    def kid(self, slot: Slot) -> str:
        return slot_kid(self.token_id, slot, self.generation)

    def rig(self) -> CardRig:
        return CardRig.load(self.state)


@dataclass
class CardRig:
    """An applet, what it has persisted, the channel it sits behind and a host token."""

    applet: Applet
    channel: LocalChannel
    token: CardToken
    stored: list[bytes] = field(default_factory=list)
    fail_writes: bool = False

    @classmethod
    def load(cls, state: bytes | None = None) -> CardRig:
        stored: list[bytes] = []
        rig_ref: list[CardRig] = []

        def persist(data: bytes) -> None:
            if rig_ref and rig_ref[0].fail_writes:
                raise OSError(28, "No space left on device")
            stored.append(data)

        applet = Applet(CardState() if state is None else CardState.decode(state), persist=persist)
        channel = LocalChannel(applet)
        rig = cls(applet, channel, CardToken(channel), stored)
        rig_ref.append(rig)
        return rig

    def unlocked(self, pin: str = PIN) -> CardToken:
        self.token.verify_pin(pin)
        return self.token

    def state(self) -> bytes:
        return self.applet.state.encode()


def make_card(*, identity: str = "alpha-1", pin: str = PIN) -> KnownCard:
    keys = tuple(os.urandom(KEY_SIZE) for _ in range(SLOT_COUNT))
    token_id = os.urandom(TOKEN_ID_SIZE)
    rig = CardRig.load()
    rig.token.personalise(
        pin=pin,
        token_id=token_id,
        identity=identity,
        role="soldier",
        keys=keys,
        generations=[1] * SLOT_COUNT,
    )
    return KnownCard(rig.state(), token_id, identity, keys, 1)
