"""Ctrl-C during a pooled issuance is one line from the parent, none from the workers.

A terminal's ctrl-C reaches the whole foreground process group: the pool's workers too. They
used to print a ``KeyboardInterrupt`` traceback each (``desk issue --workers N``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

CHILD = """
import itertools, os, sys
from provisioning.issuance import WrapTarget, mint_keysets

kid = "ab" * 16 + ".0.1"
targets = {n: WrapTarget(kid, os.urandom(32)) for n in ("a", "b")}
jobs = (("a", "b", e, 0, 1) for e in itertools.count())  # endless: until interrupted
try:
    for n, _ in enumerate(mint_keysets(jobs, targets, b"m" * 16, expected=10**9, workers=2)):
        if n == 0:
            print("minting", flush=True)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


def test_ctrl_c_to_the_process_group_of_a_pooled_issuance_prints_no_worker_traceback() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a job
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "minting\n"
        time.sleep(0.3)  # the workers are busy with their next chunks
        os.killpg(child.pid, signal.SIGINT)  # what ctrl-C at a terminal does
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err == "interrupted\n" and child.returncode == 130
