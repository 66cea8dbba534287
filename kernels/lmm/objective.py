"""MIRAS attentional bias: the inner loss between the memory's output and the value.

Each objective gives the per-token loss and its gradient with respect to the
memory's output (the residual r = M(k) - v). The gradient is what the update
rule back-propagates through the memory; `loss` exists for references and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from kernels.lmm.rule import ChunkRule


class Objective(Protocol):
    def loss(self, r: Tensor) -> Tensor:
        """Per-token loss, summed over the feature dim: (..., d) -> (...)."""
        ...

    def grad(self, r: Tensor) -> Tensor:
        """d loss / d r, same shape as r."""
        ...


@dataclass(frozen=True)
class MSE:
    """0.5 * ||r||^2, so the gradient is r itself (the delta rule)."""

    def loss(self, r: Tensor) -> Tensor:
        return 0.5 * r.pow(2).sum(-1)

    def grad(self, r: Tensor) -> Tensor:
        return r


@dataclass(frozen=True)
class Huber:
    """Quadratic within +-delta, linear outside: robust to outlier values (YAAD)."""

    delta: float = 1.0

    def loss(self, r: Tensor) -> Tensor:
        a = r.abs()
        quad = 0.5 * r.pow(2)
        lin = self.delta * (a - 0.5 * self.delta)
        return torch.where(a <= self.delta, quad, lin).sum(-1)

    def grad(self, r: Tensor) -> Tensor:
        return r.clamp(-self.delta, self.delta)


@dataclass(frozen=True)
class Lp:
    """sum |r|^p / p for p >= 1."""

    p: float = 1.5

    def loss(self, r: Tensor) -> Tensor:
        return r.abs().pow(self.p).sum(-1) / self.p

    def grad(self, r: Tensor) -> Tensor:
        if self.p == 1:
            return r.sign()
        return r.sign() * r.abs().pow(self.p - 1)


def make_objective(rule: ChunkRule) -> Objective:
    if rule.objective == "mse":
        return MSE()
    if rule.objective == "huber":
        return Huber(rule.huber_delta)
    return Lp(rule.lp_p)
