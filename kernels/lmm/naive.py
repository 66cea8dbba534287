"""The chunk update written the slow, obvious way: the reference every fast path must match.

One memory at a time, one token at a time: each token's gradient comes from autograd
at the chunk-start weights M_0, and the recurrences run as the equations write them:

    S_i = eta_i S_{i-1} - s theta_i u_i        M_i = (1 - alpha_i) M_{i-1} + S_i

(theta_i divided by the NLMS curvature bound when `normalize_step`; s <= 1 scales the
chunk's gradient part down to `max_update_norm`). "chunk_momentum" steps momentum and
retention once per chunk with the mean gates; "sgd" has no momentum (eta = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.lmm.objective import make_objective
from kernels.lmm.rule import ChunkRule, ChunkWrite

_ACT = {"gelu": F.gelu, "silu": F.silu}
_ACT_BOUND = {"gelu": 1.129, "silu": 1.100}  # sup |act'|


def _layer_inputs(rule: ChunkRule, ws: list[Tensor], x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Each layer's input for one vector x (d,), and M(x); weights are (in, out)."""
    inputs, h = [], x
    for layer, w in enumerate(ws):
        inputs.append(h)
        h = h @ w
        if layer < len(ws) - 1:
            h = _ACT[rule.activation](h)
    return inputs, h + x if len(ws) >= 2 else h


def _curvature(rule: ChunkRule, ws: list[Tensor], k: Tensor) -> Tensor:
    """max(1, sum_l ||input of layer l||^2 * prod_{m>l} (s^2 ||W_m||_F^2))."""
    inputs, _ = _layer_inputs(rule, ws, k)
    total = k.new_zeros(())
    for layer, inp in enumerate(inputs):
        factor = k.new_ones(())
        for m in range(layer + 1, len(ws)):
            factor = factor * _ACT_BOUND[rule.activation] ** 2 * ws[m].pow(2).sum()
        total = total + inp.pow(2).sum() * factor
    return total.clamp_min(1.0)


def _token_grad(rule: ChunkRule, ws: list[Tensor], k: Tensor, v: Tensor) -> list[Tensor]:
    with torch.enable_grad():
        ws = [w.detach().requires_grad_(True) for w in ws]
        loss = make_objective(rule).loss(_layer_inputs(rule, ws, k)[1] - v)
        return list(torch.autograd.grad(loss, ws))


def _recur(rule, m, s, grads, steps, gates, scale) -> tuple[list[Tensor], list[Tensor]]:
    """The optimiser's recurrence over one chunk from (M_0, S_0)."""
    if rule.optimizer == "chunk_momentum":
        eta, keep = gates[:, 1].mean(), 1 - gates[:, 2].mean()
        total = [
            sum(scale * t * u[i] for t, u in zip(steps, grads, strict=True)) for i in range(len(m))
        ]
        s = [eta * si - ti for si, ti in zip(s, total, strict=True)]
        return [keep * mi + si for mi, si in zip(m, s, strict=True)], s
    for step, u, (_, eta, alpha) in zip(steps, grads, gates, strict=True):
        eta = eta if rule.has_momentum else 0.0
        s = [eta * si - scale * step * ui for si, ui in zip(s, u, strict=True)]
        m = [(1 - alpha) * mi + si for mi, si in zip(m, s, strict=True)]
    return m, s


def chunk_update_naive(
    rule: ChunkRule,
    weights: Sequence[Tensor],  # per layer (N, in, out)
    momentum: Sequence[Tensor],  # per layer like weights; () without momentum
    k: Tensor,  # (N, C, d)
    v: Tensor,  # (N, C, d)
    gates: Tensor,  # (N, C, 3) theta, eta, alpha
    q: Tensor | None = None,  # (N, R, d)
    n_valid: Tensor | None = None,  # (N,) tokens each memory writes; None: all C
) -> ChunkWrite:
    """What `chunk_update` computes, memory by memory and token by token."""
    store, math = weights[0].dtype, torch.promote_types(weights[0].dtype, torch.float32)
    new_w = [w.detach().to(math).clone() for w in weights]
    new_s = [s.detach().to(math).clone() for s in momentum]
    surprise_sq = k.new_zeros(k.shape[0], dtype=math)
    reads = []
    for n in range(k.shape[0]):
        m0 = [w[n].clone() for w in new_w]
        s0 = [s[n] for s in new_s] if rule.has_momentum else [torch.zeros_like(w) for w in m0]
        if q is not None:
            reads.append(torch.stack([_layer_inputs(rule, m0, x.to(math))[1] for x in q[n]]))
        count = k.shape[1] if n_valid is None else int(n_valid[n])
        if count == 0:
            continue
        kn, vn, gn = k[n, :count].to(math), v[n, :count].to(math), gates[n, :count].to(math)
        grads = [_token_grad(rule, m0, kn[i], vn[i]) for i in range(count)]
        steps = [gn[i, 0] for i in range(count)]
        if rule.normalize_step:
            steps = [t / _curvature(rule, m0, kn[i]) for i, t in enumerate(steps)]
        mean = [sum(u[layer] for u in grads) / count for layer in range(len(m0))]
        surprise_sq[n] = sum(g.pow(2).sum() for g in mean)
        scale = k.new_ones((), dtype=math)
        if rule.max_update_norm is not None:
            zero = [torch.zeros_like(w) for w in m0]
            part, _ = _recur(rule, zero, zero, grads, steps, gn, scale)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in part))
            scale = torch.clamp(rule.max_update_norm / norm, max=1.0)
        m, s = _recur(rule, m0, s0, grads, steps, gn, scale)
        for layer in range(len(m0)):
            new_w[layer][n] = m[layer]
            if rule.has_momentum:
                new_s[layer][n] = s[layer]
    return ChunkWrite(
        weights=[w.to(store) for w in new_w],
        momentum=[s.to(store) for s in new_s],
        surprise_sq=surprise_sq,
        reads=None if q is None else torch.stack(reads),
    )
