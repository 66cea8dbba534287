"""`NeuralMemory`: the Titans long-term memory as a streaming torch module.

Data flow of one call (B streams, H heads, T new tokens, chunk C):

    x (B, T, dim) -> q, k, v, gates (projection, causal conv, SiLU, l2-norm)
      -> prepend the pending partial chunk from the state
      -> per chunk: read the new tokens' queries at the chunk-start weights
         (delta rule: at the weights after each token), and, when the chunk
         is complete, write it (kernels.lmm / kernels.delta_rule) through the write gate
      -> y (B, T, dim); the last partial chunk goes back into the state.

Chunks are aligned to the stream position, never to the call, so any split
of a stream gives the same outputs and state (to float tolerance). Memory
math runs in float32 whatever the input dtype; the state is always float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.delta_rule import DeltaPlan, delta_chunk, delta_plan
from kernels.lmm import Backend, chunk_update
from kernels.lmm.mlp import MLPMemory
from memsvc.memory.config import MemoryConfig
from memsvc.memory.gate import WriteGate
from memsvc.memory.retention import make_retention
from memsvc.memory.state import MemoryState, NonFiniteStateError


def causal_depthwise_conv(ext: Tensor, weight: Tensor) -> Tensor:
    """ext: (B, K - 1 + T, ch) with the K - 1 previous inputs first; weight (ch, 1, K).

    out[t] = sum_j weight[:, 0, j] * ext[t + j]: a sum of K shifted slices, much
    cheaper than conv1d's set-up cost for the short chunks a stream brings.
    """
    k = weight.shape[-1]
    t = ext.shape[1] - k + 1
    out = ext[:, :t] * weight[:, 0, 0]
    for j in range(1, k):
        out = torch.addcmul(out, ext[:, j : j + t], weight[:, 0, j])
    return out


def mitigated(state: MemoryState) -> bool:
    """Whether any stream has a mitigation knob off its neutral value (one sync, and
    the common case then skips two elementwise passes)."""
    return bool((state.step_scale != 1).any() or (state.forget_boost != 0).any())


class Projected:
    """Per-token memory inputs of one call, flattened to N = B * H memories."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor) -> None:
        self.q, self.k, self.v, self.gates = q, k, v, gates  # (N, T, d) x3, (N, T, 3)


