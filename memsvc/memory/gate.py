"""The seed's write gate and adaptive forgetting, applied once per chunk and stream.

Exact formulas (B streams; `surprise` is the L2 norm, over every layer and
head, of the mean per-token gradient of the chunk's inner loss at the
chunk-start weights):

    surprise_ema' = surprise_beta * surprise_ema + (1 - surprise_beta) * surprise
    write         = (tau == 0) or (surprise_ema' > tau)              gate "absolute"
    write         = (tau == 0) or (surprise > tau * surprise_ema)    gate "relative"
    write_rate'   = write_rate_beta * write_rate + (1 - write_rate_beta) * write
    lambda        = min(lambda_max, lambda_0 / max(write_rate', min_write_rate))

A written chunk's new weights are scaled by (1 - lambda) when adaptive
forgetting is on: frequent writes keep lambda near lambda_0 so new facts are not
erased at once; sparse writes let it grow (up to lambda_max) to clear old ones.
The relative gate compares a chunk with the recent surprise of its own stream and block
(the EMA before the chunk; the first chunk, against an EMA of 0, is written), so one tau
serves blocks whose surprise levels differ: on stationary filler it writes the chunks
above the running mean, and a chunk that brings something new stands out of it.
A skipped chunk leaves weights and momentum untouched (nothing decays while
nothing is written) but still advances the counters. write_rate starts at 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memsvc.memory.config import MemoryConfig


@dataclass
class GateDecision:
    write: Tensor  # (B,) bool
    surprise_ema: Tensor  # (B,)
    write_rate: Tensor  # (B,)
    forget: Tensor  # (B,) lambda applied to written weights (0 when off)


@dataclass(frozen=True)
class WriteGate:
    tau: float
    surprise_beta: float
    relative: bool
    adaptive_forgetting: bool
    lambda_0: float
    lambda_max: float
    min_write_rate: float
    write_rate_beta: float

    @classmethod
    def from_config(cls, config: MemoryConfig) -> WriteGate:
        return cls(
            tau=config.tau,
            surprise_beta=config.surprise_beta,
            relative=config.gate == "relative",
            adaptive_forgetting=config.adaptive_forgetting,
            lambda_0=config.lambda_0,
            lambda_max=config.lambda_max,
            min_write_rate=config.min_write_rate,
            write_rate_beta=config.write_rate_beta,
        )

    @property
    def open(self) -> bool:
        """Every chunk is written as it is: no threshold, no adaptive forgetting."""
        return self.tau == 0 and not self.adaptive_forgetting

    def advance_open(
        self, surprise: Tensor, surprise_ema: Tensor, write_rate: Tensor
    ) -> tuple[Tensor, Tensor]:
        """`decide` over M chunks at once for an open gate (every write=True), in closed
        form: surprise (M, B) -> the EMA and write rate after the M-th chunk."""
        m = surprise.shape[0]
        b, r = self.surprise_beta, self.write_rate_beta
        powers = b ** torch.arange(m - 1, -1, -1, dtype=surprise.dtype, device=surprise.device)
        ema = b**m * surprise_ema + (1.0 - b) * (powers[:, None] * surprise).sum(0)
        return ema, r**m * write_rate + (1.0 - r**m)

    def decide(self, surprise: Tensor, surprise_ema: Tensor, write_rate: Tensor) -> GateDecision:
        b = self.surprise_beta
        ema = b * surprise_ema + (1.0 - b) * surprise
        if self.tau == 0:
            write = torch.ones_like(ema, dtype=torch.bool)
        elif self.relative:
            write = surprise > self.tau * surprise_ema
        else:
            write = ema > self.tau
        r = self.write_rate_beta
        rate = r * write_rate + (1.0 - r) * write.to(write_rate.dtype)
        if self.adaptive_forgetting:
            forget = (self.lambda_0 / rate.clamp_min(self.min_write_rate)).clamp_max(
                self.lambda_max
            )
        else:
            forget = torch.zeros_like(rate)
        return GateDecision(write=write, surprise_ema=ema, write_rate=rate, forget=forget)
