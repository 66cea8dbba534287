"""The gated delta rule token by token: the reference `delta_chunk` must match.

    W <- (1 - alpha_t) W;   W <- W - theta_t k_t (k_t . W - v_t);   y_t = q_t . W

with W stored transposed, (d_k, d_v), as every memory weight is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.delta_rule.chunk import DeltaChunk


def delta_rule_naive(
    w0: Tensor,  # (N, d_k, d_v)
    q: Tensor,  # (N, n_read, d_k) queries of the chunk's last n_read tokens
    k: Tensor,  # (N, n, d_k)
    v: Tensor,  # (N, n, d_v)
    theta: Tensor,  # (N, n)
    alpha: Tensor,  # (N, n)
) -> DeltaChunk:
    """One chunk for N memories, one memory and one token at a time. The surprise is the
    squared norm of the mean MSE gradient at the chunk-start weights w0."""
    n, n_read = k.shape[1], q.shape[1]
    outputs, ends, surprise = [], [], []
    for m in range(k.shape[0]):
        w, ys = w0[m], []
        for t in range(n):
            w = (1 - alpha[m, t]) * w
            w = w - theta[m, t] * torch.outer(k[m, t], k[m, t] @ w - v[m, t])
            if t >= n - n_read:
                ys.append(q[m, t - (n - n_read)] @ w)
        grad = sum(torch.outer(k[m, t], k[m, t] @ w0[m] - v[m, t]) for t in range(n)) / n
        outputs.append(torch.stack(ys) if ys else q.new_zeros(0, v.shape[-1]))
        ends.append(w)
        surprise.append(grad.pow(2).sum())
    return DeltaChunk(
        outputs=torch.stack(outputs), weights=torch.stack(ends), surprise_sq=torch.stack(surprise)
    )
