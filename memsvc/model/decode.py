"""`Decoder`: a `MAGModel` one token at a time for B streams, in preallocated buffers.

`MAGModel.forward` is built for chunks: every call concatenates the caches,
unfolds blocks, rebuilds masks and runs the memory's chunk machinery, about six
milliseconds for one token. The decoder takes the same weights and states and
keeps per layer:

- one fused projection (attention q, k, v and q, k with each head's halves exchanged,
  RoPE's partner dimensions; memory q, (k,) v; memory gates): one GEMM, the block's
  RMSNorm weight folded in;
- the pre-convolution projections of the last L steps in a doubled ring
  (written at s % L and s % L + L, so the window s-L+1 .. s is one strided view),
  and every depthwise convolution (attention q and k, memory) as one weighted sum;
- the attention ring of W + 1 slots (slot s % (W+1)). Keys are stored rotated by
  their decoder step s and the query by its own (angles in float64, so a long
  generation loses nothing), so a score sees only the distance, as the
  window-relative RoPE of attention.py gives it. The persistent
  tokens share the same GEMM: keys are [k_rot, 0] and [0, p_k], the query
  [q_rot, q], so one (1, 2dh) x (2dh, P + W + 1) product scores both;
- a `MemoryStep` (memsvc.memory.step) for the memory branch.

On the CPU (float32 or float64), once kernels/decode_step is built, a layer's step is
two calls into that C++ extension over these same buffers (`step_fast`): the GEMMs stay
ATen calls, everything between them plain loops; `step` below is its reference, and
every test of tests/model/test_decode.py runs on both.

The attention scale dh^-0.5 is folded into the query's convolution taps. States go
in and come out as the ordinary single-stream `ModelState`s, so the engine's
append path and the decoder continue each other; tests/model/test_decode.py
holds them equal (logits and state, any split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import decode_step
from memsvc.memory import MemoryState
from memsvc.memory.step import FAST_ACTIVATIONS, MemoryStep
from memsvc.model.attention import AttentionCache, rope_angles
from memsvc.model.mag import BlockState, MAGBlock
from memsvc.model.model import MAGModel, ModelState


class _LayerDecoder:
    """One MAG block's weights, rearranged for one token, and its buffers for B streams."""

    @torch.no_grad()
    def __init__(
        self,
        block: MAGBlock,
        states: Sequence[BlockState],
        positions: Tensor,
        use_memory: bool,
        start: int = 0,
        cpp: ModuleType | None = None,
    ) -> None:
        cfg = block.config
        d, h, dh, w, k = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.window, cfg.attn_conv_size
        attn = block.attention
        self.cfg = cfg
        self.memory = block.memory if use_memory else None
        mem_cfg = cfg.memory if self.memory is not None else None
        self.mem_channels = self.memory.channels if self.memory is not None else 0
        cs = mem_cfg.conv_size if mem_cfg is not None else 1
        b = len(states)
        dev, dtype = attn.to_qkv.weight.device, attn.to_qkv.weight.dtype
        self.batch = b

        # Fused projection, output [attn q | attn k | memory channels | attn v | gate logits]:
        # the convolved channels first and contiguous.
        aq, ak, av = attn.to_qkv.weight.split(d)
        # RoPE's partner dimensions come straight out of the GEMM (channels permuted within
        # each head): rotating is then x * cos + partner * sin, no roll per step.
        half = dh // 2
        perm = torch.tensor([hd * dh + (j + half) % dh for hd in range(h) for j in range(dh)])
        parts, bias = [aq, ak, aq[perm], ak[perm]], [torch.zeros(4 * d, dtype=dtype, device=dev)]
        if self.memory is not None:
            parts.append(self.memory.to_qkv.weight)
            bias.append(torch.zeros(self.mem_channels, dtype=dtype, device=dev))
        parts.append(av)
        bias.append(torch.zeros(d, dtype=dtype, device=dev))
        if self.memory is not None:
            parts.append(self.memory.to_gates.weight)
            bias.append(self.memory.to_gates.bias)
        self.proj_t = torch.cat(parts).t().contiguous()  # (D, out)
        self.proj_bias = torch.cat(bias)
        self.conv_ch = 4 * d + self.mem_channels

        # Convolution taps over the window of L steps (row L-1 is the current step).
        self.span = span = max(k + 1, cs)
        taps = torch.zeros(span, self.conv_ch, dtype=dtype, device=dev)
        scale = dh**-0.5
        if k:
            taps[span - k :, :d] = attn.query_conv[:, 0].t() * scale  # t-K+1 .. t
            taps[span - k - 1 : span - 1, d : 2 * d] = attn.key_conv[:, 0].t()  # t-K .. t-1
        else:
            taps[span - 1, :d] = scale
            taps[span - 1, d : 2 * d] = 1.0
        taps[:, 2 * d : 3 * d] = taps[:, :d][:, perm]
        taps[:, 3 * d : 4 * d] = taps[:, d : 2 * d][:, perm]
        if self.memory is not None:
            taps[span - cs :, 4 * d :] = self.memory.conv_weight[:, 0].t()
        self.taps = taps
        self.history = torch.zeros(b, 2 * span, self.conv_ch, dtype=dtype, device=dev)

        def fill(rows: Tensor, lo: int, hi: int) -> None:  # rows (B, n, ch): steps -n .. -1
            for j in range(rows.shape[1]):
                slot = (start + j - rows.shape[1]) % span
                self.history[:, slot, lo:hi] = rows[:, j]
                self.history[:, slot + span, lo:hi] = rows[:, j]

        caches = [s.attention for s in states]
        query_tail = torch.cat([c.query_tail for c in caches])
        key_tail = torch.cat([c.key_tail for c in caches])
        fill(query_tail, 0, d)
        fill(key_tail, d, 2 * d)
        fill(query_tail[..., perm], 2 * d, 3 * d)
        fill(key_tail[..., perm], 3 * d, 4 * d)
        if self.memory is not None:
            fill(torch.cat([s.memory.conv_tail.to(dtype) for s in states]), 4 * d, self.conv_ch)

        # Attention ring: W + 1 slots, persistent tokens in front of them.
        p, ring = cfg.n_persistent, w + 1
        self.n_persistent, self.ring = p, ring
        self.keys = torch.zeros(b, h, p + ring, 2 * dh, dtype=dtype, device=dev)
        self.values = torch.zeros(b, h, p + ring, dh, dtype=dtype, device=dev)
        self.raw_keys = torch.zeros(b, h, ring, dh, dtype=dtype, device=dev)  # before RoPE
        self.keys[:, :, :p, dh:] = attn.persistent_keys
        self.values[:, :, :p] = attn.persistent_values
        self.mask = torch.zeros(b, h, 1, p + ring, dtype=dtype, device=dev)
        cached_keys = torch.cat([c.keys for c in caches])  # (B, H, W, dh) steps -W .. -1
        cached_values = torch.cat([c.values for c in caches])
        slots = [(start + j - w) % ring for j in range(w)]
        self.raw_keys[:, :, slots] = cached_keys
        self.values[:, :, [p + s for s in slots]] = cached_values
        steps = torch.arange(start - w, start)
        cos, sin = _rope_rows(steps, dh, cfg.rope_base, dtype, dev)  # (W, dh)
        partner = cached_keys.roll(half, dims=-1)
        self.keys[:, :, [p + s for s in slots], :dh] = cached_keys * cos + partner * sin
        real = torch.arange(w, device=dev)[None] >= (w - positions.clamp(max=w))[:, None]
        invalid = torch.full((b, ring), float("-inf"), dtype=dtype, device=dev)
        invalid[:, slots] = torch.where(real, 0.0, float("-inf")).to(dtype)
        self.mask[:, :, 0, p:] = invalid[:, None]

        self.mem_step = (
            MemoryStep(self.memory, [s.memory for s in states], start)
            if self.memory is not None
            else None
        )
        self.frozen_memory = [s.memory for s in states] if self.memory is None else None

        blk = block
        # RMSNorm weights folded into the GEMMs that follow them; only mem_norm's stays
        # (a sigmoid follows it).
        self.eps = torch.full((1,), cfg.norm_eps, dtype=dtype, device=dev)
        self.proj_t = self.proj_t * blk.norm.weight[:, None]
        self.mem_norm_w = blk.mem_norm.weight.detach()
        self.out_t = (blk.out_proj.weight * blk.attn_norm.weight).t().contiguous()
        self.gate_up_t = (blk.ffn.gate_up.weight * blk.ffn_norm.weight).t().contiguous()
        self.down_t = blk.ffn.down.weight.t().contiguous()
        self.norm_w = blk.norm.weight
        fast_memory = self.memory is None or mem_cfg.activation in FAST_ACTIVATIONS
        self.cpp = cpp if fast_memory else None
        self._bind()

    def _bind(self) -> None:
        """Per-slot views of the buffers, so a step writes with one copy_ each."""
        cfg, span, p = self.cfg, self.span, self.n_persistent
        b, h, dh, cc = self.batch, cfg.n_heads, cfg.head_dim, self.conv_ch
        self.hist_now = [(self.history[:, i], self.history[:, i + span]) for i in range(span)]
        self.windows = [self.history[:, i + 1 : i + 1 + span] for i in range(span)]
        # The ring's views are made when a step first writes the slot: binding all W + 1
        # of them here would cost a join or a leave of the batch milliseconds.
        keys, values, raw, mask = self.keys, self.values, self.raw_keys, self.mask
        self.key_slots = _Views(self.ring, lambda j: keys[:, :, p + j, :dh])
        self.value_slots = _Views(self.ring, lambda j: values[:, :, p + j])
        self.raw_slots = _Views(self.ring, lambda j: raw[:, :, j])
        self.mask_slots = _Views(self.ring, lambda j: mask[:, :, 0, p + j])
        n_keys = self.keys.shape[2]
        self.mask_bh = self.mask.view(b * h, 1, n_keys)
        self.keys_t = self.keys.view(b * h, n_keys, 2 * dh).transpose(1, 2)
        self.values_bh = self.values.view(b * h, n_keys, dh)
        self.proj_split = [cc, cfg.d_model, self.proj_t.shape[1] - cc - cfg.d_model]
        self.conv_split = [2 * cfg.d_model, 2 * cfg.d_model, self.mem_channels]
        self.fast = None if self.cpp is None else self._fast_step(self.cpp)

    def _fast_step(self, cpp: ModuleType):
        """The C++ step (kernels/decode_step) bound to this layer's weights and buffers."""
        cfg, fast = self.cfg, cpp.LayerStep()
        fast.proj_t, fast.proj_bias, fast.taps = self.proj_t, self.proj_bias, self.taps
        fast.out_t, fast.gate_up_t, fast.down_t = self.out_t, self.gate_up_t, self.down_t
        fast.history, fast.keys, fast.values = self.history, self.keys, self.values
        fast.raw_keys, fast.mask = self.raw_keys, self.mask
        fast.heads, fast.head_dim = cfg.n_heads, cfg.head_dim
        fast.residual, fast.eps = cfg.memory_residual, cfg.norm_eps
        if self.mem_step is not None:
            fast.mem_norm_w = self.mem_norm_w
            self.mem_step.bind_fast(fast)
        return fast

    def step(self, x: Tensor, step: int, cos: Tensor, sin: Tensor, chunk_ends: list[int]) -> Tensor:
        """x (B, D) -> (B, D) for the token at decoder step `step`; cos, sin (dh,) its RoPE."""
        cfg = self.cfg
        b, d, h, dh = self.batch, cfg.d_model, cfg.n_heads, cfg.head_dim
        eps = self.eps
        proj = torch.addmm(self.proj_bias, x * _inv_rms(x, eps), self.proj_t)  # (B, out)
        conv_in, v, gate_logits = proj.split_with_sizes(self.proj_split, dim=1)
        i = step % self.span
        now, twin = self.hist_now[i]
        now.copy_(conv_in)
        twin.copy_(conv_in)
        window = self.windows[i]  # (B, L, ch) oldest first
        conv = (window * self.taps).sum(1)  # (B, ch)

        qk, partner, mem_in = conv.split_with_sizes(self.conv_split, dim=1)
        qk = qk.view(b, 2, h, dh)
        q_rot, k_rot = torch.addcmul(qk * cos, partner.view(b, 2, h, dh), sin).unbind(1)
        q, k = qk.unbind(1)
        j = step % self.ring
        self.key_slots[j].copy_(k_rot)
        self.value_slots[j].copy_(v.view(b, h, dh))
        self.raw_slots[j].copy_(k)
        self.mask_slots[j].fill_(0.0)
        query = torch.cat([q_rot, q], dim=-1).view(b * h, 1, 2 * dh)
        scores = torch.baddbmm(self.mask_bh, query, self.keys_t)  # (BH, 1, P + W + 1)
        y_attn = torch.bmm(scores.softmax(-1), self.values_bh).view(b, d)

        o = y_attn * _inv_rms(y_attn, eps)
        if self.mem_step is not None:
            c = self.memory.config.chunk_size
            y_mem = self.mem_step.step(F.silu(mem_in), gate_logits, step % c)
            if chunk_ends:
                self._write_chunks(x, y_mem, step, chunk_ends)
            gate = torch.sigmoid(y_mem * _inv_rms(y_mem, eps) * self.mem_norm_w)
            x = torch.addmm(x, o * gate, self.out_t)
            if cfg.memory_residual:
                x = x + y_mem
        else:  # memory off: the gate is sigmoid(0) = 1/2
            x = torch.addmm(x, o, self.out_t, alpha=0.5)
        g, u = torch.mm(x * _inv_rms(x, eps), self.gate_up_t).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(g) * u, self.down_t)

    def step_fast(
        self, x: Tensor, step: int, rope: tuple[Tensor, Tensor, int], chunk_ends: list[int]
    ) -> Tensor:
        """`step` through the C++ kernel: the same arithmetic, two calls. rope: the cos
        and sin tables and this step's row in them."""
        c = self.memory.config.chunk_size if self.mem_step is not None else 1
        o, y_mem = self.fast.attend(x, step, *rope, step % c)
        if y_mem is None:
            return self.fast.mix(x, o, o)  # no memory: its argument is not read
        if chunk_ends:
            self._write_chunks(x, y_mem, step, chunk_ends)
        return self.fast.mix(x, o, y_mem)

    def _write_chunks(self, x: Tensor, y_mem: Tensor, step: int, chunk_ends: list[int]) -> None:
        """The memory's write for the streams whose chunk ends at this step: their y_mem
        rows replaced by the chunk path's (MemoryStep.write_chunk)."""
        assert self.mem_step is not None
        if self.mem_step.write_open(chunk_ends):  # y_mem's rows stand as they are
            return
        cfg, d = self.cfg, self.cfg.d_model
        idx = torch.tensor(chunk_ends, device=x.device)
        cs = self.memory.config.conv_size
        window = self.windows[step % self.span]
        tail = window[idx, self.span - cs : self.span - 1, 4 * d :]
        hn = F.rms_norm(x[idx], (d,), self.norm_w, cfg.norm_eps)
        c = self.memory.config.chunk_size
        y_mem[idx] = self.mem_step.write_chunk(chunk_ends, hn, tail, step % c)

    def keep(self, streams: list[int]) -> None:
        idx = torch.tensor(streams, device=self.history.device)
        self.batch = len(streams)
        for name in ("history", "keys", "values", "raw_keys", "mask"):
            setattr(self, name, getattr(self, name)[idx])
        if self.mem_step is not None:
            self.mem_step.keep(streams)
        else:
            self.frozen_memory = [self.frozen_memory[i] for i in streams]
        self._bind()

    def extend(self, other: _LayerDecoder) -> None:
        """Append `other`'s streams (a decoder of the same block at the same step)."""
        for name in ("history", "keys", "values", "raw_keys", "mask"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.batch += other.batch
        if self.mem_step is not None:
            assert other.mem_step is not None
            self.mem_step.extend(other.mem_step)
        else:
            assert self.frozen_memory is not None and other.frozen_memory is not None
            self.frozen_memory = [*self.frozen_memory, *other.frozen_memory]
        self._bind()

    def export(self, stream: int, steps: int) -> BlockState:
        """Stream `stream`'s block state after `steps` steps (the last one is steps - 1)."""
        cfg = self.cfg
        d, w, k = cfg.d_model, cfg.window, cfg.attn_conv_size
        p, ring, span = self.n_persistent, self.ring, self.span
        one = slice(stream, stream + 1)
        i = (steps - 1) % span
        window = self.history[one, i + 1 : i + 1 + span]  # steps - L .. steps - 1
        slots = [(steps - w + j) % ring for j in range(w)]
        cache = AttentionCache(
            keys=self.raw_keys[one][:, :, slots].clone(),
            values=self.values[one][:, :, [p + s for s in slots]].clone(),
            query_tail=window[:, span - max(k - 1, 0) :, :d].clone(),
            key_tail=window[:, span - k :, d : 2 * d].clone(),
        )
        memory: MemoryState | None
        if self.mem_step is not None:
            cs = self.memory.config.conv_size
            tail = window[:, span - (cs - 1) :, 4 * d :]
            memory = self.mem_step.export(stream, steps, tail)
        else:
            memory = self.frozen_memory[stream]
        return BlockState(cache, memory)


class Decoder:
    """B single-stream states advanced one token per `step`, batched.

    Streams may sit at different positions and chunk offsets. `states()` gives
    them back as single-stream `ModelState`s after every token fed so far;
    `keep` drops streams (a finished or cancelled generation) and `extend` takes
    in another decoder's (a generation joining a running batch): built with
    `start` = this decoder's `steps`, its buffers line up slot for slot, so joining
    is one concatenation per buffer. A decoder's step counter only places tokens in
    its rings (and RoPE sees distances only), so where it starts changes nothing
    but the slots."""

    @torch.no_grad()
    def __init__(
        self,
        model: MAGModel,
        states: Sequence[ModelState],
        use_memory: bool = True,
        start: int = 0,
        fast: bool = True,
    ):
        if not states:
            raise ValueError("a decoder needs at least one state")
        for state in states:
            if state.batch != 1:
                raise ValueError(f"the decoder takes single-stream states, got {state.batch}")
        cfg = model.config
        self.model, self.config = model, cfg
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        positions = torch.cat([s.position for s in states])
        use_memory = use_memory and cfg.use_memory
        self.use_memory = use_memory
        cpp = _cpp_step(model) if fast else None
        self.layers = [
            _LayerDecoder(block, [s.blocks[i] for s in states], positions, use_memory, start, cpp)
            for i, block in enumerate(model.blocks)
        ]
        self.cpp = cpp if all(layer.fast is not None for layer in self.layers) else None
        self.chunk = c = cfg.memory.chunk_size if use_memory else 0
        # Per stream, relative to the decoder's step counter: position = positions + steps,
        # and the chunk's pending tokens are (pending + steps) % C.
        self.positions = positions - start
        self.pending = [
            (int(s.blocks[0].memory.pending) - start) % c if use_memory else 0 for s in states
        ]
        self.steps = start
        weight = model.embed.weight.detach()
        self.embed = weight
        self.eps = torch.full((1,), cfg.norm_eps, dtype=weight.dtype, device=weight.device)
        self.head_t = (model.lm_head.weight * model.norm.weight).t().contiguous()
        self._rope_base = 0
        self._rope: tuple[Tensor, Tensor] | None = None

    @property
    def batch(self) -> int:
        return len(self.pending)

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (B,) int64, one per stream -> next-token logits (B, V).

        No autograd context is entered (it costs tens of microseconds a token): every
        tensor the step touches was derived from the weights under no_grad."""
        s = self.steps
        ends = []
        if self.chunk:
            c = self.chunk
            ends = [i for i, p in enumerate(self.pending) if (p + s + 1) % c == 0]
        x = self.embed[tokens]  # (B, D)
        if self.cpp is not None:  # every layer on the C++ step
            rope = self._rope_table(s)
            for layer in self.layers:
                x = layer.step_fast(x, s, rope, ends)
            self.steps = s + 1
            return self.cpp.logits(x, self.head_t, self.config.norm_eps)
        cos, sin, row = self._rope_table(s)
        for layer in self.layers:
            x = layer.step(x, s, cos[row], sin[row], ends)
        self.steps = s + 1
        return torch.mm(x * _inv_rms(x, self.eps), self.head_t)

    def extend(self, other: Decoder) -> None:
        """Append `other`'s streams after this decoder's (built with start=self.steps)."""
        if other.steps != self.steps or other.use_memory != self.use_memory:
            raise ValueError(
                f"cannot join a decoder at step {other.steps} (memory {other.use_memory}) to "
                f"one at step {self.steps} (memory {self.use_memory})"
            )
        for layer, joining in zip(self.layers, other.layers, strict=True):
            layer.extend(joining)
        self.positions = torch.cat([self.positions, other.positions])
        self.pending = [*self.pending, *other.pending]

    def keep(self, streams: list[int]) -> None:
        """Keep only `streams`, in that order (indices into the current batch)."""
        for layer in self.layers:
            layer.keep(streams)
        self.positions = self.positions[torch.tensor(streams, device=self.positions.device)]
        self.pending = [self.pending[i] for i in streams]

    def state(self, stream: int) -> ModelState:
        """One stream's single-stream state after every token fed so far."""
        with torch.no_grad():
            blocks = tuple(layer.export(stream, self.steps) for layer in self.layers)
            return ModelState(
                position=self.positions[stream : stream + 1] + self.steps, blocks=blocks
            )

    def states(self) -> list[ModelState]:
        return [self.state(i) for i in range(self.batch)]

    def _rope_table(self, step: int) -> tuple[Tensor, Tensor, int]:
        """cos and sin tables (4096, dh) holding step `step`, and its row in them."""
        if self._rope is None or not self._rope_base <= step < self._rope_base + 4096:
            base = step - step % 4096
            cfg, weight = self.config, self.embed
            self._rope = _rope_rows(
                torch.arange(base, base + 4096),
                cfg.head_dim,
                cfg.rope_base,
                weight.dtype,
                weight.device,
            )
            self._rope_base = base
        cos, sin = self._rope
        return cos, sin, step - self._rope_base


def _cpp_step(model: MAGModel) -> ModuleType | None:
    """kernels.decode_step for a float32 or float64 model on the CPU once it is built (the
    first call starts the build and the eager step runs meanwhile); else None."""
    weight = model.embed.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64):
        return None
    return decode_step.module()


class _Views:
    """Views of one buffer by slot, each made on first use and kept."""

    def __init__(self, n: int, make: Callable[[int], Tensor]) -> None:
        self._make = make
        self._views: list[Tensor | None] = [None] * n

    def __getitem__(self, j: int) -> Tensor:
        view = self._views[j]
        if view is None:
            view = self._views[j] = self._make(j)
        return view


def _rope_rows(
    positions: Tensor, dh: int, base: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(L, dh) multipliers for rotate-by-swap: x_rot = x * cos + swap(x) * sin."""
    cos, sin = rope_angles(positions, dh, base)  # (L, dh/2) float64
    full_cos = torch.cat([cos, cos], dim=-1)
    full_sin = torch.cat([-sin, sin], dim=-1)
    return full_cos.to(device, dtype), full_sin.to(device, dtype)


def _inv_rms(x: Tensor, eps: Tensor) -> Tensor:
    """(B, D) -> (B, 1): RMSNorm's scale, 1 / sqrt(mean(x^2) + eps), in three dispatches
    (F.rms_norm takes several times as long at this size; its weight is folded into the
    next GEMM here). eps is a tensor: a Python scalar costs a tensor conversion per op."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
