"""The memory architecture: an MLP evaluated at per-stream weights.

`M(x) = x + act(... act(x W_1) ...) W_L` for depth >= 2 (residual MLP); depth 1
is the linear matrix memory `M(x) = x W`. Weights are plain tensors of shape
(N, in, out), one set per stream and head, so one batched matmul serves many
sessions; (in, out) makes both the forward `H W` and the gradient sum
`H^T (G * w)` plain GEMMs whose output is already in the weights' layout.
Forward and backward are written out by hand: the chunk update needs the
per-layer output gradients G_l and inputs H_l, never per-token weight
gradients (those would be (N, C, in, out)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.lmm.rule import Activation


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


# activation, its derivative, and sup |derivative| (for the curvature bound)
_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], float]] = {
    "gelu": (F.gelu, _gelu_grad, 1.129),
    "silu": (F.silu, _silu_grad, 1.100),
}


@dataclass
class Trace:
    """What the backward pass needs from a forward pass at fixed weights."""

    inputs: list[Tensor]  # H_l: input of layer l, (N, T, in_l)
    pre: list[Tensor]  # z_l: pre-activation of hidden layer l (all but the last)
    out: Tensor  # (N, T, d)

    def head(self, n: int) -> Trace:
        """The trace of the first n tokens only."""
        return Trace(
            inputs=[h[:, :n] for h in self.inputs],
            pre=[z[:, :n] for z in self.pre],
            out=self.out[:, :n],
        )


class MLPMemory:
    """Stateless math of the memory network (no parameters of its own)."""

    def __init__(self, depth: int, activation: Activation) -> None:
        self.depth = depth
        self.residual = depth >= 2
        self.act, self.act_grad, self.act_bound = _ACTIVATIONS[activation]

    def init_weights(
        self, shapes: list[tuple[int, int]], generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Initial weights for one head. Keys are unit-norm, so the first layer is
        drawn at std 1 (std 1/sqrt(d) leaves every hidden unit near zero and
        recall never starts: docs/TRAINING.md); the last layer starts at zero
        so a fresh memory is the identity (depth >= 2) or empty (depth 1)."""
        weights = []
        for layer, (i, o) in enumerate(shapes):
            if layer == self.depth - 1:
                weights.append(torch.zeros(i, o))
            elif layer == 0:
                weights.append(torch.randn(i, o, generator=generator))
            else:
                weights.append(torch.randn(i, o, generator=generator) / math.sqrt(i))
        return weights

    def forward(self, weights: list[Tensor], x: Tensor) -> Tensor:
        """x: (N, T, d) -> M(x): (N, T, d)."""
        h = x
        for layer, w in enumerate(weights):
            z = torch.bmm(h, w)
            h = self.act(z) if layer < self.depth - 1 else z
        return h + x if self.residual else h

    def trace(self, weights: list[Tensor], x: Tensor) -> Trace:
        inputs, pre = [], []
        h = x
        for layer, w in enumerate(weights):
            inputs.append(h)
            z = torch.bmm(h, w)
            if layer < self.depth - 1:
                pre.append(z)
                h = self.act(z)
            else:
                h = z
        return Trace(inputs=inputs, pre=pre, out=h + x if self.residual else h)

    def backward(self, weights: list[Tensor], trace: Trace, g_out: Tensor) -> list[Tensor]:
        """Gradient of the loss w.r.t. each layer's pre-activation, G_l: (N, T, out_l).

        The per-token weight gradient of layer l is the outer product H_l[t] G_l[t]^T.
        """
        grads = [g_out]
        g = g_out
        for layer in range(self.depth - 2, -1, -1):
            g = torch.bmm(g, weights[layer + 1].transpose(1, 2)) * self.act_grad(trace.pre[layer])
            grads.append(g)
        grads.reverse()
        return grads

    def curvature(self, weights: list[Tensor], trace: Trace) -> Tensor:
        """Per-token bound on ||d M(k) / d weights||^2, floored at 1: (N, T).

        Dividing the step by it (NLMS) makes one token's write move the memory's
        output by at most theta times the residual, whatever the weights' size.
        """
        total = trace.inputs[-1].pow(2).sum(-1)
        chain = torch.ones_like(total[:, :1])
        for layer in range(self.depth - 2, -1, -1):
            w_next = weights[layer + 1]
            norm_sq = torch.linalg.vector_norm(w_next, dim=(1, 2)).square()
            chain = chain * (norm_sq.unsqueeze(1) * self.act_bound**2)
            total = total + trace.inputs[layer].pow(2).sum(-1) * chain
        return total.clamp_min(1.0)
