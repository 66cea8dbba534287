"""Slow, obviously right references for the memory's fast paths (tests hold them equal).

They take every per-token gradient with autograd, one stream and head at a
time, and run the recurrences token by token exactly as docs/ARCHITECTURE.md
("The memory") writes them. They share only `NeuralMemory.project` (q, k, v and gates) with the
fast path, and start from a fresh state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from memsvc.memory.neural_memory import NeuralMemory

_ACT = {"gelu": F.gelu, "silu": F.silu}
_ACT_BOUND = {"gelu": 1.129, "silu": 1.100}


@dataclass
class ReferenceResult:
    y: Tensor  # (B, T, dim)
    weights: list[Tensor]  # per layer (B, H, in, out): weights at the last chunk boundary
    momentum: list[Tensor]
    writes_applied: Tensor  # (B,)
    writes_skipped: Tensor
    surprise_ema: Tensor


def _apply(memory: NeuralMemory, ws: list[Tensor], x: Tensor) -> Tensor:
    """M(x) for one vector x (d,); weights are (in, out)."""
    act = _ACT[memory.config.activation]
    h = x
    for layer, w in enumerate(ws):
        h = h @ w
        if layer < len(ws) - 1:
            h = act(h)
    return h + x if len(ws) >= 2 else h


def _curvature(memory: NeuralMemory, ws: list[Tensor], k: Tensor) -> Tensor:
    """max(1, sum_l ||input of layer l||^2 * prod_{m>l} (s^2 ||W_m||_F^2))."""
    act, s = _ACT[memory.config.activation], _ACT_BOUND[memory.config.activation]
    inputs, h = [], k
    for layer, w in enumerate(ws):
        inputs.append(h)
        h = h @ w
        if layer < len(ws) - 1:
            h = act(h)
    total = torch.zeros((), dtype=k.dtype)
    for layer, inp in enumerate(inputs):
        factor = torch.ones((), dtype=k.dtype)
        for m in range(layer + 1, len(ws)):
            factor = factor * s**2 * ws[m].pow(2).sum()
        total = total + inp.pow(2).sum() * factor
    return total.clamp_min(1.0)


def _grad(memory: NeuralMemory, ws: list[Tensor], k: Tensor, v: Tensor) -> list[Tensor]:
    ws = [w.detach().requires_grad_(True) for w in ws]
    loss = memory.objective.loss(_apply(memory, ws, k) - v)
    return list(torch.autograd.grad(loss, ws))


def _projected(memory: NeuralMemory, x: Tensor):
    state = memory.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
    proj, _, _ = memory.project(x, state)
    cfg = memory.config
    b, h = x.shape[0], cfg.heads
    weights = [
        [[w[bb, hh].detach().clone() for w in state.weights] for hh in range(h)] for bb in range(b)
    ]
    return proj, weights


def _gate(cfg, ema: Tensor, rate: Tensor, bb: int, surprise_sq: Tensor) -> tuple[bool, float]:
    """The seed's write gate for stream bb, as gate.py documents it (updates ema, rate)."""
    ema[bb] = cfg.surprise_beta * ema[bb] + (1 - cfg.surprise_beta) * surprise_sq.sqrt()
    write = cfg.tau == 0 or bool(ema[bb] > cfg.tau)
    rate[bb] = cfg.write_rate_beta * rate[bb] + (1 - cfg.write_rate_beta) * float(write)
    lam = 0.0
    if cfg.adaptive_forgetting:
        lam = min(cfg.lambda_max, cfg.lambda_0 / max(float(rate[bb]), cfg.min_write_rate))
    return write, lam


def _merge(memory: NeuralMemory, ys: Tensor) -> Tensor:
    """(B, H, T, d) per-head reads -> (B, T, dim) module output."""
    b, h, t, d = ys.shape
    y = ys.transpose(1, 2).reshape(b, t, h * d)
    return memory.out_proj(y) if memory.out_proj is not None else y


