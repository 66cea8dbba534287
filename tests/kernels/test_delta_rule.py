"""kernels.delta_rule: the chunk form equals the token-by-token rule, and the plan of many
chunks equals `delta_chunk` chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from kernels.delta_rule import delta_chunk, delta_plan, delta_rule_naive


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_equals_chunk_by_chunk(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_mem, m, n, d_k, d_v = 3, 4, 8, 6, 5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = torch.nn.functional.normalize(rand(n_mem, m * n, d_k), dim=-1)
    k = torch.nn.functional.normalize(rand(n_mem, m * n, d_k), dim=-1)
    v = rand(n_mem, m * n, d_v)
    theta = torch.rand(n_mem, m * n, generator=g, dtype=torch.float64)
    alpha = 0.2 * torch.rand(n_mem, m * n, generator=g, dtype=torch.float64)
    w0 = rand(n_mem, d_k, d_v)

    plan = delta_plan(q, k, v, theta, alpha, n)
    assert plan.chunks == m
    w_plan = w_ref = w0
    for i in range(m):
        span = slice(i * n, (i + 1) * n)
        ref = delta_chunk(w_ref, q[:, span], k[:, span], v[:, span], theta[:, span], alpha[:, span])
        got = plan.apply(i, w_plan)
        torch.testing.assert_close(got.outputs, ref.outputs, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got.weights, ref.weights, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got.surprise_sq, ref.surprise_sq, rtol=1e-10, atol=1e-10)
        w_ref = ref.weights
        w_plan = got.weights * 0.9 if i == 1 else got.weights  # a gate may change them
        w_ref = w_ref * 0.9 if i == 1 else w_ref


@pytest.mark.parametrize(("n", "n_read"), [(8, 8), (8, 3), (5, 0)])
def test_chunk_equals_token_by_token(n: int, n_read: int) -> None:
    """Outputs of the last n_read tokens, chunk-end weights and surprise, in float64."""
    g = torch.Generator().manual_seed(n + n_read)
    n_mem, d_k, d_v = 3, 6, 5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    k = torch.nn.functional.normalize(rand(n_mem, n, d_k), dim=-1)
    q = torch.nn.functional.normalize(rand(n_mem, n_read, d_k), dim=-1)
    v = rand(n_mem, n, d_v)
    theta = torch.rand(n_mem, n, generator=g, dtype=torch.float64)
    alpha = 0.3 * torch.rand(n_mem, n, generator=g, dtype=torch.float64)
    w0 = rand(n_mem, d_k, d_v)
    got = delta_chunk(w0, q, k, v, theta, alpha)
    want = delta_rule_naive(w0, q, k, v, theta, alpha)
    for a, b in ((got.outputs, want.outputs), (got.weights, want.weights)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.surprise_sq, want.surprise_sq, rtol=1e-10, atol=1e-10)


def test_a_memory_does_not_depend_on_its_batch() -> None:
    g = torch.Generator().manual_seed(9)
    k = torch.nn.functional.normalize(torch.randn(4, 8, 6, generator=g), dim=-1)
    v, w0 = torch.randn(4, 8, 6, generator=g), torch.randn(4, 6, 6, generator=g)
    theta, alpha = torch.rand(4, 8, generator=g), 0.2 * torch.rand(4, 8, generator=g)
    batched = delta_chunk(w0, k, k, v, theta, alpha)
    alone = delta_chunk(w0[2:3], k[2:3], k[2:3], v[2:3], theta[2:3], alpha[2:3])
    torch.testing.assert_close(alone.outputs[0], batched.outputs[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone.weights[0], batched.weights[2], rtol=1e-6, atol=1e-6)
