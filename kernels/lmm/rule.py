"""What a chunk update needs to know besides its tensors, and what it returns.

The memory's shapes come from the tensors themselves (weights per layer (N, in, out),
depth = number of layers); `ChunkRule` holds only the choices that change the math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Activation = Literal["gelu", "silu"]
Objective = Literal["mse", "huber", "lp"]
Optimizer = Literal["momentum", "chunk_momentum", "sgd"]


@dataclass(frozen=True)
class ChunkRule:
    """The update rule of one chunk: memory activation, inner objective and optimiser,
    NLMS step normaliser and the cap on the update's Frobenius norm (None: no cap)."""

    activation: Activation = "gelu"
    objective: Objective = "mse"
    huber_delta: float = 1.0
    lp_p: float = 1.5
    optimizer: Optimizer = "momentum"
    normalize_step: bool = True
    max_update_norm: float | None = 10.0

    @property
    def has_momentum(self) -> bool:
        return self.optimizer in ("momentum", "chunk_momentum")


@dataclass
class ChunkWrite:
    """One chunk's result for N memories."""

    weights: list[Tensor]  # (N, in, out) after the chunk, before any write gate
    momentum: list[Tensor]  # same; [] without momentum
    surprise_sq: Tensor  # (N,) ||mean per-token gradient||^2 over all layers
    reads: Tensor | None  # (N, R, d) M_0(q) for the queries passed in
