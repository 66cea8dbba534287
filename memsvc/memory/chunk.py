"""One chunk's write with gradients at the chunk-start weights (matrix-product form).

For a chunk of C tokens and N = batch * heads memories:
  1. forward the keys through M_0, keep each layer's inputs H_l and
     pre-activations;
  2. back-propagate the objective's gradient to get G_l = d loss_i / d z_l;
  3. the per-token weight gradient of layer l is u_i = H_l[i] G_l[i]^T, so the
     weighted sum the optimiser needs is one matmul, H_l^T (G_l * w); the
     per-token gradients are never materialised;
  4. the NLMS normaliser divides each token's step by the curvature bound, and
     the chunk's update is capped in Frobenius norm (max_update_norm).
The surprise (norm of the mean raw gradient) uses the Gram identity
||sum_i h_i g_i^T||_F^2 = sum_ij (g_i . g_j)(h_i . h_j): C x C products, no
extra (out x in) matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memsvc.memory.config import MemoryConfig
from memsvc.memory.mlp import MLPMemory
from memsvc.memory.objective import Objective
from memsvc.memory.optimizer import InnerOptimizer


@dataclass
class ChunkWrite:
    weights: list[Tensor]  # (N, in, out) after the chunk, before the write gate
    momentum: list[Tensor]  # same; [] without momentum
    surprise_sq: Tensor  # (N,) ||mean per-token gradient||^2 over all layers
    reads: Tensor | None  # (N, R, d) M_0(q) for the queries passed in


def chunk_write(
    config: MemoryConfig,
    arch: MLPMemory,
    objective: Objective,
    optimizer: InnerOptimizer,
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,  # (N, C, d)
    v: Tensor,  # (N, C, d)
    gates: Tensor,  # (N, C, 3) theta, eta, alpha
    q: Tensor | None = None,  # (N, R, d) reads at the same chunk-start weights
) -> ChunkWrite:
    n_tok = k.shape[1]
    # One forward pass serves the write (keys) and the reads (queries): same weights.
    trace = arch.trace(weights, k if q is None else torch.cat([k, q], dim=1))
    reads = None if q is None else trace.out[:, n_tok:]
    if q is not None:
        trace = trace.head(n_tok)
    grads = arch.backward(weights, trace, objective.grad(trace.out - v))  # G_l (N, C, out_l)

    # gram[n, i, j] = <u_i, u_j> summed over layers: the surprise and the update's
    # norm both come from it without forming any (out x in) matrix.
    gram = sum(
        torch.bmm(g, g.transpose(1, 2)) * torch.bmm(h, h.transpose(1, 2))
        for g, h in zip(grads, trace.inputs, strict=True)
    )
    surprise_sq = gram.sum((1, 2)) / (n_tok * n_tok)

    theta, eta, alpha = gates.unbind(-1)
    if config.normalize_step:
        theta = theta / arch.curvature(weights, trace)
    coef = optimizer.coefficients(theta, eta, alpha)
    w, ws = coef.w, coef.ws
    if config.max_update_norm is not None:
        # ||sum_i w_i u_i||_F^2 = w^T gram w; scaling the steps scales the momentum's share too.
        norm = torch.sqrt(torch.einsum("ni,nij,nj->n", w, gram, w).clamp_min(0.0))
        scale = (config.max_update_norm / norm.clamp_min(1e-30)).clamp_max(1.0).unsqueeze(-1)
        w = w * scale
        ws = None if ws is None else w if coef.shared else ws * scale

    # New weights accumulate in place on fresh GEMM outputs, so each big matrix is
    # read once and written once (no separate scale / copy passes).
    beta = coef.beta.view(-1, 1, 1)
    new_w, new_s = [], []
    for layer, (g, h) in enumerate(zip(grads, trace.inputs, strict=True)):
        if coef.shared:  # S_C = e S_0 - U, M_C = beta M_0 + S_C
            s_new = torch.bmm(h.transpose(1, 2), g * -w.unsqueeze(-1))
            s_new.addcmul_(momentum[layer], coef.e.view(-1, 1, 1))
            new_s.append(s_new)
            new_w.append(torch.addcmul(s_new, weights[layer], beta))
            continue
        m_new = torch.bmm(h.transpose(1, 2), g * -w.unsqueeze(-1)).addcmul_(weights[layer], beta)
        if ws is not None:
            s0 = momentum[layer]
            m_new.addcmul_(s0, coef.c.view(-1, 1, 1))
            s_new = torch.bmm(h.transpose(1, 2), g * -ws.unsqueeze(-1))
            new_s.append(s_new.addcmul_(s0, coef.e.view(-1, 1, 1)))
        new_w.append(m_new)
    return ChunkWrite(weights=new_w, momentum=new_s, surprise_sq=surprise_sq, reads=reads)


def fused_chunk_write(
    config: MemoryConfig,
    arch: MLPMemory,
    objective: Objective,
    optimizer: InnerOptimizer,
    weights: list[Tensor],
    momentum: list[Tensor],
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    q: Tensor | None = None,
) -> ChunkWrite:
    """`chunk_write` through kernels.lmm's dispatch point: its Triton kernel (one launch for
    all N memories) where it applies (CUDA, Triton importable, float32 / bfloat16, no
    autograd through the update), `chunk_write` itself otherwise."""
    from kernels.lmm import chunk_update  # on first use: kernels.lmm builds on this module

    return chunk_update(config, weights, momentum, k, v, gates, q)
