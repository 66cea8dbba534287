"""The chunk update in PyTorch: gradients at the chunk-start weights, in matrix-product form.

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

`chunk_update_torch` serves a batch where memory n writes only its first
n_valid[n] tokens (a partial chunk is a shorter chunk; 0 tokens leave weights and
momentum as they are, with surprise 0), and runs the math in float32 at least:
bfloat16 weights are widened, updated and rounded back once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.lmm.mlp import MLPMemory
from kernels.lmm.objective import Objective, make_objective
from kernels.lmm.optimizer import InnerOptimizer, make_optimizer
from kernels.lmm.rule import ChunkRule, ChunkWrite


def chunk_update_torch(
    rule: ChunkRule,
    weights: Sequence[Tensor],  # per layer (N, in, out)
    momentum: Sequence[Tensor],  # per layer like weights; () without momentum
    k: Tensor,  # (N, C, d)
    v: Tensor,  # (N, C, d)
    gates: Tensor,  # (N, C, 3) theta, eta, alpha
    q: Tensor | None = None,  # (N, R, d) reads at the chunk-start weights
    n_valid: Tensor | None = None,  # (N,) tokens of the chunk each memory writes; None: all C
) -> ChunkWrite:
    """New weights and momentum (in the weights' dtype), surprise^2 and reads (float32+)."""
    arch = MLPMemory(len(weights), rule.activation)
    objective, optimizer = make_objective(rule), make_optimizer(rule.optimizer)
    store = weights[0].dtype
    math = torch.promote_types(store, torch.float32)
    w = [x.to(math) for x in weights]
    s = [x.to(math) for x in momentum]
    k, v, gates = k.to(math), v.to(math), gates.to(math)
    q = None if q is None else q.to(math)
    full = k.shape[1]
    counts = [full] * k.shape[0] if n_valid is None else [int(c) for c in n_valid.tolist()]

    if all(c == full for c in counts):
        out = _chunk_write(rule, arch, objective, optimizer, w, s, k, v, gates, q)
    else:
        out = _ragged(rule, arch, objective, optimizer, w, s, k, v, gates, q, counts)
    return ChunkWrite(
        weights=[x.to(store) for x in out.weights],
        momentum=[x.to(store) for x in out.momentum],
        surprise_sq=out.surprise_sq,
        reads=out.reads,
    )


def _ragged(rule, arch, objective, optimizer, w, s, k, v, gates, q, counts) -> ChunkWrite:
    """_chunk_write once per distinct valid length, on the memories that have it."""
    new_w = [x.clone() for x in w]
    new_s = [x.clone() for x in s]
    surprise_sq = k.new_zeros(k.shape[0])
    for n in sorted(set(counts) - {0}):
        idx = torch.tensor([i for i, c in enumerate(counts) if c == n], device=k.device)
        part = _chunk_write(
            rule,
            arch,
            objective,
            optimizer,
            [x[idx] for x in w],
            [x[idx] for x in s],
            k[idx, :n],
            v[idx, :n],
            gates[idx, :n],
        )
        for layer, x in enumerate(part.weights):
            new_w[layer][idx] = x
        for layer, x in enumerate(part.momentum):
            new_s[layer][idx] = x
        surprise_sq[idx] = part.surprise_sq
    reads = None if q is None else arch.forward(w, q)
    return ChunkWrite(weights=new_w, momentum=new_s, surprise_sq=surprise_sq, reads=reads)


def _chunk_write(
    rule: ChunkRule,
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
    if rule.normalize_step:
        theta = theta / arch.curvature(weights, trace)
    coef = optimizer.coefficients(theta, eta, alpha)
    w, ws = coef.w, coef.ws
    if rule.max_update_norm is not None:
        # ||sum_i w_i u_i||_F^2 = w^T gram w; scaling the steps scales the momentum's share too.
        norm = torch.sqrt(torch.einsum("ni,nij,nj->n", w, gram, w).clamp_min(0.0))
        scale = (rule.max_update_norm / norm.clamp_min(1e-30)).clamp_max(1.0).unsqueeze(-1)
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
