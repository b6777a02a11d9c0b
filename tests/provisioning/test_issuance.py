"""Bulk issuance through the worker pool: every copy it mints opens, once per pair and epoch."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from jwcrypto.common import base64url_decode

from mesh.keyset import decrypt_copy, read_copy_header
from mesh.token import Slot, slot_kid
from provisioning import issuance
from provisioning.desk import Desk
from provisioning.plan import parse_plan
from tests.provisioning.conftest import PASSPHRASE
from tests.token.tokens import oct_jwk

NODES = [f"n-{i:02d}" for i in range(10)]
EPOCHS = 30
PAIRS = len(NODES) * (len(NODES) - 1) // 2  # 45
JOBS = PAIRS * EPOCHS  # 1,350: above issuance.INLINE_LIMIT, so the pool is used


def test_pool_issuance_mints_copies_that_unwrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert issuance.INLINE_LIMIT < JOBS
    contexts: list[str] = []
    real_get_context = multiprocessing.get_context

    def get_context(method: str | None = None) -> Any:
        contexts.append(str(method))
        return real_get_context(method)

    monkeypatch.setattr(multiprocessing, "get_context", get_context)

    now = int(time.time())
    progress: list[tuple[int, int]] = []
    with Desk.init(
        tmp_path / "desk",
        passphrase=PASSPHRASE,
        name="swarm",
        start=now,
        end=now + EPOCHS * 60,
        epoch_seconds=60,
        now=now,
    ) as desk:
        plan = {"node": [{"id": n, "role": "uav"} for n in NODES], "groups": {"swarm": NODES}}
        desk.apply(parse_plan(plan), now=now)  # no token files: no scrypt per node
        report = desk.issue(now=now, workers=2, on_progress=lambda d, t: progress.append((d, t)))
        wrap = {n: desk._keys(n)[Slot.WRAP] for n in NODES}
        token_ids = {n.identity: n.token_id for n in desk.nodes()}
        rows = desk._db.execute("SELECT * FROM keysets").fetchall()
        again = desk.issue(now=now, workers=2)

    assert contexts == ["fork"]
    assert (report.pairs, report.epochs, report.issued) == (PAIRS, EPOCHS, JOBS)
    assert progress[-1] == (JOBS, JOBS) and len(progress) == -(-JOBS // issuance.CHUNK)
    assert (again.issued, again.skipped_existing) == (0, JOBS)

    assert len(rows) == JOBS
    assert Counter((a, b) for _, a, b, *_ in rows) == Counter(
        {(a, b): EPOCHS for i, a in enumerate(NODES) for b in NODES[i + 1 :]}
    )
    assert len({row[0] for row in rows}) == JOBS  # CK ids are unique
    pair_keys = set()
    for ck_id, a, b, epoch, nbf, exp, copy_a, copy_b in rows:
        assert (nbf, exp) == (now + 60 * epoch, now + 60 * (epoch + 1))
        opened = []
        for holder, copy in ((a, copy_a), (b, copy_b)):
            header = read_copy_header(copy)
            assert header.kid == slot_kid(token_ids[holder], Slot.WRAP, 1)
            assert (header.ck_id, header.holder, header.not_before) == (ck_id, holder, nbf)
            opened.append(decrypt_copy(copy, oct_jwk(wrap[holder])))
        assert opened[0] == opened[1] and len(opened[0]) == 32
        pair_keys.add(opened[0])
    assert len(pair_keys) == JOBS  # every CK has its own key
    mission_ids = {json.loads(base64url_decode(r[6].split(".")[0]))["mis"] for r in rows}
    assert len(mission_ids) == 1
