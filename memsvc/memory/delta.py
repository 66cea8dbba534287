"""The exact within-chunk gated delta rule for a matrix memory (depth 1, MSE, no momentum).

Per token t (every token's gradient is taken at the weights after the token
before it, as Gated DeltaNet computes it; decay first, then the delta write):

    W_t = a_t W_{t-1} - theta_t (a_t W_{t-1} k_t - v_t) k_t^T        y_t = W_t q_t

(written as W v-by-k here; the code stores its transpose, (d_k, d_v), like every
memory weight: rows index the input).

Chunk form (WY representation). With Gam[t, s] = prod_{m=s+1..t} a_m and
gamma_t = prod_{m<=t} a_m inside the chunk, W_t = gamma_t W_0 + sum_{s<=t}
Gam[t, s] u_s k_s^T where the pseudo-values u solve the unit lower-triangular
system

    (I + A) U = theta * (V - gamma * K W_0^T),   A[s, r] = theta_s Gam[s, r] (k_s . k_r), r < s.

Outputs Y = gamma * Q W_0^T + tril(Gam * Q K^T) U, and the chunk-end weights
W_C = gamma_C W_0 + sum_s Gam[C, s] u_s k_s^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memsvc.memory.optimizer import segsum


@dataclass
class DeltaChunk:
    outputs: Tensor  # (N, n_read, d)
    weights: Tensor  # (N, d_k, d_v) after the whole chunk (before the write gate)
    surprise_sq: Tensor  # (N,) ||mean gradient at W_0||^2


def delta_chunk(
    w0: Tensor,  # (N, d_k, d_v): the transpose of W
    q: Tensor,  # (N, n_read, d_k) queries of the chunk's last n_read tokens
    k: Tensor,  # (N, n, d_k)
    v: Tensor,  # (N, n, d_v)
    theta: Tensor,  # (N, n)
    alpha: Tensor,  # (N, n)
) -> DeltaChunk:
    n, n_read = k.shape[1], q.shape[1]
    log_a = torch.log1p(-alpha)
    gam = torch.exp(segsum(log_a))  # (N, n, n), zero above the diagonal
    gamma = torch.exp(log_a.cumsum(-1))  # (N, n)

    kw = torch.bmm(k, w0)  # (N, n, d_v)
    kk = torch.bmm(k, k.transpose(1, 2))
    a = (theta.unsqueeze(-1) * gam * kk).tril(-1)
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    rhs = theta.unsqueeze(-1) * (v - gamma.unsqueeze(-1) * kw)
    u = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)

    rows = slice(n - n_read, n)
    qk = torch.bmm(q, k.transpose(1, 2)) * gam[:, rows]
    y = gamma[:, rows].unsqueeze(-1) * torch.bmm(q, w0) + torch.bmm(qk, u)

    w_end = gamma[:, -1].view(-1, 1, 1) * w0 + torch.bmm(
        k.transpose(1, 2), u * gam[:, -1].unsqueeze(-1)
    )

    g = kw - v  # per-token MSE gradient at W_0 is g_i k_i^T
    surprise_sq = (torch.bmm(g, g.transpose(1, 2)) * kk).sum((1, 2)) / (n * n)
    return DeltaChunk(outputs=y, weights=w_end, surprise_sq=surprise_sq)
