"""Two known tokens (alpha-1, gs-1), one CK between them, its copies and alpha-1's bundle.

Session-scoped: the tokens are personalised and unlocked once (two scrypts
each); nothing here is modified by the tests, which only read and open.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.keyset import CK_ID_SIZE, MISSION_ID_SIZE, PAIR_KEY_SIZE, CommunicationKeyset, wrap_copy
from mesh.keyset.bundle import Bundle, BundleKeyset, Mate, seal_bundle
from mesh.keyset.mission import Mission
from mesh.token import Slot
from mesh.token.software import SoftwareToken
from tests.token.tokens import KnownToken, make_token, oct_jwk


@dataclass(frozen=True, repr=False)
class Party:
    known: KnownToken
    token: SoftwareToken  # PIN verified


@dataclass(frozen=True, repr=False)
class Fixture:
    alpha: Party
    gs: Party
    mission: Mission
    ck: CommunicationKeyset
    alpha_copy: str
    gs_copy: str
    bundle: Bundle
    bundle_raw: bytes  # alpha-1's bundle, sealed under alpha-1's MAC slot key


def _party(path: Path, identity: str, role: str) -> Party:
    known = make_token(path, identity=identity, role=role)
    return Party(known, known.open())


def copy_for(party: Party, ck: CommunicationKeyset) -> str:
    return wrap_copy(
        ck,
        holder=party.known.identity,
        kid=party.known.kid(Slot.WRAP),
        wrap_key=oct_jwk(party.known.key(Slot.WRAP)),
    )


def seal_for(party: Party, bundle: Bundle) -> bytes:
    return seal_bundle(bundle, kid=party.known.kid(Slot.MAC), mac_key=party.known.key(Slot.MAC))


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    root = tmp_path_factory.mktemp("keyset")
    alpha = _party(root / "alpha-1.token", "alpha-1", "soldier")
    gs = _party(root / "gs-1.token", "gs-1", "ground-station")
    now = int(time.time())
    mission = Mission(os.urandom(MISSION_ID_SIZE), "op-dawn", now, now + 4 * 3600, 3600)
    ck = CommunicationKeyset(
        ck_id=os.urandom(CK_ID_SIZE),
        pair_key=os.urandom(PAIR_KEY_SIZE),
        mission_id=mission.mission_id,
        party_a="alpha-1",
        party_b="gs-1",
        not_before=now,
        not_after=now + 3600,
    )
    alpha_copy, gs_copy = copy_for(alpha, ck), copy_for(gs, ck)
    bundle = Bundle(
        mission=mission,
        identity="alpha-1",
        role="soldier",
        token_id=alpha.known.token_id,
        issued_at=now,
        mates=(Mate("gs-1", "ground-station"),),
        groups={"squad": ("alpha-1", "gs-1")},
        revoked=frozenset({"uav-9"}),
        keysets=(BundleKeyset(ck.ck_id, "gs-1", now, now + 3600, own=alpha_copy, ticket=gs_copy),),
    )
    return Fixture(alpha, gs, mission, ck, alpha_copy, gs_copy, bundle, seal_for(alpha, bundle))
