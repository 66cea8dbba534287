"""MIRAS retention gate: how much of the old memory each token keeps.

Retention turns the forget logit into alpha_t, the per-token decay in
`M_t = (1 - alpha_t) M_{t-1} + S_t`. L2 retention is weight decay (a learned,
data-dependent alpha_t); `none` keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from memsvc.memory.config import MemoryConfig


class Retention(Protocol):
    def forget(self, logits: Tensor) -> Tensor:
        """alpha_t in [0, max_forget) from the forget logits."""
        ...


@dataclass(frozen=True)
class L2Decay:
    max_forget: float

    def forget(self, logits: Tensor) -> Tensor:
        return self.max_forget * torch.sigmoid(logits)


@dataclass(frozen=True)
class NoRetention:
    def forget(self, logits: Tensor) -> Tensor:
        return torch.zeros_like(logits)


def make_retention(config: MemoryConfig) -> Retention:
    if config.retention == "l2":
        return L2Decay(config.max_forget)
    return NoRetention()
