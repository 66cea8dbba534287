"""`ChunkPath`: one stream's small append (1 .. W tokens) through the C++ block.

`MAGModel.forward` on a 64-token append is about 1,700 ATen ops of a few microseconds
each, most of its time. `kernels/decode_step/chunk.cpp` runs one MAG block over
the chunk in one call (its GEMMs as ATen calls, everything between them plain
loops), so a layer costs a handful of dispatches. This module prepares each block's
weights for it once (the fused projection with the block norm folded in, as the
decoder's; out-projection and SwiGLU with their norms folded in), takes the
`ModelState` of one stream apart for it and puts the result back together.

It covers what the served models are: float32 or float64 on the CPU, a depth-1
delta-rule memory (any write gate, mitigation, retention) or no memory. Anything
else (`supports` is False) takes `MAGModel.forward`, which is also its reference:
tests/model/test_chunk_fast.py holds the two equal on random models, states and
splits.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from memsvc.memory import MemoryState, NeuralMemory, NonFiniteStateError
from memsvc.model.attention import AttentionCache
from memsvc.model.mag import BlockState, MAGBlock
from memsvc.model.model import MAGModel, ModelState

# The memory state as the kernel takes it: these without their batch dimension, ...
_PER_STREAM = ("pending_k", "pending_v", "pending_gates", "conv_tail", "last_query")
# ... then these as (1,) tensors.
_COUNTERS = (
    "chunks",
    "writes_applied",
    "writes_skipped",
    "surprise_ema",
    "write_rate",
    "step_scale",
    "forget_boost",
)


def supports(model: MAGModel) -> bool:
    """Whether the C++ block can run this model (else `MAGModel.forward` does)."""
    cfg, weight = model.config, model.embed.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64):
        return False
    if cfg.head_dim % 2:
        return False
    if not cfg.use_memory:
        return True
    mem = cfg.memory
    return mem.update_rule == "delta" and mem.depth == 1 and mem.dim == cfg.d_model


class ChunkPath:
    """The C++ block bound to every layer of `model` (weights copied: rebuild it after
    the model's weights change)."""

    @torch.no_grad()
    def __init__(self, model: MAGModel, cpp: ModuleType) -> None:
        if not supports(model):
            raise ValueError("the C++ chunk path does not cover this model")
        self.model = model
        self.window = model.config.window
        self.layers = [_bind(block, cpp.ChunkBlock()) for block in model.blocks]
        self.head_t = (model.lm_head.weight * model.norm.weight).t().contiguous()
        self.cpp = cpp

    def runs(self, tokens: Tensor, state: ModelState) -> bool:
        """Whether this call can take the C++ path: one stream, 1 .. W tokens, a state in
        the model's dtype."""
        if tokens.shape[0] != 1 or not 1 <= tokens.shape[1] <= self.window or state.batch != 1:
            return False
        block = state.blocks[0]
        dtypes = {block.attention.keys.dtype}
        if block.memory is not None:
            dtypes.add(block.memory.weights[0].dtype)
        return dtypes == {self.head_t.dtype}

    @torch.no_grad()
    def forward(
        self, tokens: Tensor, state: ModelState, use_memory: bool = True
    ) -> tuple[Tensor, ModelState]:
        """tokens (1, T) -> logits (1, V) after the last token, and the new state: what
        `MAGModel.forward(tokens, state, use_memory, last_only=True)` gives (its logits'
        last row)."""
        t = tokens.shape[1]
        n_cached = min(int(state.position[0]), self.window)
        x = self.model.embed.weight[tokens[0]]  # (T, D)
        blocks = []
        last = len(self.layers) - 1
        for i, (layer, block) in enumerate(zip(self.layers, state.blocks, strict=True)):
            memory = block.memory if use_memory and layer.mem_taps is not None else None
            cache = block.attention
            out = layer.forward(
                x,
                n_cached,
                cache.keys[0],
                cache.values[0],
                cache.query_tail[0],
                cache.key_tail[0],
                _memory_inputs(memory),
                i == last,
            )
            x = out[0]
            attention = AttentionCache(*(o.unsqueeze(0) for o in out[1:5]))
            if memory is not None:
                memory = _memory_state(memory, out[5:], t, self.model.blocks[i].memory)
            blocks.append(BlockState(attention, block.memory if memory is None else memory))
        logits = self.cpp.logits(x[-1:], self.head_t, self.model.config.norm_eps)
        return logits, ModelState(position=state.position + t, blocks=tuple(blocks))


def _bind(block: MAGBlock, fast: ModuleType) -> ModuleType:
    """One block's weights laid out for `ChunkBlock` (kernels/decode_step/chunk.cpp)."""
    cfg, attn = block.config, block.attention
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
    dtype = attn.to_qkv.weight.dtype
    aq, ak, av = attn.to_qkv.weight.split(d)
    memory = block.memory
    parts, bias = [aq, ak], [aq.new_zeros(2 * d)]
    if memory is not None:
        parts.append(memory.to_qkv.weight)
        bias.append(aq.new_zeros(memory.channels))
    parts.append(av)
    bias.append(aq.new_zeros(d))
    if memory is not None:
        parts.append(memory.to_gates.weight)
        bias.append(memory.to_gates.bias)
    fast.proj_t = (torch.cat(parts).t() * block.norm.weight[:, None]).contiguous()
    fast.proj_bias = torch.cat(bias).contiguous()
    if attn.query_conv is not None:
        fast.q_taps = attn.query_conv[:, 0].t().contiguous()  # (K, D)
        fast.k_taps = attn.key_conv[:, 0].t().contiguous()
    fast.rope_cos = attn.rope_cos.to(dtype).contiguous()
    fast.rope_sin = attn.rope_sin.to(dtype).contiguous()
    fast.pkeys = attn.persistent_keys.detach().contiguous()
    fast.pvalues = attn.persistent_values.detach().contiguous()
    fast.out_t = (block.out_proj.weight * block.attn_norm.weight).t().contiguous()
    fast.gate_up_t = (block.ffn.gate_up.weight * block.ffn_norm.weight).t().contiguous()
    fast.down_t = block.ffn.down.weight.t().contiguous()
    fast.heads, fast.head_dim, fast.window = h, dh, cfg.window
    fast.residual, fast.eps = cfg.memory_residual, cfg.norm_eps
    if memory is not None:
        mem = memory.config
        fast.mem_taps = memory.conv_weight[:, 0].t().contiguous()  # (cs, channels)
        fast.mem_norm_w = block.mem_norm.weight.detach().contiguous()
        if memory.out_proj is not None:
            fast.mem_out_t = memory.out_proj.weight.t().contiguous()
        max_forget = mem.max_forget if mem.retention == "l2" else 0.0
        fast.gate_scale = torch.tensor([mem.max_step, mem.max_momentum, max_forget], dtype=dtype)
        fast.mem_heads, fast.mem_head_dim, fast.chunk = mem.heads, mem.head_dim, mem.chunk_size
        fast.lookahead = mem.lookahead
        gate = memory.gate
        fast.tau, fast.surprise_beta, fast.relative = gate.tau, gate.surprise_beta, gate.relative
        fast.adaptive, fast.lambda_0, fast.lambda_max = (
            gate.adaptive_forgetting,
            gate.lambda_0,
            gate.lambda_max,
        )
        fast.min_write_rate, fast.write_rate_beta = gate.min_write_rate, gate.write_rate_beta
    return fast


def _memory_inputs(memory: MemoryState | None) -> list[Tensor]:
    if memory is None:
        return []
    return [
        memory.weights[0][0],
        *(getattr(memory, name)[0] for name in _PER_STREAM),
        *(getattr(memory, name) for name in _COUNTERS),
    ]


def _memory_state(
    memory: MemoryState, out: list[Tensor], t: int, module: NeuralMemory
) -> MemoryState:
    """The block's new memory state from the kernel's outputs (the batch dimension put
    back); NonFiniteStateError, as the module raises it, for a non-finite write."""
    weights, pk, pv, pg, conv_tail, last_query, *counters, finite = out
    chunks, applied, skipped, surprise_ema, write_rate = counters
    state = MemoryState(
        weights=(weights.unsqueeze(0),),
        momentum=(),
        pending_k=pk.unsqueeze(0),
        pending_v=pv.unsqueeze(0),
        pending_gates=pg.unsqueeze(0),
        conv_tail=conv_tail.unsqueeze(0),
        last_query=last_query.unsqueeze(0),
        tokens=memory.tokens + t,
        chunks=chunks,
        writes_applied=applied,
        writes_skipped=skipped,
        surprise_ema=surprise_ema,
        write_rate=write_rate,
        step_scale=memory.step_scale,
        forget_boost=memory.forget_boost,
    )
    if module.check_finite and not bool(finite):
        raise NonFiniteStateError(state.non_finite())
    return state
