from __future__ import annotations

import pytest
import torch

from memsvc.engine import StreamingEngine
from memsvc.memory import MemoryConfig
from memsvc.model import MAGModel, ModelConfig

CHUNK = 8  # the memory chunk of the tiny model


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> MAGModel:
    """d_model 32, 2 layers, window 16, memory chunks of 8; weights larger than at
    init so that every branch changes the logits."""
    memory = MemoryConfig(
        dim=32,
        heads=2,
        depth=1,
        chunk_size=CHUNK,
        lookahead=True,
        update_rule="delta",
        optimizer="sgd",
        conv_size=4,
    )
    config = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, window=16, n_persistent=2, ffn_mult=2.0, memory=memory
    )
    torch.manual_seed(seed)
    model = MAGModel(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "memory" not in name:
                p.normal_(std=0.2)
    return model


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engines() -> tuple[StreamingEngine, StreamingEngine]:
    """The tiny model on the decoder (fast) and on the chunk path one token at a time."""
    model = tiny_model(0)
    return StreamingEngine(model, max_segment=2 * CHUNK), StreamingEngine(
        model, max_segment=2 * CHUNK, fast_decode=False
    )
