"""``snrmesh card``: the emulator as its own process, ``readers``, help, and PC/SC failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.sim.pcscd import PrivatePcscd
from mesh.token.pcsc import PcscToken
from tests.card.conftest import card_present, wait_for
from tests.token.tokens import PIN


def snrmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args],
        env={**os.environ, "SNRMESH_PIN": PIN, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_emulate_help_explains_how_to_run_a_node_on_a_virtual_card() -> None:
    out = snrmesh("card", "emulate", "--help").stdout
    for needle in ("vsmartcard-vpcd", "pcscd", "--token 'pcsc:Virtual PCD 00 00'", "snrmesh agent"):
        assert needle in out


def test_without_pcscd_a_card_command_fails_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("smartcard.scard", reason="pyscard is not installed")
    env = {"PCSCLITE_CSOCK_NAME": str(tmp_path / "no-pcscd.comm")}
    for args in (("card", "readers"), ("bundle", "inspect", "x.bundle", "--token", "pcsc:")):
        result = snrmesh(*args, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.splitlines() == [
            "snrmesh: error: the PC/SC service is not running (start pcscd): Service not available"
        ]


def test_emulate_refuses_a_state_file_it_could_not_write(tmp_path: Path) -> None:
    """It ran, and the card's first write (personalisation) failed; now one line, before."""
    for state, needle in (
        (tmp_path / "no" / "such" / "a.card", "cannot write"),
        (tmp_path, "cannot read card state"),  # a folder: read first, and said so already
    ):
        result = snrmesh("card", "emulate", "--state", str(state), "--vpcd", "127.0.0.1:9")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1 and needle in result.stderr, result.stderr
    assert not (tmp_path / "no").exists()


def test_an_emulator_with_no_reader_to_plug_into_says_so_once(tmp_path: Path) -> None:
    """No pcscd or vpcd at --vpcd: it waited without a word, as if the card were in."""
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "card", "emulate", "--state",
             str(tmp_path / "a.card"), "--vpcd", f"127.0.0.1:{port}"],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            time.sleep(1.5)  # three tries
        finally:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=10)
    assert process.returncode == 0 and "Traceback" not in err
    waiting = [line for line in err.splitlines() if "no vpcd reader" in line]
    assert len(waiting) == 1 and "is pcscd running, with vsmartcard-vpcd?" in waiting[0], err


def test_the_emulator_process_keeps_its_card_across_restarts(
    pcscd: PrivatePcscd, tmp_path: Path
) -> None:
    reader = pcscd.readers[0]
    state = tmp_path / "alpha-1.card"

    def emulate() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mesh.cli",
                "card",
                "emulate",
                "--state",
                str(state),
                "--vpcd",
                f"127.0.0.1:{reader.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    process = emulate()
    try:
        wait_for(lambda: card_present(reader), 15, "the emulated card")
        assert f"{reader.name}: snrmesh card, blank" in snrmesh("card", "readers").stdout
        token = PcscToken(reader.name)
        token.personalise(
            pin=PIN,
            token_id=os.urandom(16),
            identity="alpha-1",
            role="soldier",
            keys=[os.urandom(32)] * 4,
            generations=[1] * 4,
        )
        token.close()
        process.send_signal(signal.SIGTERM)  # pull the card out
        assert process.wait(10) == 0
        wait_for(lambda: not card_present(reader), 10, "the card to go")
        process = emulate()  # and put it back
        wait_for(lambda: card_present(reader), 15, "the card to return")
        listed = snrmesh("card", "readers", "--json").stdout
        assert '"identity": "alpha-1"' in listed and '"life_cycle": "closed"' in listed
    finally:
        process.kill()
        process.wait(10)
