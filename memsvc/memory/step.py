"""`MemoryStep`: one token per call for B streams of one `NeuralMemory`, without the
chunk machinery's per-call set-up.

Why this is exact. The memory's state only changes at chunk boundaries; between
them a stream just collects keys, values and gates. So a token that does not
complete a chunk is:

    chunk rule: y = M_{W_0}(q)       (reads at the chunk-start weights W_0)
    delta rule: W_t = a_t W_{t-1} - theta_t k_t (a_t k_t^T W_{t-1} - v_t^T),  y = W_t^T q
                (the per-token form of delta.py's WY chunk; W_0 is kept apart)

and its key, value and gates go into a ring of C slots. The token that completes
a stream's chunk runs through `NeuralMemory.forward` itself, on a `MemoryState`
rebuilt from the ring: the write, the write gate, the counters and the
non-finite check are the chunk path's own, so the state at every boundary is
what appending would give (to float tolerance). One exception, on the C++ step
(`bind_fast`) for the delta rule through an open gate (`write_open`): there the
running weights already are the chunk's end weights and every chunk is written, so
the boundary only moves the counters, with the surprise from the chunk's gradient
sum that the C++ step carries (||sum_i k_i (k_i^T W_0 - v_i)^T||^2 / C^2, the
chunk path's own formula); a weight that is not finite still goes the chunk path.

The ring is indexed by the decoder's step s (slot s % C), the same slot for
every stream; a stream's partial chunk occupies the slots before the current one.
A MemoryStep built at `start` (a stream joining a decoder at step `start`) lays its
ring out for that step, so `extend` joins two of them by concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.delta_rule.chunk import delta_chunk
from memsvc.memory.neural_memory import NeuralMemory
from memsvc.memory.state import MemoryState

# The MLP activations the C++ decode step knows, by its index there.
FAST_ACTIVATIONS = ("gelu", "silu")

_COUNTERS = ("chunks", "writes_applied", "writes_skipped", "surprise_ema", "write_rate")


class MemoryStep:
    """Per-token state of B streams of one memory layer (the streams may sit at
    different offsets in their chunks). `step` reads and buffers one token of every
    stream; `write_chunk` completes the chunks that end at this step."""

    @torch.no_grad()
    def __init__(self, memory: NeuralMemory, states: Sequence[MemoryState], start: int = 0) -> None:
        cfg = memory.config
        self.memory = memory
        self.batch = b = len(states)
        h, d, c = cfg.heads, cfg.head_dim, cfg.chunk_size
        self.n = n = b * h
        dtype = states[0].conv_tail.dtype
        device = states[0].conv_tail.device
        self.dtype = dtype

        def cat(get) -> Tensor:
            return torch.cat([get(s) for s in states])

        # Chunk-start weights and momentum, (N, in, out): owned copies, written in place.
        self.weights = [
            cat(lambda s, i=i: s.weights[i]).reshape(n, *states[0].weights[i].shape[2:]).clone()
            for i in range(cfg.depth)
        ]
        self.momentum = [
            cat(lambda s, i=i: s.momentum[i]).reshape(n, *states[0].momentum[i].shape[2:]).clone()
            for i in range(len(states[0].momentum))
        ]
        self.counters = {name: cat(lambda s, k=name: getattr(s, k)).clone() for name in _COUNTERS}
        self.tokens = cat(lambda s: s.tokens) - start  # export adds the decoder's steps
        self.step_scale = cat(lambda s: s.step_scale)
        self.forget_boost = cat(lambda s: s.forget_boost)
        self.last_query = cat(lambda s: s.last_query).clone()  # (B, H, d)

        # Ring of C slots; stream b's p_b pending tokens sit at steps start-p_b .. start-1.
        self.pending = [(s.pending - start) % c for s in states]  # relative to the step
        self.keys = torch.zeros(b, h, c, d, dtype=dtype, device=device)
        self.values = torch.zeros(b, h, c, d, dtype=dtype, device=device)
        self.gates = torch.zeros(b, h, c, 3, dtype=dtype, device=device)
        for i, s in enumerate(states):
            slots = [(start + j - s.pending) % c for j in range(s.pending)]
            self.keys[i, :, slots] = s.pending_k[0]
            self.values[i, :, slots] = s.pending_v[0]
            self.gates[i, :, slots] = s.pending_gates[0]

        # Gate squashing: sigmoid(logits) * scale (+ the mitigation knobs, per stream).
        retention = 0.0 if cfg.retention == "none" else cfg.max_forget
        scale = torch.tensor([cfg.max_step, cfg.max_momentum, retention], dtype=dtype)
        self.gate_scale = scale.repeat_interleave(h).to(device)  # (3H,)
        self.mitigation = self._mitigation()

        out = memory.out_proj
        self.out_t = None if out is None else out.weight.t().contiguous()
        self.one = torch.ones((), dtype=dtype, device=device)
        self._bind()

        self.delta = cfg.update_rule == "delta"
        self.fast_writes = False  # set by bind_fast: chunk ends without the chunk path
        if self.delta:  # the running weights after each pending token, from W_0
            self.running = self.weights[0].clone()
            # and the chunk's gradient sum at W_0, sum_i k_i (k_i^T W_0 - v_i)^T, which
            # the C++ step carries on (its surprise at the chunk's end)
            self.grad_sum = torch.zeros_like(self.running)
            for i, s in enumerate(states):
                if s.pending:
                    rows = slice(i * h, (i + 1) * h)
                    w0, k, v = self.weights[0][rows], s.pending_k[0], s.pending_v[0]
                    self.running[rows] = _delta_prefix(w0, k, v, s.pending_gates[0])
                    self.grad_sum[rows] = torch.bmm(k.transpose(1, 2), torch.bmm(k, w0) - v)

    def _mitigation(self) -> tuple[Tensor, Tensor] | None:
        """(mul, add) (B, 3H) applied to the squashed gates, or None: no stream mitigated."""
        if not bool((self.step_scale != 1).any() or (self.forget_boost != 0).any()):
            return None
        h = self.memory.config.heads
        ones = torch.ones_like(self.step_scale)
        boost = self.forget_boost
        mul = torch.stack([self.step_scale, ones, 1.0 - boost], dim=1)  # (B, 3)
        add = torch.stack([0.0 * ones, 0.0 * ones, boost], dim=1)
        return mul.repeat_interleave(h, 1), add.repeat_interleave(h, 1)

    def _bind(self) -> None:
        """Per-slot views of the ring, so a step writes with one copy_ each."""
        c = self.memory.config.chunk_size
        self.key_slots = [self.keys[:, :, j] for j in range(c)]
        self.value_slots = [self.values[:, :, j] for j in range(c)]
        self.gate_slots = [self.gates[:, :, j] for j in range(c)]

    def bind_fast(self, fast) -> None:
        """Hand the C++ decode step (kernels/decode_step) this memory's buffers; it reads
        and writes them in place, so `write_chunk` and `export` see its tokens."""
        self.last_query = self.last_query.contiguous()
        self.query_before = torch.empty_like(self.last_query)
        if self.delta:
            fast.running, fast.w0, fast.grad_sum = self.running, self.weights[0], self.grad_sum
            self.fast_writes = self.memory.gate.open
        fast.mkeys, fast.mvalues = self.keys, self.values
        fast.mgates, fast.gate_scale = self.gates, self.gate_scale
        fast.last_query, fast.query_before = self.last_query, self.query_before
        if self.mitigation is not None:
            fast.mit_mul, fast.mit_add = self.mitigation
        if self.out_t is not None:
            fast.mem_out_t = self.out_t
        cfg = self.memory.config
        if not self.delta:  # the chunk rule reads at its chunk-start weights
            arch = self.memory.arch
            fast.mlp, fast.mlp_residual = list(self.weights), arch.residual
            fast.mlp_activation = FAST_ACTIVATIONS.index(cfg.activation)
        fast.mem_heads, fast.mem_head_dim = cfg.heads, cfg.head_dim
        fast.mem_parts, fast.lookahead = self.memory.channels // cfg.dim, cfg.lookahead

    def step(self, p: Tensor, gate_logits: Tensor, slot: int) -> Tensor:
        """One token of every stream. p: (B, channels) the convolved, SiLU'd projections;
        gate_logits (B, 3H); slot = step % C. Returns y (B, dim) after the out-proj."""
        cfg = self.memory.config
        b, h, d, dim = self.batch, cfg.heads, cfg.head_dim, cfg.dim
        n = self.n
        parts = p.chunk(p.shape[1] // dim, dim=1)
        q = _normalize(parts[0].view(b, h, d))  # (B, H, d)
        v = parts[-1].view(b, h, d)
        self.query_before = self.last_query  # the chunk path's state.last_query for this token
        if cfg.lookahead:
            k, self.last_query = self.last_query, q
        else:
            k = _normalize(parts[1].view(b, h, d))
        g = torch.sigmoid(gate_logits) * self.gate_scale  # (B, 3H): theta, eta, alpha
        if self.mitigation is not None:
            g = torch.addcmul(self.mitigation[1], g, self.mitigation[0])
        g = g.view(b, 3, h)
        self.key_slots[slot].copy_(k)
        self.value_slots[slot].copy_(v)
        self.gate_slots[slot].copy_(g.transpose(1, 2))  # (B, H, 3)
        if self.delta:
            w = self.running  # (N, d, d)
            kn, vn = k.reshape(n, 1, d), v.reshape(n, 1, d)
            theta, _, alpha = g.unbind(1)  # (B, H) each
            a = torch.sub(self.one, alpha).view(n, 1, 1)
            theta = theta.reshape(n, 1, 1)
            r = torch.bmm(kn, w).mul_(a).sub_(vn).mul_(theta)  # theta (a k^T W - v^T)
            w.mul_(a).baddbmm_(kn.transpose(1, 2), r, alpha=-1.0)
            y = torch.bmm(q.reshape(n, 1, d), w)
        else:
            y = self.memory.arch.forward(self.weights, q.reshape(n, 1, d))
        y = y.view(b, dim)
        return y if self.out_t is None else torch.mm(y, self.out_t)

    def write_open(self, streams: list[int]) -> bool:
        """Complete the chunk of `streams` without the chunk path, where it is exact: the
        delta rule through an open gate, on the C++ step. The running weights are the
        chunk's end weights (the per-token form of the same recurrence), every chunk is
        written, and the surprise is ||grad_sum||^2 / C^2 as delta_chunk gives it; so
        only the counters move. False (nothing changed) where it does not apply or a
        weight is not finite (the chunk path then raises NonFiniteStateError)."""
        if not self.fast_writes:
            return False
        cfg = self.memory.config
        h, c = cfg.heads, cfg.chunk_size
        idx = torch.tensor(streams, device=self.tokens.device)
        rows = (idx[:, None] * h + torch.arange(h, device=idx.device)).flatten()
        running = self.running[rows]
        if not bool(torch.isfinite(running.sum())):
            return False
        surprise_sq = self.grad_sum[rows].square().sum((1, 2)) / (c * c)
        surprise = surprise_sq.view(-1, h).sum(-1).sqrt()  # (S,)
        counters = self.counters
        decision = self.memory.gate.decide(
            surprise, counters["surprise_ema"][idx], counters["write_rate"][idx]
        )
        counters["chunks"][idx] += 1
        counters["writes_applied"][idx] += 1
        counters["surprise_ema"][idx] = decision.surprise_ema
        counters["write_rate"][idx] = decision.write_rate
        self.weights[0][rows] = running
        self.grad_sum[rows] = 0
        return True

    def write_chunk(self, streams: list[int], x: Tensor, conv_tail: Tensor, slot: int) -> Tensor:
        """Complete the chunk of `streams` (all at their chunk's last token, this step's
        `slot`) through `NeuralMemory.forward`. x: (S, dim) the memory's input for this
        token; conv_tail (S, K-1, channels) the projections before it. Returns their
        y (S, dim), replacing `step`'s."""
        cfg = self.memory.config
        h, c = cfg.heads, cfg.chunk_size
        idx = torch.tensor(streams, device=self.tokens.device)
        rows = (idx[:, None] * h + torch.arange(h, device=idx.device)).flatten()
        order = [(slot - (c - 1) + j) % c for j in range(c - 1)]  # the C-1 tokens before
        state = MemoryState(
            weights=tuple(w[rows].view(len(streams), h, *w.shape[1:]) for w in self.weights),
            momentum=tuple(m[rows].view(len(streams), h, *m.shape[1:]) for m in self.momentum),
            pending_k=self.keys[idx][:, :, order],
            pending_v=self.values[idx][:, :, order],
            pending_gates=self.gates[idx][:, :, order],
            conv_tail=conv_tail,
            last_query=self.query_before[idx],
            tokens=self.tokens[idx],  # only for the state's shape: fixed up on export
            step_scale=self.step_scale[idx],
            forget_boost=self.forget_boost[idx],
            **{name: value[idx] for name, value in self.counters.items()},
        )
        with torch.no_grad():
            y, new = self.memory(x[:, None], state)  # (S, 1, dim)
        for w, nw in zip(self.weights, new.weights, strict=True):
            w[rows] = nw.reshape(-1, *w.shape[1:])
        for m, nm in zip(self.momentum, new.momentum, strict=True):
            m[rows] = nm.reshape(-1, *m.shape[1:])
        if self.delta:
            self.running[rows] = self.weights[0][rows]
            self.grad_sum[rows] = 0
        for name, value in self.counters.items():
            value[idx] = getattr(new, name)
        return y[:, 0]

    def keep(self, streams: list[int]) -> None:
        """Drop every stream not in `streams` (in that order)."""
        h = self.memory.config.heads
        idx = torch.tensor(streams, device=self.tokens.device)
        rows = (idx[:, None] * h + torch.arange(h, device=idx.device)).flatten()
        self.batch, self.n = len(streams), len(streams) * h
        self.weights = [w[rows] for w in self.weights]
        self.momentum = [m[rows] for m in self.momentum]
        if self.delta:
            self.running, self.grad_sum = self.running[rows], self.grad_sum[rows]
        self.counters = {k: v[idx] for k, v in self.counters.items()}
        for name in ("tokens", "step_scale", "forget_boost", "last_query"):
            setattr(self, name, getattr(self, name)[idx])
        self.keys, self.values, self.gates = self.keys[idx], self.values[idx], self.gates[idx]
        self._bind()
        self.pending = [self.pending[i] for i in streams]
        if self.mitigation is not None:
            self.mitigation = (self.mitigation[0][idx], self.mitigation[1][idx])

    def extend(self, other: MemoryStep) -> None:
        """Append `other`'s streams (built for the same memory at this decoder step)."""
        self.batch, self.n = self.batch + other.batch, self.n + other.n
        self.weights = [torch.cat([a, b]) for a, b in zip(self.weights, other.weights, strict=True)]
        self.momentum = [
            torch.cat([a, b]) for a, b in zip(self.momentum, other.momentum, strict=True)
        ]
        if self.delta:
            self.running = torch.cat([self.running, other.running])
            self.grad_sum = torch.cat([self.grad_sum, other.grad_sum])
        self.counters = {k: torch.cat([v, other.counters[k]]) for k, v in self.counters.items()}
        for name in (
            "tokens",
            "step_scale",
            "forget_boost",
            "last_query",
            "keys",
            "values",
            "gates",
        ):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self._bind()
        self.pending = [*self.pending, *other.pending]
        self.mitigation = self._mitigation()

    def export(self, stream: int, steps: int, conv_tail: Tensor) -> MemoryState:
        """Stream `stream`'s single-stream state after `steps` decoder steps.
        conv_tail: (1, K-1, channels) its last pre-convolution projections."""
        cfg = self.memory.config
        h, c = cfg.heads, cfg.chunk_size
        pend = (self.pending[stream] + steps) % c
        order = [(steps - pend + j) % c for j in range(pend)]
        rows = slice(stream * h, (stream + 1) * h)
        one = slice(stream, stream + 1)
        return MemoryState(
            weights=tuple(w[rows].clone().view(1, h, *w.shape[1:]) for w in self.weights),
            momentum=tuple(m[rows].clone().view(1, h, *m.shape[1:]) for m in self.momentum),
            pending_k=self.keys[one][:, :, order].clone(),
            pending_v=self.values[one][:, :, order].clone(),
            pending_gates=self.gates[one][:, :, order].clone(),
            conv_tail=conv_tail.to(self.dtype).clone(),
            last_query=self.last_query[one].clone(),
            tokens=self.tokens[one] + steps,
            step_scale=self.step_scale[one].clone(),
            forget_boost=self.forget_boost[one].clone(),
            **{name: value[one].clone() for name, value in self.counters.items()},
        )


def _normalize(x: Tensor) -> Tensor:
    """F.normalize(x, dim=-1) (x / max(||x||, 1e-12)) in three dispatches instead of four."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)


def _delta_prefix(w0: Tensor, k: Tensor, v: Tensor, gates: Tensor) -> Tensor:
    """The delta rule's weights after the tokens k, v, gates (H, P, .) from w0 (H, d, d),
    as `MemoryStep.step` runs them token by token: the chunk form's end weights
    (`delta_chunk`, one triangular solve instead of P steps)."""
    return delta_chunk(w0, k[:, -1:], k, v, gates[..., 0], gates[..., 2]).weights
