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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.segsum import segsum


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


@dataclass
class DeltaPlan:
    """Everything about M whole chunks that does not depend on the weights, computed for
    all of them at once; `apply` then walks the chunks in order with four small GEMMs
    each. Equal to `delta_chunk` chunk by chunk (tests/kernels/test_delta_rule.py).

    With T = I + A (the chunk's unit lower-triangular system) solved once per chunk:

        U   = T^-1 (theta V) - T^-1 (theta gamma K) W_0     = u0 - wk @ W_0
        Y   = gamma Q W_0 + (Gam * Q K^T) U                 = gq @ W_0 + qk @ U
        W_C = gamma_C W_0 + (Gam[C] K)^T U                  = gamma_c W_0 + kd^T @ U
        ||K^T (K W_0 - V)||^2 / n^2                         = ||ktk @ W_0 - ktv||^2 / n^2
    """

    u0: Tensor  # (M, N, n, d_v)
    wk: Tensor  # (M, N, n, d_k)
    gq: Tensor  # (M, N, n, d_k) gamma-scaled queries
    qk: Tensor  # (M, N, n, n)
    gamma_c: Tensor  # (M, N, 1, 1)
    kd_t: Tensor  # (M, N, d_k, n)
    ktk: Tensor  # (M, N, d_k, d_k)
    ktv: Tensor  # (M, N, d_k, d_v)

    @property
    def chunks(self) -> int:
        return self.u0.shape[0]

    def apply(self, i: int, w0: Tensor) -> DeltaChunk:
        """Chunk i from the weights before it. w0: (N, d_k, d_v)."""
        y, w_end = self.read_write(i, w0)
        surprise_sq = self.surprise_sq(i, w0[None])[0]
        return DeltaChunk(outputs=y, weights=w_end, surprise_sq=surprise_sq)

    def read_write(self, i: int, w0: Tensor) -> tuple[Tensor, Tensor]:
        """Chunk i's outputs (N, n, d_v) and chunk-end weights (N, d_k, d_v)."""
        u = self.u0[i] - torch.bmm(self.wk[i], w0)  # (N, n, d_v)
        y = torch.baddbmm(torch.bmm(self.qk[i], u), self.gq[i], w0)
        return y, torch.baddbmm(self.gamma_c[i] * w0, self.kd_t[i], u)

    def surprise_sq(self, first: int, w0s: Tensor) -> Tensor:
        """||mean gradient at W_0||^2 of chunks first.. from their start weights
        w0s (M', N, d_k, d_v); returns (M', N)."""
        rows = slice(first, first + w0s.shape[0])
        n = self.u0.shape[2]
        residual = torch.matmul(self.ktk[rows], w0s) - self.ktv[rows]
        return residual.square().sum((-2, -1)) / (n * n)


def delta_plan(
    q: Tensor, k: Tensor, v: Tensor, theta: Tensor, alpha: Tensor, chunk: int
) -> DeltaPlan:
    """The plan of M whole chunks of N memories, every chunk reading all its queries:
    q, k (N, M*chunk, d_k), v (N, M*chunk, d_v), theta, alpha (N, M*chunk)."""
    big_n, length, d_k = k.shape
    n, m = chunk, length // chunk

    def chunks(x: Tensor) -> Tensor:  # (N, M*n, ...) -> (M, N, n, ...)
        return x.reshape(big_n, m, n, *x.shape[2:]).transpose(0, 1).contiguous()

    q, k, v, theta, alpha = (chunks(x) for x in (q, k, v, theta, alpha))
    cum = torch.log1p(-alpha).cumsum(-1)  # (M, N, n)
    gamma = torch.exp(cum)
    # Gam[t, s] = exp(cum_t - cum_s) below the diagonal: a difference of sums of at most
    # n log-gates, exact enough at float32 for any alpha < 1 (Gam, not 1 - Gam, is used),
    # and a third of segsum's passes over the (n, n) blocks of every chunk.
    lower = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
    gam = torch.exp((cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill_(~lower, -math.inf))

    k_t = k.transpose(-1, -2)  # (M, N, d_k, n)
    kk = k @ k_t
    # I + A with A strictly lower: Gam is zero above the diagonal, and a unitriangular
    # solve never reads the diagonal, so theta * Gam * KK^T stands for I + A as it is.
    system = theta.unsqueeze(-1) * gam * kk
    rhs = torch.cat([theta.unsqueeze(-1) * v, (theta * gamma).unsqueeze(-1) * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u0, wk = solved.split([v.shape[-1], d_k], dim=-1)
    return DeltaPlan(
        u0=u0,
        wk=wk,
        gq=gamma.unsqueeze(-1) * q,
        qk=(q @ k_t) * gam,
        gamma_c=gamma[..., -1, None, None],
        kd_t=k_t * gam[..., -1, :].unsqueeze(-2),
        ktk=k_t @ k,
        ktv=k_t @ v,
    )
