"""Slow, obviously right references for NeuralMemory's stream (tests hold them equal).

Each chunk goes through the operation's own reference (`kernels.lmm.naive`: autograd
per token; `kernels.delta_rule.naive`: the delta rule token by token), and the write
gate runs stream by stream in plain Python, exactly as docs/ARCHITECTURE.md ("The
memory") writes it. They share only `NeuralMemory.project` (q, k, v and gates) with
the fast path, and start from a fresh state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.delta_rule import delta_rule_naive
from kernels.lmm import ChunkWrite, chunk_update_naive
from memsvc.memory.neural_memory import NeuralMemory


@dataclass
class ReferenceResult:
    y: Tensor  # (B, T, dim)
    weights: list[Tensor]  # per layer (B, H, in, out): weights at the last chunk boundary
    momentum: list[Tensor]
    writes_applied: Tensor  # (B,)
    writes_skipped: Tensor
    surprise_ema: Tensor


class _Gate:
    """The seed's write gate, stream by stream, as gate.py documents it."""

    def __init__(self, memory: NeuralMemory, b: int, dtype: torch.dtype) -> None:
        self.cfg = memory.config
        self.applied = torch.zeros(b, dtype=torch.int64)
        self.skipped = torch.zeros(b, dtype=torch.int64)
        self.ema = torch.zeros(b, dtype=dtype)
        self.rate = torch.ones(b, dtype=dtype)

    def decide(self, bb: int, surprise_sq: Tensor) -> float | None:
        """The forget factor lambda for a written chunk of stream bb; None when skipped."""
        cfg = self.cfg
        surprise, before = surprise_sq.sqrt(), self.ema[bb].clone()
        self.ema[bb] = cfg.surprise_beta * before + (1 - cfg.surprise_beta) * surprise
        if cfg.tau == 0:
            write = True
        elif cfg.gate == "relative":
            write = bool(surprise > cfg.tau * before)
        else:
            write = bool(self.ema[bb] > cfg.tau)
        self.rate[bb] = cfg.write_rate_beta * self.rate[bb] + (1 - cfg.write_rate_beta) * float(
            write
        )
        if not write:
            self.skipped[bb] += 1
            return None
        self.applied[bb] += 1
        if not cfg.adaptive_forgetting:
            return 0.0
        return min(cfg.lambda_max, cfg.lambda_0 / max(float(self.rate[bb]), cfg.min_write_rate))


def _result(
    memory: NeuralMemory, ys: list[Tensor], weights, momentum, gate: _Gate
) -> ReferenceResult:
    """Per-chunk reads (N, n, d) and per-layer (N, in, out) weights -> the module's shapes."""
    cfg = memory.config
    y = torch.cat(ys, dim=1)  # (B*H, T, d)
    n, t, d = y.shape
    b = n // cfg.heads
    y = y.view(b, cfg.heads, t, d).transpose(1, 2).reshape(b, t, cfg.heads * d)
    if memory.out_proj is not None:
        y = memory.out_proj(y)
    return ReferenceResult(
        y=y,
        weights=[w.view(b, cfg.heads, *w.shape[1:]) for w in weights],
        momentum=[s.view(b, cfg.heads, *s.shape[1:]) for s in momentum],
        writes_applied=gate.applied,
        writes_skipped=gate.skipped,
        surprise_ema=gate.ema,
    )


def _stream(memory: NeuralMemory, x: Tensor, delta: bool) -> ReferenceResult:
    """Chunk by chunk from a fresh state: every chunk is read, a complete one is written
    through the write gate, stream by stream (all heads of a stream together)."""
    cfg = memory.config
    t, h, c = x.shape[1], cfg.heads, cfg.chunk_size
    state = memory.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
    proj, _, _ = memory.project(x, state)
    weights = [w.flatten(0, 1).detach().clone() for w in state.weights]  # (B*H, in, out)
    momentum = [s.flatten(0, 1).clone() for s in state.momentum]
    gate, ys = _Gate(memory, x.shape[0], proj.q.dtype), []
    for start in range(0, t, c):
        span = slice(start, min(start + c, t))
        q, k, v, g = proj.q[:, span], proj.k[:, span], proj.v[:, span], proj.gates[:, span]
        if delta:
            step = delta_rule_naive(weights[0], q, k, v, g[..., 0], g[..., 2])
            out = ChunkWrite([step.weights], [], step.surprise_sq, step.outputs)
        else:
            out = chunk_update_naive(cfg.chunk_rule, weights, momentum, k, v, g, q)
        ys.append(out.reads)
        if span.stop - start < c:
            continue  # a partial chunk is read, never written
        surprise_sq = out.surprise_sq.view(-1, h).sum(-1)
        for bb in range(x.shape[0]):
            lam = gate.decide(bb, surprise_sq[bb])
            if lam is not None:
                rows = slice(bb * h, (bb + 1) * h)
                for w, nw in zip(weights, out.weights, strict=True):
                    w[rows] = (1 - lam) * nw[rows]
                for s, ns in zip(momentum, out.momentum, strict=True):
                    s[rows] = ns[rows]
    return _result(memory, ys, weights, momentum, gate)


def reference_chunked(memory: NeuralMemory, x: Tensor) -> ReferenceResult:
    """Chunked Titans update with gradients at the chunk-start weights, token by token
    (kernels.lmm.naive). With chunk_size 1 this is the plain per-token recurrence
    (every gradient at the current weights)."""
    return _stream(memory, x, delta=False)


def reference_delta(memory: NeuralMemory, x: Tensor) -> ReferenceResult:
    """The gated delta rule token by token (kernels.delta_rule.naive), the write gate
    deciding per complete chunk whether the chunk's writes are kept."""
    return _stream(memory, x, delta=True)
