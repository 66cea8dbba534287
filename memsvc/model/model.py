"""`MAGModel`: byte embedding, MAG blocks, final norm, LM head; and its streaming state.

One forward serves training (whole sequences from a fresh state) and
streaming (any split of a stream, carrying `ModelState` between calls): the
outputs agree to float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from memsvc.memory import MemoryState
from memsvc.model.attention import AttentionCache
from memsvc.model.config import ModelConfig
from memsvc.model.mag import BlockState, MAGBlock


@dataclass
class ModelState:
    """Streaming state of B streams: per block an attention cache and a memory state,
    plus each stream's position. Its size does not grow with the stream: the
    attention part is constant, the memory's pending partial chunk stays < chunk_size."""

    position: Tensor  # (B,) int64 tokens seen
    blocks: tuple[BlockState, ...]

    @property
    def batch(self) -> int:
        return self.position.shape[0]

    def to_dict(self) -> dict[str, Tensor]:
        """A flat dict of tensors (safetensors-ready); `from_dict` inverts it exactly."""
        out = {"position": self.position}
        for i, block in enumerate(self.blocks):
            out.update({f"blocks.{i}.{k}": v for k, v in block.to_dict().items()})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Tensor]) -> ModelState:
        blocks: dict[int, dict[str, Tensor]] = {}
        for key, value in data.items():
            if key == "position":
                continue
            prefix, index, name = key.split(".", 2)
            if prefix != "blocks":
                raise ValueError(f"unexpected model state entry {key!r}")
            blocks.setdefault(int(index), {})[name] = value
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(f"model state blocks are not 0..n-1: {sorted(blocks)}")
        return cls(
            position=data["position"],
            blocks=tuple(BlockState.from_dict(blocks[i]) for i in range(len(blocks))),
        )

    def nbytes(self) -> int:
        """Bytes of every tensor `to_dict` holds, counted without building it (on every append)."""
        total = self.position.nbytes
        for block in self.blocks:
            total += block.attention.nbytes()
            if block.memory is not None:
                total += block.memory.nbytes()
        return total

    def map(self, fn: Callable[[Tensor], Tensor]) -> ModelState:
        """Apply fn to every tensor (device moves, clones, detach)."""
        return ModelState.from_dict({k: fn(v) for k, v in self.to_dict().items()})

    def clone(self) -> ModelState:
        return self.map(lambda t: t.clone())

    def detach(self) -> ModelState:
        return self.map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> ModelState:
        return self.map(lambda t: t.to(device))

    @staticmethod
    def stack(states: list[ModelState]) -> ModelState:
        """Concatenate streams along the batch dimension. Positions may differ; the
        memory states must have equal pending lengths (MemoryState.stack)."""
        blocks = []
        for per_block in zip(*(s.blocks for s in states), strict=True):
            caches = [b.attention.to_dict() for b in per_block]
            attention = {k: torch.cat([c[k] for c in caches]) for k in caches[0]}
            memories = [b.memory for b in per_block]
            memory = None if memories[0] is None else MemoryState.stack(memories)
            blocks.append(BlockState(AttentionCache.from_dict(attention), memory))
        position = torch.cat([s.position for s in states])
        return ModelState(position=position, blocks=tuple(blocks))

    def with_mitigation(self, step_scale: float, forget_boost: float) -> ModelState:
        """The same state with every memory layer's mitigation knobs set
        (`MemoryState.with_mitigation`); the ops guards turn these."""
        blocks = tuple(
            replace(b, memory=b.memory.with_mitigation(step_scale, forget_boost))
            if b.memory is not None
            else b
            for b in self.blocks
        )
        return ModelState(position=self.position, blocks=blocks)

    def unstack(self) -> list[ModelState]:
        """Split into B single-stream states."""
        d = self.to_dict()
        return [
            ModelState.from_dict({k: v[b : b + 1] for k, v in d.items()}) for b in range(self.batch)
        ]


class MAGModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(MAGBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> ModelState:
        """A fresh state for `batch` streams (position 0, empty window, initial memory)."""
        dev = self.embed.weight.device if device is None else torch.device(device)
        dtype = self.embed.weight.dtype
        return ModelState(
            position=torch.zeros(batch, dtype=torch.int64, device=dev),
            blocks=tuple(block.init_state(batch, dev, dtype) for block in self.blocks),
        )

    def forward(
        self,
        tokens: Tensor,
        state: ModelState | None = None,
        use_memory: bool = True,
        last_only: bool = False,
    ) -> tuple[Tensor, ModelState]:
        """tokens: (B, T) int64 -> logits (B, T, vocab) and the state after them.

        state=None starts fresh streams. use_memory=False zeroes the memory branch
        for this call and leaves the memory states untouched (ablation). last_only:
        logits (B, 1, vocab) of the last token only, and the same state; the last block's
        tail and the LM head then run on one row (an append needs no more)."""
        b, t = tokens.shape
        if state is None:
            state = self.init_state(b, tokens.device)
        if state.batch != b:
            raise ValueError(f"state holds {state.batch} streams, tokens have {b}")
        x = self.embed(tokens)  # (B, T, D)
        blocks = []
        last = len(self.blocks) - 1
        for i, (block, block_state) in enumerate(zip(self.blocks, state.blocks, strict=True)):
            x, block_state = block(
                x, block_state, state.position, use_memory, last_only and i == last
            )
            blocks.append(block_state)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        return logits, ModelState(position=state.position + t, blocks=tuple(blocks))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
