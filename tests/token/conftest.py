from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.token.cards import CardRig, KnownCard, make_card
from tests.token.tokens import KnownToken, make_token


@pytest.fixture(scope="session")
def token_template(tmp_path_factory: pytest.TempPathFactory) -> KnownToken:
    """One personalised token file (one scrypt for the whole session); copy it, don't edit it."""
    return make_token(tmp_path_factory.mktemp("token-template") / "alpha-1.token")


@pytest.fixture
def known_token(token_template: KnownToken, tmp_path: Path) -> KnownToken:
    """A private copy of the template token, free to lock, corrupt or key-change."""
    path = tmp_path / "alpha-1.token"
    shutil.copy2(token_template.path, path)
    return replace(token_template, path=path)


@pytest.fixture(scope="session")
def card_template() -> KnownCard:
    """One personalised, closed card state (one scrypt for the whole session)."""
    return make_card()


@pytest.fixture
def card(card_template: KnownCard) -> CardRig:
    """A fresh applet from the template state, behind a local channel, with a host token."""
    return card_template.rig()
