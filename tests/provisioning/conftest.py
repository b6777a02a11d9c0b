"""A provisioned 4-node mission, built once per session and copied per test.

``site_template``: desk ``op-dawn`` (24 h from a minute ago, 6 h epochs, so 4
epochs), nodes gs-1 (ground-station), alpha-1, alpha-2 (soldiers) and uav-1
(uav), each with a token file; group ``squad`` = gs-1, alpha-1, alpha-2; pair
gs-1/uav-1; CKs issued; one bundle per node. ``site`` is a private copy.

Also the command-line runner (a real ``python -m mesh.cli`` process with the
secrets in its environment and no terminal) and the checks every refusal must
pass: one line on stderr, exit 1, no traceback, no file changed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from jwcrypto.common import base64url_encode

from mesh.keyset import decrypt_copy
from mesh.token import Slot
from mesh.token.software import SoftwareToken
from provisioning.desk import Desk
from tests.token.tokens import oct_jwk

PASSPHRASE = "correct horse battery"
PIN = "1357"
NODES = {"gs-1": "ground-station", "alpha-1": "soldier", "alpha-2": "soldier", "uav-1": "uav"}
SQUAD = ("alpha-1", "alpha-2", "gs-1")
EPOCHS = 4
HOUR = 3600


@dataclass(frozen=True)
class Site:
    root: Path

    @property
    def desk_dir(self) -> Path:
        return self.root / "desk"

    def token(self, node: str) -> Path:
        return self.root / f"{node}.token"

    def bundle(self, node: str) -> Path:
        return self.root / f"{node}.bundle"

    def open(self) -> Desk:
        return Desk.open(self.desk_dir, passphrase=PASSPHRASE)

    def unlock(self, node: str) -> SoftwareToken:
        token = SoftwareToken(self.token(node))
        token.verify_pin(PIN)
        return token


@pytest.fixture(scope="session")
def site_template(tmp_path_factory: pytest.TempPathFactory) -> Site:
    site = Site(tmp_path_factory.mktemp("site-template"))
    now = int(time.time())
    start = now - 60
    with Desk.init(
        site.desk_dir,
        passphrase=PASSPHRASE,
        name="op-dawn",
        start=start,
        end=start + EPOCHS * 6 * HOUR,
        epoch_seconds=6 * HOUR,
        now=now,
    ) as desk:
        for node, role in NODES.items():
            desk.enrol(node, role, token_path=site.token(node), pin=PIN, now=now)
        desk.group("squad", list(SQUAD), now=now)
        desk.pair("gs-1", "uav-1", now=now)
        desk.issue(now=now)
        for node in NODES:
            desk.export(node, site.bundle(node), now=now)
    return site


@pytest.fixture
def site(site_template: Site, tmp_path: Path) -> Site:
    root = tmp_path / "site"
    shutil.copytree(site_template.root, root)
    return Site(root)


# -- secrets, and looking for them where they must not be ------------------------------------


def key_forms(key: bytes) -> list[bytes]:
    """Ways a key could leak: raw, hex (both cases), base64url and standard base64."""
    return [
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64url_encode(key).encode(),
        base64.b64encode(key),
        base64.b64encode(key).rstrip(b"="),
    ]


def assert_no_key_in(blobs: Iterable[bytes], keys: Iterable[bytes]) -> None:
    forms = [(key, form) for key in keys for form in key_forms(key)]
    assert forms
    for blob in blobs:
        for key, form in forms:
            assert form not in blob, f"key {key.hex()[:8]}... leaked as {form[:12]!r}"


def desk_secrets(desk: Desk) -> list[bytes]:
    """Every slot key, pending key, CK pair key and discovery key the desk knows of."""
    secrets: list[bytes] = []
    for node in desk.nodes():
        secrets += desk._keys(node.identity)
    for (identity,) in desk._db.execute(
        "SELECT identity FROM nodes WHERE pending_keys IS NOT NULL"
    ):
        secrets += desk._keys(identity, pending=True)
    for a, copy in desk._db.execute("SELECT a, copy_a FROM keysets"):
        secrets.append(decrypt_copy(copy, oct_jwk(desk._keys(a)[Slot.WRAP])))
    secrets += [desk.discovery_key(epoch).key for epoch in desk.mission.epochs()]
    secrets.append(desk.store.secret("discovery"))
    return secrets


# -- the command line ------------------------------------------------------------------------


def snrmesh(
    *args: object,
    cwd: Path,
    passphrase: str | None = PASSPHRASE,
    pin: str | None = PIN,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mesh.cli`` as an operator would, without a terminal on stdin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNRMESH_")}
    if passphrase is not None:
        env["SNRMESH_DESK_PASSPHRASE"] = passphrase
    if pin is not None:
        env["SNRMESH_PIN"] = pin
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its SHA-256 (folders as ``dir``)."""
    return {
        str(path.relative_to(root)): "dir"
        if path.is_dir()
        else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, exactly one ``snrmesh: error:`` line naming the problem; on stdout nothing,
    or (``--json``) the same error as one JSON object."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("snrmesh: error: "), line
    if result.stdout:
        assert json.loads(result.stdout)["error"] == line.removeprefix("snrmesh: error: ")
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    return line


def refused_without_change(
    site: Site, *args: object, needles: tuple[str, ...], **secrets: str | None
) -> str:
    """Run a command that must be refused and leave every file of ``site`` as it was."""
    before = snapshot(site.root)
    line = assert_refused(snrmesh(*args, cwd=site.root, **secrets), *needles)
    assert snapshot(site.root) == before
    return line
