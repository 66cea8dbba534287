"""How a node keeps its sessions: `ManagerConfig`, and the limits every layer shares.

Each default is defined once here (or, for the lease TTL, in ``ownership.py``);
the server and the CLI take them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memsvc.sessions.ownership import DEFAULT_LEASE_TTL_MS

# The most tokens one request may bring (an append, a prompt): bounds one request's work.
MAX_TOKENS_PER_APPEND = 1 << 20
MAX_NAME_LENGTH = 200  # the sessions.name column
SYNC_THREADS = 16  # fsyncs of one batched append in flight at once


@dataclass(frozen=True)
class ManagerConfig:
    """Where sessions live and how they are kept. Budgets are bytes of session state."""

    data_dir: Path
    node_id: str = "node-0"
    device_budget_bytes: int = 2 << 30
    host_budget_bytes: int = 0  # used only when the engine is on CUDA
    keep_checkpoints: int = 3
    checkpoint_every_tokens: int = 65536
    checkpoint_every_seconds: float = 300.0
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    # Where clients reach this node (host:port), announced to the cluster so that other
    # replicas can send a session's clients here; None: a single node, nothing announced.
    advertise_address: str | None = None
    max_tokens_per_append: int = MAX_TOKENS_PER_APPEND
    # A session's log is cut (before its oldest kept checkpoint) once that frees this much.
    wal_truncate_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for name in ("device_budget_bytes", "checkpoint_every_tokens", "lease_ttl_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ManagerConfig.{name} must be positive")
        if self.host_budget_bytes < 0 or self.keep_checkpoints < 1 or self.wal_truncate_bytes < 0:
            raise ValueError(
                "ManagerConfig: host_budget_bytes, wal_truncate_bytes >= 0; keep_checkpoints >= 1"
            )
        if self.checkpoint_every_seconds <= 0 or self.max_tokens_per_append <= 0:
            raise ValueError("ManagerConfig: checkpoint period and max tokens must be positive")
