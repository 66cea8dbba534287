"""Configuration of a MAG model (one frozen dataclass, JSON round trip)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from memsvc.configs import require_known_fields
from memsvc.memory import MemoryConfig
from memsvc.model.tokenizer import VOCAB_SIZE


def default_memory(dim: int) -> MemoryConfig:
    """The memory of the recipe that learned recall fastest (docs/TRAINING.md):
    a matrix memory per layer with the exact delta rule and lookahead keys."""
    return MemoryConfig(
        dim=dim,
        heads=4,
        depth=1,
        chunk_size=64,
        lookahead=True,
        update_rule="delta",
        optimizer="sgd",
        conv_size=4,
        tau=0.0,
    )


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a `MAGModel` and the layout of its streaming state.

    The defaults are the reference model: small enough to train on a CPU.
    """

    vocab_size: int = VOCAB_SIZE
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4  # attention heads
    window: int = 128  # W: a token attends to itself and the W tokens before it
    n_persistent: int = 4  # learned persistent tokens, visible to every query
    attn_conv_size: int = 4  # queries see the current and K-1 previous tokens, keys the K previous
    rope_base: float = 10_000.0
    ffn_mult: float = 3.0  # SwiGLU hidden width = ffn_mult * d_model
    norm_eps: float = 1e-6
    use_memory: bool = True  # False: the sliding-window-only ablation (no memory at all)
    memory_residual: bool = True  # also add the memory output to the residual stream
    memory: MemoryConfig | None = None  # None: default_memory(d_model)

    def __post_init__(self) -> None:
        if self.memory is None:
            object.__setattr__(self, "memory", default_memory(self.d_model))
        _require(self.vocab_size > 0, "vocab_size must be positive")
        _require(self.d_model > 0 and self.n_layers > 0, "d_model and n_layers must be positive")
        _require(
            self.n_heads > 0 and self.d_model % self.n_heads == 0, "n_heads must divide d_model"
        )
        _require(self.head_dim % 2 == 0, "the attention head size must be even (RoPE)")
        _require(self.window >= 1, "window must be >= 1")
        _require(self.n_persistent >= 0, "n_persistent must be >= 0")
        _require(self.attn_conv_size >= 0, "attn_conv_size must be >= 0 (0: no convolution)")
        _require(self.rope_base > 1, "rope_base must be > 1")
        _require(self.ffn_mult > 0 and self.norm_eps > 0, "ffn_mult and norm_eps must be positive")
        _require(self.memory.dim == self.d_model, "memory.dim must equal d_model")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return max(1, round(self.ffn_mult * self.d_model))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; the memory config nests as its own `to_dict`."""
        data = asdict(self)
        if self.memory is not None:
            data["memory"] = self.memory.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        require_known_fields(cls, data)
        data = dict(data)
        if data.get("memory") is not None:
            data["memory"] = MemoryConfig.from_dict(data["memory"])
        return cls(**data)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig: {message}")
