"""Long streams stay finite; a bad state is reported, never propagated."""

from __future__ import annotations

import pytest
import torch

from memsvc.memory import MemoryConfig, NeuralMemory, NonFiniteStateError

from .conftest import make_memory

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hostile(seed: int) -> NeuralMemory:
    """Steps near their cap, no forgetting, strong momentum: the regime that diverges."""
    torch.manual_seed(seed)
    cfg = MemoryConfig(
        dim=16, heads=1, depth=2, chunk_size=64, max_step=1.0, step_bias=4.0, momentum_bias=3.0
    )
    mem = NeuralMemory(cfg)
    with torch.no_grad():
        mem.initial_weights[-1].normal_(std=0.5)
    return mem


def test_a_million_random_tokens_stay_finite() -> None:
    mem = hostile(0)
    state = None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(1_000_000 // 8192):
            x = 3.0 * torch.randn(1, 8192, 16, generator=g)
            y, state = mem(x, state)
            assert torch.isfinite(y).all()
    assert state.non_finite() == {}
    assert int(state.tokens[0]) == 1_000_000 // 8192 * 8192 >= 999_000
    assert max(float(w.abs().max()) for w in state.weights) < 1e4


def test_the_plain_update_diverges_and_is_reported() -> None:
    """Without the normalised step and the update cap the chunked MLP update blows up
    (docs/TRAINING.md); the memory must say which state went bad."""
    torch.manual_seed(0)
    cfg = MemoryConfig(
        dim=16, heads=1, depth=2, chunk_size=64, step_bias=4.0, momentum_bias=3.0,
        normalize_step=False, max_update_norm=None,
    )  # fmt: skip
    mem = NeuralMemory(cfg)
    state = None
    with torch.no_grad(), pytest.raises(NonFiniteStateError) as err:
        for _ in range(200):
            _, state = mem(3.0 * torch.randn(1, 512, 16), state)
    assert "weights" in str(err.value)
    assert err.value.bad  # names the tensors and streams


def test_a_non_finite_input_state_is_reported_with_its_stream() -> None:
    mem = make_memory(dtype=torch.float32)
    _, state = mem(torch.randn(3, 5, 16))
    bad = state.clone()
    bad.weights[0][1, 0, 0, 0] = float("nan")
    assert bad.non_finite() == {"weights.0": [1]}
    with pytest.raises(NonFiniteStateError, match=r"weights\.0 \(streams \[1\]\)"):
        mem(torch.randn(3, 8, 16), bad)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_model_keeps_a_float32_state(device: str) -> None:
    mem32 = make_memory(dtype=torch.float32, lookahead=True).to(device)
    mem16 = make_memory(dtype=torch.float32, lookahead=True).to(device, torch.bfloat16)
    x = torch.randn(2, 37, 16, device=device)
    y32, s32 = mem32(x)
    y16, s16 = mem16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert all(w.dtype == torch.float32 for w in s16.weights)
    assert torch.isfinite(y16.float()).all()
    # bfloat16 projections, float32 memory math: close to the float32 model.
    assert (y16.float() - y32).abs().mean() < 0.05 * y32.abs().mean() + 1e-3
    torch.testing.assert_close(s16.weights[0], s32.weights[0], rtol=0.1, atol=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_every_available_device(device: str) -> None:
    mem = make_memory(dtype=torch.float32).to(device)
    y, state = mem(torch.randn(2, 9, 16, device=device))
    assert y.device.type == device and state.weights[0].device.type == device
