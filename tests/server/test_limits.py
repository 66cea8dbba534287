"""Per-request checks and the per-tenant rate, without a server (they are pure)."""

from __future__ import annotations

import re

import pytest

from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.server.auth import Tenant
from memsvc.server.limits import Limits, RateLimiter, checked_tokens
from memsvc.sessions.api import InvalidRequestError, QuotaExceededError

LIMITS = Limits(vocab_size=260, max_tokens_per_request=8)


def test_text_and_ids_become_tokens() -> None:
    assert checked_tokens(pb.Input(text="hé".encode()), LIMITS, "x") == [104, 195, 169]
    assert checked_tokens(pb.Input(token_ids=[0, 259, 7]), LIMITS, "x") == [0, 259, 7]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (pb.Input(), "x: no tokens"),
        (pb.Input(token_ids=[1], text=b"a"), "x: set token_ids or text, not both"),
        (pb.Input(token_ids=[1] * 9), "x: 9 tokens, more than the 8"),
        (pb.Input(text=b"123456789"), "x: 9 tokens, more than the 8"),
        (pb.Input(token_ids=[5, 260]), "x.token_ids[1] = 260 is outside the vocabulary [0, 260)"),
        (pb.Input(token_ids=[2**32 - 1]), "x.token_ids[0] = 4294967295 is outside"),
        (pb.Input(text=b"ab\xff"), "x.text is not valid UTF-8 (byte 2: invalid start byte)"),
        (pb.Input(text=b"\xe2\x82"), "x.text is not valid UTF-8 (byte 0: unexpected end"),
    ],
)
def test_bad_input_is_named_precisely(message: pb.Input, reason: str) -> None:
    with pytest.raises(InvalidRequestError, match="^" + re.escape(reason)):
        checked_tokens(message, LIMITS, "x")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_bursts_a_minute_then_refills_continuously() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    tenant = Tenant("t1", "acme", max_sessions=1, tokens_per_minute=600)  # 10 tokens/s
    limiter.take(tenant, 600)
    with pytest.raises(QuotaExceededError, match=re.escape("1 more tokens fit in 0.1 s")):
        limiter.take(tenant, 1)
    clock.now = 3.0
    limiter.take(tenant, 30)
    with pytest.raises(QuotaExceededError):
        limiter.take(tenant, 1)
    limiter.refund(tenant, 30)
    limiter.take(tenant, 30)
    with pytest.raises(QuotaExceededError, match="even when idle"):
        limiter.take(tenant, 601)


def test_rate_limits_are_per_tenant() -> None:
    limiter = RateLimiter(Clock())
    a = Tenant("a", "a", max_sessions=1, tokens_per_minute=10)
    b = Tenant("b", "b", max_sessions=1, tokens_per_minute=10)
    limiter.take(a, 10)
    limiter.take(b, 10)
    with pytest.raises(QuotaExceededError):
        limiter.take(a, 1)
