"""A throwaway PostgreSQL server for tests: initdb into a temp dir, pg_ctl on a free loopback port.

The binaries are those in the folder `pg_config --bindir` prints (or on PATH). PostgreSQL refuses
to run as root, and tests here run as root, so the server then runs as the unprivileged `nobody`
user in a temp dir it owns (every Linux machine has `nobody`; no user is created).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "headgroup"
RUN_AS = "nobody"


def bindir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None where PostgreSQL is not installed."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        _run(
            [self.bindir / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER]
            + [name],
            as_user=False,
        )
        return self.url(name)


def _demote() -> dict:
    """subprocess arguments that run a command as RUN_AS when we are root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(RUN_AS)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _run(cmd: list, as_user: bool = True, cwd: Path | None = None) -> None:
    out = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        **(_demote() if as_user else {}),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed: {out.stderr.strip()[-2000:]}")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh server; stop it and delete its files afterwards."""
    folder = bindir()
    if folder is None:
        raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found")
    # Under /tmp, not pytest's tmp_path: the server user must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix="headgroup-pg-"))
    demote = _demote()
    if demote:
        os.chown(root, demote["user"], demote["group"])
    data, port = root / "data", _free_port()
    started = False
    try:
        _run(
            [folder / "initdb", "-D", data, "-U", SUPERUSER, "--auth=trust", "--no-locale"]
            + ["-E", "UTF8", "--no-sync"],
            cwd=root,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        _run(
            [folder / "pg_ctl", "-D", data, "-l", root / "log", "-o", options, "-w", "-t", "30"]
            + ["start"],
            cwd=root,
        )
        started = True
        yield PostgresServer(folder, root, port)
    finally:
        if started:
            _run([folder / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], cwd=root)
        shutil.rmtree(root, ignore_errors=True)
