"""The memory is differentiable end to end, so the outer model trains through it."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from .conftest import make_memory


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"depth": 1, "update_rule": "delta", "optimizer": "sgd", "lookahead": True},
        {"optimizer": "sgd", "objective": "huber", "huber_delta": 0.3, "depth": 3},
    ],
)
def test_gradcheck_through_the_update(overrides: dict) -> None:
    mem = make_memory(dim=4, heads=1, expansion=1.5, chunk_size=2, **overrides)
    names = ["initial_weights.0", "to_gates.weight", "to_qkv.weight"]
    params = dict(mem.named_parameters())
    x = torch.randn(1, 7, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *tensors):
        y, state = functional_call(mem, {**params, **dict(zip(names, tensors, strict=True))}, (x,))
        return y, *state.weights

    inputs = (x, *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_every_parameter_gets_a_finite_gradient() -> None:
    mem = make_memory(dtype=torch.float32, dim=32, heads=2, chunk_size=8, lookahead=True)
    x = torch.randn(2, 40, 32)
    y, state = mem(x)
    (y.pow(2).mean() + state.weights[-1].pow(2).mean()).backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