def reference_chunked(memory: NeuralMemory, x: Tensor) -> ReferenceResult:
    """Chunked Titans update with gradients at the chunk-start weights, token by token.

    With chunk_size 1 this is the plain per-token recurrence (every gradient at
    the current weights).
    """
    cfg = memory.config
    b, t, _ = x.shape
    h, c = cfg.heads, cfg.chunk_size
    proj, weights = _projected(memory, x)
    momentum = [
        [[torch.zeros_like(w) for w in weights[bb][hh]] for hh in range(h)] for bb in range(b)
    ]
    ys = torch.zeros(b, h, t, cfg.head_dim, dtype=proj.q.dtype)
    applied = torch.zeros(b, dtype=torch.int64)
    skipped = torch.zeros(b, dtype=torch.int64)
    ema = torch.zeros(b, dtype=proj.q.dtype)
    rate = torch.ones(b, dtype=proj.q.dtype)
    for start in range(0, t, c):
        end = min(start + c, t)
        for bb in range(b):
            new_per_head, surprise_sq = [], torch.zeros((), dtype=proj.q.dtype)
            for hh in range(h):
                n = bb * h + hh
                m0, s0 = weights[bb][hh], momentum[bb][hh]
                for i in range(start, end):
                    ys[bb, hh, i] = _apply(memory, m0, proj.q[n, i]).detach()
                if end - start < c:
                    new_per_head.append((m0, s0))
                    continue
                us, steps = [], []
                for i in range(start, end):
                    u = _grad(memory, m0, proj.k[n, i], proj.v[n, i])
                    theta = proj.gates[n, i, 0]
                    if cfg.normalize_step:
                        theta = theta / _curvature(memory, m0, proj.k[n, i])
                    us.append(u)
                    steps.append(theta)
                mean = [sum(u[layer] for u in us) / c for layer in range(cfg.depth)]
                surprise_sq = surprise_sq + sum(g.pow(2).sum() for g in mean)

                def run(m_init, s_init, scale, first=start, us=us, steps=steps, n=n):
                    m, s = list(m_init), list(s_init)
                    if cfg.optimizer == "chunk_momentum":  # one step per chunk, mean gates
                        eta = proj.gates[n, first : first + c, 1].mean()
                        a = 1 - proj.gates[n, first : first + c, 2].mean()
                        total = [
                            sum(scale * steps[j] * us[j][layer] for j in range(c))
                            for layer in range(len(m))
                        ]
                        s = [eta * sl - tl for sl, tl in zip(s, total, strict=True)]
                        return [a * ml + sl for ml, sl in zip(m, s, strict=True)], s
                    for j, i in enumerate(range(first, first + c)):
                        eta = proj.gates[n, i, 1] if cfg.has_momentum else 0.0
                        a = 1 - proj.gates[n, i, 2]
                        s = [
                            eta * sl - scale * steps[j] * ul
                            for sl, ul in zip(s, us[j], strict=True)
                        ]
                        m = [a * ml + sl for ml, sl in zip(m, s, strict=True)]
                    return m, s

                scale = torch.ones((), dtype=proj.q.dtype)
                if cfg.max_update_norm is not None:
                    zero = [torch.zeros_like(w) for w in m0]
                    grad_part, _ = run(zero, zero, scale)
                    norm = torch.sqrt(sum(g.pow(2).sum() for g in grad_part))
                    scale = torch.clamp(cfg.max_update_norm / norm, max=1.0)
                new_per_head.append(run(m0, s0, scale))
            if end - start < c:
                continue
            write, lam = _gate(cfg, ema, rate, bb, surprise_sq)
            if write:
                applied[bb] += 1
                for hh in range(h):
                    m, s = new_per_head[hh]
                    weights[bb][hh] = [(1 - lam) * w for w in m]
                    momentum[bb][hh] = s
            else:
                skipped[bb] += 1
    return ReferenceResult(
        y=_merge(memory, ys),
        weights=_stack(weights),
        momentum=_stack(momentum) if cfg.has_momentum else [],
        writes_applied=applied,
        writes_skipped=skipped,
        surprise_ema=ema,
    )


def reference_delta(memory: NeuralMemory, x: Tensor) -> ReferenceResult:
    """The gated delta rule token by token: W <- a W; W <- W - theta (W k - v) k^T; y = W q
    (with W stored transposed, (d_k, d_v), as the fast path stores it).

    Within a chunk every token sees the writes before it; the write gate decides
    per complete chunk whether the chunk's writes are kept.
    """
    cfg = memory.config
    b, t, _ = x.shape
    h, c = cfg.heads, cfg.chunk_size
    proj, weights = _projected(memory, x)
    ys = torch.zeros(b, h, t, cfg.head_dim, dtype=proj.q.dtype)
    applied = torch.zeros(b, dtype=torch.int64)
    skipped = torch.zeros(b, dtype=torch.int64)
    ema = torch.zeros(b, dtype=proj.q.dtype)
    rate = torch.ones(b, dtype=proj.q.dtype)
    for start in range(0, t, c):
        end = min(start + c, t)
        for bb in range(b):
            ends, surprise_sq = [], torch.zeros((), dtype=proj.q.dtype)
            for hh in range(h):
                n = bb * h + hh
                w0 = weights[bb][hh][0]
                w = w0
                for i in range(start, end):
                    k, v, q = proj.k[n, i], proj.v[n, i], proj.q[n, i]
                    theta, alpha = proj.gates[n, i, 0], proj.gates[n, i, 2]
                    w = (1 - alpha) * w
                    w = w - theta * torch.outer(k, k @ w - v)
                    ys[bb, hh, i] = (q @ w).detach()
                mean = sum(
                    _grad(memory, [w0], proj.k[n, i], proj.v[n, i])[0] for i in range(start, end)
                )
                surprise_sq = surprise_sq + (mean / (end - start)).pow(2).sum()
                ends.append(w)
            if end - start < c:
                continue
            write, lam = _gate(cfg, ema, rate, bb, surprise_sq)
            if write:
                applied[bb] += 1
                for hh in range(h):
                    weights[bb][hh] = [(1 - lam) * ends[hh]]
            else:
                skipped[bb] += 1
    return ReferenceResult(
        y=_merge(memory, ys),
        weights=_stack(weights),
        momentum=[],
        writes_applied=applied,
        writes_skipped=skipped,
        surprise_ema=ema,
    )


def _stack(per_stream: list[list[list[Tensor]]]) -> list[Tensor]:
    """[B][H][layer] -> per layer (B, H, in, out)."""
    depth = len(per_stream[0][0])
    return [
        torch.stack([torch.stack([heads[layer] for heads in stream]) for stream in per_stream])
        for layer in range(depth)
    ]
