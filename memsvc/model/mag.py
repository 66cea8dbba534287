"""The MAG block (Titans' Memory As a Gate) and its streaming state.

    x -> norm -> [ sliding-window attention , neural memory ]
      -> o = norm(y_attn) * sigmoid(norm(y_mem)) -> out-proj -> residual
      (+ y_mem on the residual when memory_residual)
      -> norm -> SwiGLU FFN -> residual

With the memory off (no memory in the config, or use_memory=False at call
time) y_mem is zero: the gate is a constant 1/2 and the memory state passes
through unchanged. That is the sliding-window-only ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memsvc.memory import MemoryState, NeuralMemory
from memsvc.model.attention import AttentionCache, SlidingWindowAttention
from memsvc.model.config import ModelConfig


@dataclass
class BlockState:
    """Streaming state of one block: attention cache and memory state (None without memory)."""

    attention: AttentionCache
    memory: MemoryState | None

    def to_dict(self) -> dict[str, Tensor]:
        out = {f"attention.{k}": v for k, v in self.attention.to_dict().items()}
        if self.memory is not None:
            out.update({f"memory.{k}": v for k, v in self.memory.to_dict().items()})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Tensor]) -> BlockState:
        parts: dict[str, dict[str, Tensor]] = {"attention": {}, "memory": {}}
        for key, value in data.items():
            part, _, name = key.partition(".")
            parts[part][name] = value
        memory = MemoryState.from_dict(parts["memory"]) if parts["memory"] else None
        return cls(AttentionCache.from_dict(parts["attention"]), memory)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.down(F.silu(gate) * up)


class MAGBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, eps = config.d_model, config.norm_eps
        self.norm = nn.RMSNorm(d, eps=eps)
        self.attention = SlidingWindowAttention(config)
        self.memory = NeuralMemory(config.memory) if config.use_memory else None
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        self.mem_norm = nn.RMSNorm(d, eps=eps)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d, eps=eps)
        self.ffn = SwiGLU(d, config.ffn_hidden)
        # nanoGPT's init; projections onto the residual scaled by depth. The memory
        # module keeps its own initialisation (its gates have tuned biases).
        residual_std = 0.02 / (2 * config.n_layers) ** 0.5
        nn.init.normal_(self.ffn.gate_up.weight, std=0.02)
        nn.init.normal_(self.out_proj.weight, std=residual_std)
        nn.init.normal_(self.ffn.down.weight, std=residual_std)

    def init_state(
        self,
        batch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> BlockState:
        memory = None
        if self.memory is not None:  # memory math stays in float32 or wider
            memory = self.memory.init_state(
                batch, device, torch.promote_types(dtype, torch.float32)
            )
        return BlockState(self.attention.init_cache(batch, device, dtype), memory)

    def forward(
        self,
        x: Tensor,
        state: BlockState,
        position: Tensor,
        use_memory: bool = True,
        last_only: bool = False,
    ) -> tuple[Tensor, BlockState]:
        """x: (B, T, D); position: (B,) tokens seen before x. Returns (B, T, D) and the state;
        last_only: (B, 1, D), the output at the last token only (the state is the same: it
        depends on the block's input; the attention's output, the gate, out-projection and
        FFN run for one row)."""
        h = self.norm(x)
        y_attn, attention = self.attention(h, state.attention, position, last_only)
        if self.memory is not None and use_memory:
            y_mem, memory = self.memory(h, state.memory)  # (B, T, D)
        else:
            y_mem, memory = torch.zeros_like(h), state.memory
        if last_only:  # the attention gave the last token's output alone
            x, y_mem = x[:, -1:], y_mem[:, -1:]
        o = self.attn_norm(y_attn) * torch.sigmoid(self.mem_norm(y_mem))
        x = x + self.out_proj(o)
        if self.config.memory_residual:
            x = x + y_mem
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(attention, memory)
