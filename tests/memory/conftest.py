from __future__ import annotations

import pytest
import torch

from memsvc.memory import MemoryConfig, NeuralMemory


def make_memory(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> NeuralMemory:
    """A small memory with non-trivial initial weights and gates (so every path is exercised)."""
    torch.manual_seed(seed)
    cfg = MemoryConfig(
        **{"dim": 16, "heads": 2, "depth": 2, "expansion": 2.0, "chunk_size": 4, **overrides}
    )
    mem = NeuralMemory(cfg).to(dtype)
    with torch.no_grad():
        for w in mem.initial_weights:
            w.normal_(std=0.5)
        mem.to_gates.weight.normal_(std=0.3)
        mem.conv_weight.normal_(std=0.5)
        if mem.config.forget_bias < -5:
            mem.to_gates.bias[2 * cfg.heads :] = -3.0  # visible forgetting in tests
    return mem


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
