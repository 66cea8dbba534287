"""The fast chunked update equals the token-by-token references (float64, tight)."""

from __future__ import annotations

import pytest
import torch

from memsvc.memory.naive import ReferenceResult, reference_chunked, reference_delta

from .conftest import make_memory

TOL = dict(rtol=1e-10, atol=1e-10)


def assert_matches(mem, x: torch.Tensor, ref: ReferenceResult) -> None:
    y, state = mem(x)
    torch.testing.assert_close(y, ref.y, **TOL)
    for got, want in zip(state.weights, ref.weights, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert len(state.momentum) == len(ref.momentum)
    for got, want in zip(state.momentum, ref.momentum, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(state.writes_applied, ref.writes_applied)
    assert torch.equal(state.writes_skipped, ref.writes_skipped)
    torch.testing.assert_close(state.surprise_ema, ref.surprise_ema, **TOL)


CHUNKED = [
    {},  # the Titans defaults: MSE, L2 retention, momentum
    {"depth": 1},
    {"depth": 3},
    {"depth": 4, "activation": "silu"},
    {"optimizer": "sgd"},
    {"optimizer": "chunk_momentum"},
    {"optimizer": "chunk_momentum", "max_update_norm": 0.05, "depth": 3},
    {"retention": "none"},
    {"objective": "huber", "huber_delta": 0.05},
    {"objective": "lp", "lp_p": 1.5},
    {"objective": "lp", "lp_p": 3.0},
    {"lookahead": True},
    {"normalize_step": False, "max_update_norm": None},
    {"max_update_norm": 0.05},  # the cap binds
    {"heads": 1, "conv_size": 1},
    {"tau": 1.5, "adaptive_forgetting": True},
    {"tau": 1.0, "gate": "relative", "adaptive_forgetting": True},
    {"adaptive_forgetting": True, "lambda_0": 1e-2, "lambda_max": 0.2},
]


def test_chunk_size_one_equals_per_token_recurrence() -> None:
    """chunk_size 1: every gradient at the current weights, as Titans writes it."""
    mem = make_memory(chunk_size=1, max_update_norm=0.5)
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    assert_matches(mem, x, reference_chunked(mem, x))


@pytest.mark.parametrize(
    "overrides", CHUNKED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_chunked_update_equals_reference(overrides: dict) -> None:
    mem = make_memory(**overrides)
    x = 2.0 * torch.randn(2, 23, 16, dtype=torch.float64)  # 5 complete chunks + 3 pending
    assert_matches(mem, x, reference_chunked(mem, x))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"lookahead": True},
        {"tau": 0.3},
        {"tau": 1.0, "gate": "relative"},
        {"adaptive_forgetting": True, "lambda_0": 1e-2},
        {"heads": 1},
    ],
)
def test_delta_rule_equals_token_by_token(overrides: dict) -> None:
    mem = make_memory(depth=1, update_rule="delta", optimizer="sgd", **overrides)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    assert_matches(mem, x, reference_delta(mem, x))


@pytest.mark.parametrize(
    "overrides", [{"tau": 1.5}, {"tau": 1.0, "gate": "relative"}], ids=["absolute", "relative"]
)
def test_the_gate_really_skips_in_these_tests(overrides: dict) -> None:
    """Guard for the tables above: these gates must skip some chunks and write others."""
    mem = make_memory(adaptive_forgetting=True, **overrides)
    _, state = mem(2.0 * torch.randn(2, 23, 16, dtype=torch.float64))
    assert int(state.writes_skipped.sum()) > 0
    assert int(state.writes_applied.sum()) > 0
