"""Private backing services the reliability suite may break: a Redis, a PostgreSQL and a
small filesystem of its own, on loopback and under a work directory, never the machine's.

Each is a context manager that leaves nothing running or mounted behind it.
PostgreSQL runs as the ``postgres`` user when the suite runs as root (the
server refuses root); the small filesystem is a tmpfs mount, which needs root.
Missing binaries or rights raise ServiceUnavailableError saying which.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import redis

from memsvc.server.process import free_port

POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class ServiceUnavailableError(RuntimeError):
    """A private service cannot be had on this machine (the message says why)."""


def _binary(name: str, *extra_dirs: Path) -> str:
    for directory in extra_dirs:
        if (directory / name).is_file():
            return str(directory / name)
    found = shutil.which(name)
    if found is None:
        raise ServiceUnavailableError(f"{name} is not installed (needed by the reliability suite)")
    return found


class PrivateRedis:
    """A redis-server on a free loopback port that keeps nothing on disk (like the default)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._binary = _binary("redis-server")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [self._binary, "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(
            command, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        raise ServiceUnavailableError(
                            f"redis-server did not start on port {self.port}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        """Stops it (everything in it is lost, as with the default setup) and starts it again."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb) on a free loopback port, trust auth.

    Its files live in a fresh directory under the system's temporary directory
    (the ``postgres`` user must reach them, which it cannot inside a root-only
    work directory such as pytest's), removed on exit.
    """

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="memsvc-pg-"))
        self.data = self.workdir / "pgdata"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._initdb = _binary("initdb", *POSTGRES_BIN_DIRS)
        self._pg_ctl = _binary("pg_ctl", *POSTGRES_BIN_DIRS)
        self._as_postgres = os.geteuid() == 0

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServiceUnavailableError(
                f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()[-500:]}"
            )

    def start(self) -> Self:
        if not self.data.exists():
            self.data.mkdir()
            if self._as_postgres:
                shutil.chown(self.workdir, "postgres")
                shutil.chown(self.data, "postgres")
            self._run(self._initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust")
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = self.data / "server.log"
        self._run(self._pg_ctl, "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self._pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        """Stops it (fast: open connections are cut) and starts it again; data is kept."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


class SmallDisk:
    """A tmpfs of ``size_mb`` mounted at ``path``: a data directory that fills up."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = Path(path)
        self.size_mb = size_mb

    def __enter__(self) -> Self:
        if os.geteuid() != 0:
            raise ServiceUnavailableError("mounting a small filesystem needs root")
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ServiceUnavailableError(f"mount -t tmpfs failed: {done.stderr.strip()}")
        return self

    def fill(self) -> Path:
        """Writes a ballast file until the filesystem is full; returns it."""
        ballast = self.path / "ballast"
        chunk = b"\0" * (64 << 10)
        with open(ballast, "wb", buffering=0) as file:
            try:
                while True:
                    file.write(chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
        return ballast

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
