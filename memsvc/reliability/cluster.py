"""A memsvc cluster on loopback: N `memsvc serve` processes sharing a PostgreSQL, a Redis and
a data directory, as the suite's faults need it (kill, stop, restart one; read its memory)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from memsvc.server.process import ServerProcess
from memsvc.store import metadata, migrate
from memsvc.store.database import Database

ADMIN_KEY = "reliability-admin-key"


@dataclass
class Backends:
    database_url: str
    redis_url: str
    data_dir: Path
    redis_namespace: str = field(default_factory=lambda: f"memsvc-rel-{secrets.token_hex(4)}")


class LocalCluster:
    """``replicas`` servers over ``backends``; logs go to ``workdir``/r<i>.log."""

    def __init__(
        self,
        workdir: Path,
        model_dir: Path,
        backends: Backends,
        *,
        replicas: int = 3,
        lease_ttl_ms: int = 2000,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.backends = backends
        migrate.upgrade(backends.database_url)
        self.database = Database.from_url(backends.database_url)
        args = ["--model", str(model_dir), "--data-dir", str(backends.data_dir)]
        args += ["--database-url", backends.database_url, "--redis-url", backends.redis_url]
        args += ["--redis-namespace", backends.redis_namespace]
        args += ["--lease-ttl-ms", str(lease_ttl_ms), "--shutdown-grace", "30"]
        # No saturation mitigation: it changes a session's memory on purpose (random bytes
        # saturate it within ~8k tokens), and the suite compares each session with a
        # reference fed the same tokens without it. Explosion mitigation stays on and is
        # counted (``mitigations``). The input guard is off for the same reason: the
        # writers stream random bytes, which it damps.
        args += ["--guard-norm-bound", "inf", "--guard-input-entropy", "0,inf", *extra_args]
        env = {"MEMSVC_ADMIN_KEY": ADMIN_KEY}
        self.servers = [
            ServerProcess(
                [*args, "--node-id", f"r{i}"],
                self.workdir / f"r{i}.log",
                env=env,
                log_level=os.environ.get("MEMSVC_RELIABILITY_LOG_LEVEL", "info"),
            )
            for i in range(replicas)
        ]
        self.alive = [False] * replicas

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self.servers]

    def live_addresses(self) -> list[str]:
        return [s.address for s, up in zip(self.servers, self.alive, strict=True) if up]

    def start(self, index: int | None = None) -> Self:
        for i in range(len(self.servers)) if index is None else [index]:
            self.servers[i].start()
            self.alive[i] = True
        return self

    def kill(self, index: int) -> None:
        self.servers[index].kill()
        self.alive[index] = False

    def stop(self, index: int) -> int:
        code = self.servers[index].stop()
        self.alive[index] = False
        return code

    def stop_all(self) -> list[int]:
        return [self.stop(i) for i, up in enumerate(self.alive) if up]

    def mitigations(self) -> int:
        """How many times the replicas' guards mitigated a session (from their logs)."""
        return sum(
            server.log_path.read_text(errors="replace").count('"mitigation_applied"')
            for server in self.servers
            if server.log_path.exists()
        )

    def rss_bytes(self, index: int) -> int | None:
        """The replica's resident memory (None once it is gone)."""
        try:
            status = Path(f"/proc/{self.servers[index].pid}/status").read_text()
        except (OSError, AssertionError):
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None

    def create_tenant(self, name: str, *, max_sessions: int = 10_000) -> str:
        """A new tenant; returns its API key."""
        with self.database.unit_of_work() as db:
            _, api_key = metadata.create_tenant(
                db, name, max_sessions=max_sessions, tokens_per_minute=1 << 30
            )
        return api_key

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.__exit__()
        self.database.dispose()
