"""What one request may carry, and how fast a tenant may stream.

Checked on the event loop before any work is queued, so a refused request
changes nothing and costs no model time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.server.auth import Tenant
from memsvc.sessions.api import InvalidRequestError, QuotaExceededError
from memsvc.sessions.config import MAX_TOKENS_PER_APPEND


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Messages over max_message_bytes are refused by gRPC itself
    (RESOURCE_EXHAUSTED); the rest are checked here (INVALID_ARGUMENT)."""

    vocab_size: int
    max_message_bytes: int = 4 << 20
    max_tokens_per_request: int = MAX_TOKENS_PER_APPEND

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.max_message_bytes < 1 or self.max_tokens_per_request < 1:
            raise ValueError(f"limits must be positive: {self}")


def checked_tokens(message: pb.Input, limits: Limits, what: str) -> list[int]:
    """The token ids an Input carries, or InvalidRequestError naming the first problem."""
    ids, text = message.token_ids, message.text
    if ids and text:
        raise InvalidRequestError(f"{what}: set token_ids or text, not both")
    count = len(ids) or len(text)
    if count == 0:
        raise InvalidRequestError(f"{what}: no tokens (token_ids and text are both empty)")
    if count > limits.max_tokens_per_request:
        raise InvalidRequestError(
            f"{what}: {count} tokens, more than the {limits.max_tokens_per_request} "
            "one request may carry; split it"
        )
    if text:
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRequestError(
                f"{what}.text is not valid UTF-8 (byte {error.start}: {error.reason})"
            ) from None
        return list(text)
    tokens = list(ids)
    if max(tokens) >= limits.vocab_size:
        index, bad = next((i, t) for i, t in enumerate(tokens) if t >= limits.vocab_size)
        raise InvalidRequestError(
            f"{what}.token_ids[{index}] = {bad} is outside the vocabulary [0, {limits.vocab_size})"
        )
    return tokens


class RateLimiter:
    """Tokens per minute per tenant, as a token bucket holding one minute's quota.

    A tenant may burst up to its whole quota, then streams at quota / 60 tokens
    per second. Per server process: replicas each grant the full rate. Called on
    the event loop only, so it needs no lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens left, at)

    def take(self, tenant: Tenant, tokens: int) -> None:
        """Spends `tokens` of the tenant's quota; QuotaExceededError (nothing spent) if short."""
        quota = tenant.tokens_per_minute
        now = self._clock()
        left, at = self._buckets.get(tenant.tenant_id, (float(quota), now))
        left = min(float(quota), left + (now - at) * quota / 60.0)
        if tokens > left:
            self._buckets[tenant.tenant_id] = (left, now)
            if tokens > quota:
                raise QuotaExceededError(
                    f"tenant {tenant.name}: {tokens} tokens exceed its rate limit of "
                    f"{quota} tokens per minute even when idle; send fewer at a time"
                )
            wait = (tokens - left) * 60.0 / quota
            raise QuotaExceededError(
                f"tenant {tenant.name}: rate limit of {quota} tokens per minute reached; "
                f"{tokens} more tokens fit in {wait:.1f} s"
            )
        self._buckets[tenant.tenant_id] = (left - tokens, now)

    def refund(self, tenant: Tenant, tokens: int) -> None:
        """Gives back what `take` spent on a request that then failed (it changed nothing)."""
        left, at = self._buckets[tenant.tenant_id]
        self._buckets[tenant.tenant_id] = (min(float(tenant.tokens_per_minute), left + tokens), at)