class NeuralMemory(nn.Module):
    """Neural long-term memory whose weights learn while a stream is read.

    Parameters (trained by the outer model, frozen when serving): q/k/v
    projections and their depthwise causal convolution, the gate projection
    (theta, eta, alpha per head), the memory's initial weights, and an output
    projection. The per-stream memory weights live in `MemoryState`.

    `backend` picks the path of the chunk update (kernels.lmm.chunk_update): "auto"
    runs the Triton kernel on CUDA when no gradient flows through the update.
    """

    def __init__(self, config: MemoryConfig, backend: Backend = "auto") -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        cfg = config
        n_proj = 2 if cfg.lookahead else 3  # lookahead keys reuse the query projection
        self.channels = n_proj * cfg.dim
        self.to_qkv = nn.Linear(cfg.dim, self.channels, bias=False)
        # Depthwise causal conv, initialised to the identity (last tap 1).
        conv = torch.zeros(self.channels, 1, cfg.conv_size)
        conv[:, 0, -1] = 1.0
        self.conv_weight = nn.Parameter(conv)
        self.to_gates = nn.Linear(cfg.dim, 3 * cfg.heads)
        nn.init.normal_(self.to_gates.weight, std=0.02)
        with torch.no_grad():
            bias = torch.tensor([cfg.step_bias, cfg.momentum_bias, cfg.forget_bias])
            self.to_gates.bias.copy_(bias.repeat_interleave(cfg.heads))
        self.arch = MLPMemory(cfg.depth, cfg.activation)
        heads_init = [self.arch.init_weights(cfg.layer_shapes()) for _ in range(cfg.heads)]
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.stack([h[layer] for h in heads_init]))  # (H, in, out)
            for layer in range(cfg.depth)
        )
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.has_output_proj else None
        self.rule = cfg.chunk_rule
        self.retention = make_retention(cfg)
        self.gate = WriteGate.from_config(cfg)
        self.check_finite = True
        # Training only: keep the last call's per-token queries (B*H, T, d), with grad.
        self.keep_queries = False
        self.last_queries: Tensor | None = None

    # ---- state -------------------------------------------------------------------------

    def init_state(
        self,
        batch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MemoryState:
        """A fresh state for `batch` streams, starting from the learned initial weights.

        The state's dtype is the memory math's dtype: float32 (also for bfloat16
        models: float32 accumulation), or float64 for exactness tests."""
        cfg = self.config
        dev = torch.device(device) if device is not None else self.initial_weights[0].device
        weights = tuple(
            w.to(dev, dtype).unsqueeze(0).expand(batch, *w.shape) for w in self.initial_weights
        )
        momentum = (
            tuple(torch.zeros(batch, *w.shape[1:], device=dev, dtype=dtype) for w in weights)
            if cfg.has_momentum
            else ()
        )
        d, h = cfg.head_dim, cfg.heads

        def zeros(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
            return torch.zeros(*shape, device=dev, dtype=dtype)

        return MemoryState(
            weights=weights,
            momentum=momentum,
            pending_k=zeros(batch, h, 0, d),
            pending_v=zeros(batch, h, 0, d),
            pending_gates=zeros(batch, h, 0, 3),
            conv_tail=zeros(batch, cfg.conv_size - 1, self.channels),
            last_query=zeros(batch, h, d),
            tokens=zeros(batch, dtype=torch.int64),
            chunks=zeros(batch, dtype=torch.int64),
            writes_applied=zeros(batch, dtype=torch.int64),
            writes_skipped=zeros(batch, dtype=torch.int64),
            surprise_ema=zeros(batch),
            write_rate=torch.ones(batch, device=dev, dtype=dtype),
            step_scale=torch.ones(batch, device=dev, dtype=dtype),
            forget_boost=zeros(batch),
        )

    # ---- projections -------------------------------------------------------------------

    def project(self, x: Tensor, state: MemoryState) -> tuple[Projected, Tensor, Tensor]:
        """Queries, keys, values and gates of T new tokens; returns the new conv tail and
        last query too. x: (B, T, dim)."""
        cfg = self.config
        b, t, _ = x.shape
        h, d = cfg.heads, cfg.head_dim
        math_dtype = state.conv_tail.dtype
        p = self.to_qkv(x)  # (B, T, channels)
        tail = state.conv_tail
        if cfg.conv_size > 1:
            ext = torch.cat([tail.to(p.dtype), p], dim=1)  # (B, T + conv - 1, channels)
            tail = ext[:, ext.shape[1] - (cfg.conv_size - 1) :].to(math_dtype)
            p = causal_depthwise_conv(ext, self.conv_weight.to(p.dtype))
        p = F.silu(p).to(math_dtype)

        def heads(z: Tensor) -> Tensor:  # (B, T, dim) -> (B*H, T, d)
            return z.view(b, t, h, d).transpose(1, 2).reshape(b * h, t, d)

        parts = p.split(cfg.dim, dim=-1)
        q = F.normalize(heads(parts[0]), dim=-1)
        if self.keep_queries:  # training's key-alignment loss (memsvc/train/key_loss.py)
            self.last_queries = q
        v = heads(parts[-1])
        last_query = state.last_query
        if cfg.lookahead:
            prev = state.last_query.reshape(b * h, 1, d)
            k = torch.cat([prev, q[:, :-1]], dim=1) if t else prev[:, :0]
            if t:
                last_query = q[:, -1].view(b, h, d)
        else:
            k = F.normalize(heads(parts[1]), dim=-1)

        logits = self.to_gates(x).to(math_dtype).view(b, t, 3, h)  # (B, T, 3, H)
        theta = cfg.max_step * torch.sigmoid(logits[:, :, 0])  # (B, T, H)
        eta = cfg.max_momentum * torch.sigmoid(logits[:, :, 1])
        alpha = self.retention.forget(logits[:, :, 2])
        if mitigated(state):  # the ops guards' knobs, per stream
            theta = theta * state.step_scale.view(b, 1, 1)
            alpha = 1.0 - (1.0 - alpha) * (1.0 - state.forget_boost.view(b, 1, 1))
        gates = torch.stack([theta, eta, alpha], dim=-1)  # (B, T, H, 3)
        gates = gates.transpose(1, 2).reshape(b * h, t, 3)
        return Projected(q, k, v, gates), tail, last_query

    # ---- the stream --------------------------------------------------------------------

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Read and write T new tokens of B streams. x: (B, T, dim) -> y: (B, T, dim)."""
        cfg = self.config
        b, t, _ = x.shape
        h, d, c = cfg.heads, cfg.head_dim, cfg.chunk_size
        if state is None:
            state = self.init_state(b, x.device, torch.promote_types(x.dtype, torch.float32))
        if state.batch != b:
            raise ValueError(f"state holds {state.batch} streams, input has {b}")
        proj, conv_tail, last_query = self.project(x, state)

        n = b * h
        pend = state.pending
        keys = torch.cat([state.pending_k.reshape(n, pend, d), proj.k], dim=1)
        values = torch.cat([state.pending_v.reshape(n, pend, d), proj.v], dim=1)
        gates = torch.cat([state.pending_gates.reshape(n, pend, 3), proj.gates], dim=1)
        weights = [w.reshape(n, *w.shape[2:]) for w in state.weights]
        momentum = [s.reshape(n, *s.shape[2:]) for s in state.momentum]
        counters = {
            "chunks": state.chunks,
            "writes_applied": state.writes_applied,
            "writes_skipped": state.writes_skipped,
            "surprise_ema": state.surprise_ema,
            "write_rate": state.write_rate,
        }

        total = pend + t
        outputs: list[Tensor] = []
        wrote = False
        # Delta rule: the chunks made only of new tokens share one weight-free plan.
        plan_start = c if pend else 0
        plan_chunks = max(0, (total - plan_start) // c)
        plan = None
        if cfg.update_rule == "delta" and plan_chunks:
            span = slice(plan_start, plan_start + plan_chunks * c)
            plan = delta_plan(
                proj.q[:, plan_start - pend : span.stop - pend],
                keys[:, span],
                values[:, span],
                gates[:, span, 0],
                gates[:, span, 2],
                c,
            )
        for start in range(0, total, c):
            end = min(start + c, total)
            first_new = max(start, pend)
            q = proj.q[:, first_new - pend : end - pend]
            complete = end - start == c
            span = slice(start, end)
            if plan is not None and start >= plan_start and complete:
                if self.gate.open:  # all plan chunks at once, at the first of them
                    if start == plan_start:
                        weights = [self._run_open_plan(plan, weights[0], counters, outputs)]
                        wrote = True
                    continue
                step = plan.apply((start - plan_start) // c, weights[0])
                outputs.append(step.outputs)
                new_weights, new_momentum, surprise_sq = [step.weights], [], step.surprise_sq
            elif cfg.update_rule == "delta":
                step = delta_chunk(
                    weights[0],
                    q,
                    keys[:, span],
                    values[:, span],
                    gates[:, span, 0],
                    gates[:, span, 2],
                )
                outputs.append(step.outputs)
                new_weights, new_momentum, surprise_sq = [step.weights], [], step.surprise_sq
            elif complete:
                write = chunk_update(
                    self.rule, weights, momentum, keys[:, span], values[:, span],
                    gates[:, span], q, backend=self.backend,
                )  # fmt: skip
                outputs.append(write.reads)
                new_weights, new_momentum = write.weights, write.momentum
                surprise_sq = write.surprise_sq
            elif q.shape[1]:
                outputs.append(self.arch.forward(weights, q))
            if complete:
                weights, momentum = self._commit(
                    counters, weights, momentum, new_weights, new_momentum, surprise_sq
                )
                wrote = True

        keep = total - total % c
        new_state = MemoryState(
            weights=tuple(w.reshape(b, h, *w.shape[1:]) for w in weights),
            momentum=tuple(s.reshape(b, h, *s.shape[1:]) for s in momentum),
            pending_k=keys[:, keep:].reshape(b, h, total - keep, d),
            pending_v=values[:, keep:].reshape(b, h, total - keep, d),
            pending_gates=gates[:, keep:].reshape(b, h, total - keep, 3),
            conv_tail=conv_tail,
            last_query=last_query,
            tokens=state.tokens + t,
            step_scale=state.step_scale,
            forget_boost=state.forget_boost,
            **counters,
        )
        if wrote and self.check_finite:
            # One reduction per tensor: NaN and inf survive a sum.
            probe = torch.stack([w.detach().sum() for w in (*weights, *momentum)])
            if not bool(torch.isfinite(probe).all()):
                raise NonFiniteStateError(new_state.non_finite())

        y = torch.cat(outputs, dim=1) if outputs else proj.q.new_zeros(n, 0, d)
        y = y.view(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)
        if self.out_proj is not None:
            y = self.out_proj(y.to(self.out_proj.weight.dtype))
        return y.to(x.dtype), new_state

    def _run_open_plan(
        self, plan: DeltaPlan, w0: Tensor, counters: dict[str, Tensor], outputs: list[Tensor]
    ) -> Tensor:
        """Every chunk of `plan` through an open gate: the loop carries only the weights;
        the surprises and counters follow in one pass (`WriteGate.advance_open`).
        Returns the weights after the last chunk."""
        starts, w = [], w0
        for i in range(plan.chunks):
            starts.append(w)
            y, w = plan.read_write(i, w)
            outputs.append(y)
        m, h = plan.chunks, self.config.heads
        surprise = plan.surprise_sq(0, torch.stack(starts)).view(m, -1, h).sum(-1).sqrt()
        ema, rate = self.gate.advance_open(
            surprise, counters["surprise_ema"], counters["write_rate"]
        )
        counters["chunks"] = counters["chunks"] + m
        counters["writes_applied"] = counters["writes_applied"] + m
        counters["surprise_ema"], counters["write_rate"] = ema, rate
        return w

    def _commit(
        self,
        counters: dict[str, Tensor],
        weights: list[Tensor],
        momentum: list[Tensor],
        new_weights: list[Tensor],
        new_momentum: list[Tensor],
        surprise_sq: Tensor,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Pass one complete chunk through the write gate (per stream) and count it."""
        h = self.config.heads
        surprise = surprise_sq.view(-1, h).sum(-1).sqrt()  # (B,)
        before = counters["surprise_ema"]
        decision = self.gate.decide(surprise, before, counters["write_rate"])
        write = decision.write
        counters["chunks"] = counters["chunks"] + 1
        counters["writes_applied"] = counters["writes_applied"] + write.long()
        counters["writes_skipped"] = counters["writes_skipped"] + (~write).long()
        counters["surprise_ema"] = decision.surprise_ema
        counters["write_rate"] = decision.write_rate
        if self.gate.open:
            return new_weights, new_momentum  # every chunk is written as is
        keep = (1.0 - decision.forget).repeat_interleave(h).view(-1, 1, 1)
        mask = write.repeat_interleave(h).view(-1, 1, 1)
        written = [keep * nw for nw in new_weights]
        chosen = [torch.where(mask, nw, w) for w, nw in zip(weights, written, strict=True)]
        if self.gate.relative and self.training and torch.is_grad_enabled():
            # Straight through (config.gate_softness): forward unchanged, backward as if
            # the soft share of the update were written.
            ratio = surprise / before.detach().clamp_min(1e-12)
            soft = torch.sigmoid((ratio - self.gate.tau) / self.config.gate_softness)
            ghost = (soft - soft.detach()).repeat_interleave(h).view(-1, 1, 1)
            chosen = [
                c + ghost * (nw - w) for c, w, nw in zip(chosen, weights, written, strict=True)
            ]
        weights = chosen
        momentum = [torch.where(mask, ns, s) for s, ns in zip(momentum, new_momentum, strict=True)]
        return weights, momentum
