"""Retrying calls on UNAVAILABLE, with capped exponential backoff.

UNAVAILABLE means the call did not reach a serving server (it is down,
restarting, shutting down, or hands the session over), so repeating a read, a
query or a checkpoint is safe. Appends are repeated only on the condition that
the stream is still where they start (``expected_position``), and calls that
never left the client (no connection) are repeated whatever they are
(``routing.Failover``). The defaults ride out a replica's death: its sessions
move once their lease (10 s by default) expires.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """attempts counts the first try; delays double from initial_backoff_s up to
    max_backoff_s, each drawn from [d/2, d] so that clients do not retry in step."""

    attempts: int = 16
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1:
            raise ValueError(f"invalid retry policy {self}")

    def delays(self) -> Iterator[float]:
        """The pause before each retry (attempts - 1 of them)."""
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield random.uniform(delay / 2, delay)
            delay = min(delay * self.multiplier, self.max_backoff_s)

    @staticmethod
    def retryable(error: grpc.RpcError) -> bool:
        return error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


NO_RETRY = RetryPolicy(attempts=1)
