"""A private PostgreSQL server for tests: Debian's binaries, a temp cluster, loopback only."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from orthanc import free_port


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed; run scripts/setup.sh --test")
    return found[-1]


class Postgres:
    """initdb + pg_ctl in a temp folder; as root, the server runs as the postgres
    user (PostgreSQL refuses to run as root)."""

    def __init__(self, fsync: bool = False) -> None:
        """``fsync``: as a production server (tests leave it off: faster, nothing to keep)."""
        self.fsync = fsync
        self.folder = Path(tempfile.mkdtemp(prefix="lungsys-pg-"))
        self.port = free_port()
        self.data = self.folder / "data"
        self._names = itertools.count(1)

    def url(self, database: str = "lungsys") -> str:
        return f"postgresql+psycopg://lungsys@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"test{next(self._names)}"
        self._run(_binary("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                  "lungsys", name)
        return self.url(name)

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}")

    def start(self) -> "Postgres":
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(_binary("initdb"), "-D", str(self.data), "-U", "lungsys", "-A", "trust",
                  "-E", "UTF8", "--no-sync")
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"),
                  "-w", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.folder}"
                  f"{'' if self.fsync else ' -F'}", "start")
        return self

    def stop(self) -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
