"""MIRAS inner optimiser: how a chunk's gradients become a weight change.

Per token i of a chunk (gradients u_i all taken at the chunk-start weights M_0):

    S_i = eta_i * S_{i-1} - theta_i * u_i          (momentum: "past surprise")
    M_i = a_i * M_{i-1} + S_i                       (a_i = 1 - alpha_i: retention)

is linear in (M_0, S_0, u_1..u_C), so the chunk's effect is a handful of scalars:

    M_C = beta * M_0 + c * S_0 - sum_i w_i u_i
    S_C = e * S_0 - sum_i ws_i u_i

The optimiser computes those scalars from the per-token gates with cumulative
products (in log space, as segment sums, so nothing is divided by a tiny
cumulative product). Plain SGD is the special case eta = 0 (no momentum state).

`ChunkMomentumSGD` is the coarser recurrence titans-pytorch runs: momentum and
forgetting step once per chunk, with the chunk's mean eta and alpha, over the
chunk's theta-weighted gradient sum (S_C = eta S_0 - sum_i theta_i u_i,
M_C = (1 - alpha) M_0 + S_C). Its two sums share their weights, so a chunk
costs one gradient matmul per layer instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from kernels.lmm.rule import Optimizer
from kernels.segsum import segsum, suffix_exclusive_sum


@dataclass
class ChunkCoefficients:
    """Scalars of one chunk's update, for N = batch * heads independent memories."""

    beta: Tensor  # (N,) weight of M_0 in M_C
    w: Tensor  # (N, C) weight of u_i in M_C (enters with a minus sign)
    c: Tensor | None = None  # (N,) weight of S_0 in M_C
    e: Tensor | None = None  # (N,) weight of S_0 in S_C
    ws: Tensor | None = None  # (N, C) weight of u_i in S_C (minus sign)
    shared: bool = False  # ws == w and c == e: S_C is computed once and reused for M_C


class InnerOptimizer(Protocol):
    has_momentum: bool

    def coefficients(self, theta: Tensor, eta: Tensor, alpha: Tensor) -> ChunkCoefficients:
        """theta, eta, alpha: (N, C) per-token step, momentum, forgetting."""
        ...


@dataclass(frozen=True)
class SGD:
    """M_i = a_i M_{i-1} - theta_i u_i."""

    has_momentum: bool = False

    def coefficients(self, theta: Tensor, eta: Tensor, alpha: Tensor) -> ChunkCoefficients:
        log_a = torch.log1p(-alpha)
        tail = torch.exp(suffix_exclusive_sum(log_a))  # F_i = prod_{m>i} a_m
        return ChunkCoefficients(beta=torch.exp(log_a.sum(-1)), w=theta * tail)


@dataclass(frozen=True)
class MomentumSGD:
    """The Titans update: momentum over surprise, then retention."""

    has_momentum: bool = True

    def coefficients(self, theta: Tensor, eta: Tensor, alpha: Tensor) -> ChunkCoefficients:
        log_a = torch.log1p(-alpha)
        log_eta = torch.log(eta)
        tail = torch.exp(suffix_exclusive_sum(log_a))  # F_i (N, C)
        decay = torch.exp(segsum(log_eta))  # D[i, j] = prod_{m=j+1..i} eta_m (N, C, C)
        carried = torch.exp(log_eta.cumsum(-1))  # E_i = prod_{m<=i} eta_m
        w = theta * torch.einsum("ni,nij->nj", tail, decay)
        return ChunkCoefficients(
            beta=torch.exp(log_a.sum(-1)),
            w=w,
            c=(tail * carried).sum(-1),
            e=carried[:, -1],
            ws=theta * decay[:, -1, :],
        )


@dataclass(frozen=True)
class ChunkMomentumSGD:
    """Momentum and retention per chunk (mean gates), step size per token."""

    has_momentum: bool = True

    def coefficients(self, theta: Tensor, eta: Tensor, alpha: Tensor) -> ChunkCoefficients:
        eta_c = eta.mean(-1)
        return ChunkCoefficients(
            beta=1.0 - alpha.mean(-1), w=theta, c=eta_c, e=eta_c, ws=theta, shared=True
        )


def make_optimizer(name: Optimizer) -> InnerOptimizer:
    if name == "momentum":
        return MomentumSGD()
    if name == "chunk_momentum":
        return ChunkMomentumSGD()
    return SGD()
