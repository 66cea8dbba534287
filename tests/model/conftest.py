from __future__ import annotations

import torch

from memsvc.memory import MemoryConfig
from memsvc.model import MAGModel, ModelConfig


def small_config(**overrides) -> ModelConfig:
    """A tiny MAG model: 2 layers, window 8, memory chunks of 4 (so every path runs)."""
    memory = MemoryConfig(
        dim=32,
        heads=2,
        depth=1,
        chunk_size=4,
        lookahead=True,
        update_rule="delta",
        optimizer="sgd",
        conv_size=4,
    )
    base = {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "window": 8,
        "n_persistent": 2,
        "ffn_mult": 2.0,
        "memory": memory,
    }
    return ModelConfig(**{**base, **overrides})


def small_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> MAGModel:
    torch.manual_seed(seed)
    model = MAGModel(small_config(**overrides)).to(dtype)
    with torch.no_grad():  # larger weights than at init, so every branch matters
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "memory" not in name:
                p.normal_(std=0.2)
    return model
