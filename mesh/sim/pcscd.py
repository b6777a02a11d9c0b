"""A private PC/SC daemon with virtual readers, for tests, benchmarks and demos.

pcscd 1.9 always serves ``/run/pcscd/pcscd.comm`` and refuses to start when
another pcscd owns it, so ours runs in its own mount namespace (``unshare``)
where ``/run`` is a fresh tmpfs and ``/run/pcscd`` is a folder of ours: the
socket is then reachable outside as ``<folder>/pcscd.comm``, which clients
name in ``PCSCLITE_CSOCK_NAME``. A system pcscd, if any, is never touched.

Its reader configuration (``pcscd -c``) has one vsmartcard ``vpcd`` entry,
which makes two readers: the driver listens on the entry's port (slot ``00``)
and the next one (slot ``01``) on every interface, so the ports are picked
free and a virtual card (:class:`mesh.token.emulator.Emulator`) connects to
127.0.0.1. (The driver keeps its state per loaded library, so a second entry
in the same pcscd would not work: two readers per private pcscd.)

libpcsclite reads ``PCSCLITE_CSOCK_NAME`` once per process: set it (see
:meth:`PrivatePcscd.env`) before the first PC/SC call of a process, and use
one private pcscd per process.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import MeshError

__all__ = ["VPCD_DRIVER", "PcscdUnavailable", "PrivatePcscd", "VirtualReader"]

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
SLOTS = 2  # vpcd serves two readers per configuration entry: port and port + 1
READER_NAME = "snrmesh vcard"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PORT_RANGE = (20_000, 60_000)
PR_SET_PDEATHSIG = 1
_NAMESPACE_SCRIPT = (
    "mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/pcscd && "
    'mount --bind "$1" /run/pcscd && exec "$2" --foreground --config "$3"'
)


class PcscdUnavailable(MeshError):
    """A private pcscd cannot run here (the message says why: tests skip with it)."""


@dataclass(frozen=True, slots=True)
class VirtualReader:
    name: str  # the PC/SC reader name, for --token pcsc:NAME
    port: int  # where its virtual card connects (127.0.0.1)


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + 1):
        with socket.socket() as probe:
            try:
                probe.bind(("", candidate))
            except OSError:
                return False
    return True


def _free_port_pair() -> int:
    while True:
        port = random.randrange(*PORT_RANGE, 2)
        if _port_pair_free(port):
            return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when its parent dies (no pcscd left behind)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _namespace_command() -> list[str]:
    """How to enter a private mount namespace: as root directly, else in a user namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise PcscdUnavailable("unshare (util-linux) is not installed")
    base = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() == 0:
        return base
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        raise PcscdUnavailable(
            "not root and no unprivileged user namespaces: cannot run a private pcscd"
        )
    return [unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"]


class PrivatePcscd:
    """pcscd with two virtual readers, its files in ``folder``; stop it with :meth:`stop`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.readers: list[VirtualReader] = []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.folder / "run" / "pcscd.comm"

    @property
    def log_path(self) -> Path:
        return self.folder / "pcscd.log"

    def env(self) -> dict[str, str]:
        """The environment a PC/SC client needs to reach this pcscd."""
        return {"PCSCLITE_CSOCK_NAME": str(self.socket_path)}

    def start(self) -> PrivatePcscd:
        pcscd = shutil.which("pcscd") or shutil.which("pcscd", path="/usr/sbin:/sbin")
        if pcscd is None:
            raise PcscdUnavailable("pcscd is not installed (Debian package pcscd)")
        if not VPCD_DRIVER.exists():
            raise PcscdUnavailable(f"{VPCD_DRIVER} is missing (Debian package vsmartcard-vpcd)")
        command = _namespace_command()
        conf, run = self.folder / "reader.conf.d", self.folder / "run"
        conf.mkdir(parents=True, exist_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        port = _free_port_pair()
        (conf / "snrmesh-vpcd").write_text(
            f'FRIENDLYNAME "{READER_NAME}"\n'
            f"DEVICENAME /dev/null:{port}\n"
            f"LIBPATH {VPCD_DRIVER}\n"
            f"CHANNELID {port}\n"
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--", "sh", "-c", _NAMESPACE_SCRIPT, "sh", str(run), pcscd, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-500:]
                raise PcscdUnavailable(f"the private pcscd did not start: {tail.strip()}")
            time.sleep(0.05)
        self.readers = [
            VirtualReader(f"{READER_NAME} 00 {slot:02d}", port + slot) for slot in range(SLOTS)
        ]
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def __enter__(self) -> PrivatePcscd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
