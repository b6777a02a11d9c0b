"""A private PostgreSQL server for the tests and the bench, stopped by its PID.

``initdb`` into a fresh directory under /tmp, then ``postgres`` listening on a
Unix socket in that directory only (``listen_addresses = ''``): nothing else on
the machine can reach it and no port can clash. PostgreSQL refuses to run as
root, so as root the server runs as the ``postgres`` user (made by the Debian
package) through ``setpriv``, which execs: the PID we hold is the postmaster's.
When the binaries are missing and we are root, they are installed from the
Debian packages (``apt-get install postgresql``), as ``scripts/setup`` does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

__all__ = ["PostgresServer", "find_postgres", "unavailable_reason"]

PG_ROOT = Path("/usr/lib/postgresql")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
INSTALL_TIMEOUT = 600
SUPERUSER = "snrmesh"


def find_postgres() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding ``initdb`` and ``postgres``."""
    if not PG_ROOT.is_dir():
        return None
    found = [
        d / "bin"
        for d in PG_ROOT.iterdir()
        if (d / "bin" / "initdb").is_file() and (d / "bin" / "postgres").is_file()
    ]
    return max(
        found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None
    )


def _install() -> str | None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "install", "-y", "-q", "postgresql"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "postgresql"],
    ):
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"apt-get failed: {exc}"
        if done.returncode == 0 and find_postgres() is not None:
            return None
    return "apt-get install postgresql failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]


def unavailable_reason() -> str | None:
    """Why a private PostgreSQL cannot run here, or None (installing it first if root)."""
    if find_postgres() is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return "PostgreSQL binaries not in /usr/lib/postgresql/*/bin and cannot install them"
        reason = _install()
        if reason is not None:
            return reason
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run the server as"
        if shutil.which("setpriv") is None:
            return "running as root but setpriv (util-linux) is missing"
    return None


class PostgresServer:
    """One private server; ``start()`` then ``dsn(db)``; ``stop()`` kills it by PID and cleans up.

    ``durable=False`` (tests) turns fsync off; the bench keeps PostgreSQL's
    defaults (fsync and synchronous commit on), so a keyset is on disk when sent.
    """

    def __init__(self, *, durable: bool = False) -> None:
        bin_dir = find_postgres()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed")
        self.bin = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="snrmesh-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
            ]
        os.chmod(self.root, 0o700)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root} dbname={dbname} user={SUPERUSER}"

    def start(self) -> PostgresServer:
        subprocess.run(
            [
                *self._as,
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.root),
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        args = [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        log = open(self.root / "server.log", "wb")  # noqa: SIM115 - the server owns it
        with log:
            self.process = subprocess.Popen(
                [*self._as, str(self.bin / "postgres"), "-D", str(self.data), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    text = (self.root / "server.log").read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start: {text[-500:]}") from None
                time.sleep(0.1)

    def create_database(self, name: str, *, template: str | None = None) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            clause = f" TEMPLATE {template}" if template else ""
            conn.execute(f"CREATE DATABASE {name}{clause}")  # names are ours, not input
        return self.dsn(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of our postmaster by PID, then SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)
