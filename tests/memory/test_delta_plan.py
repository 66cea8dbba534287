"""The chunk-parallel plan of the delta rule equals `delta_chunk` chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from memsvc.memory.delta import delta_chunk, delta_plan


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
