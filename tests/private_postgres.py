"""A private PostgreSQL instance for tests that need a database to go away and come back (the
shared one on 5432 is never stopped): initdb into a temporary folder, trust authentication, a free
port; run as the `postgres` user when the tests run as root (initdb refuses root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.processes import free_port

PG_BIN = Path(os.environ.get("ARM_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def available() -> bool:
    return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or shutil.which("runuser") is not None)


class PrivatePostgres:
    """One PostgreSQL server in a folder of its own under the system temp folder (not under
    pytest's, whose permissions concurrent pytest runs of the same user may change) on
    127.0.0.1:`port`; stop() and start() keep the port and the data."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="arm-test-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        command = [str(PG_BIN / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}{log}")

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self.start()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
                  "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self) -> None:
        """An abrupt stop, as a crash or a lost network looks to clients."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "stop", "-m", "immediate")

    def destroy(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)
