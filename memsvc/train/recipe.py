"""The training recipe: model presets, curriculum, optimizer groups and learning-rate schedule.

Every knob of a run that changes what the model learns lives in `TrainRecipe`
(one frozen dataclass, stored in each checkpoint so a resume continues the
same run). The defaults are the recipe that learned recall in
docs/TRAINING.md: AdamW at 2e-3, answer loss + 0.3 x next-byte loss,
gate and convolution parameters at 5x the learning rate, the in-window
warm-up first.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from memsvc.configs import require_known_fields
from memsvc.memory import MemoryConfig
from memsvc.model import ModelConfig
from memsvc.model.config import default_memory
from memsvc.model.tokenizer import VOCAB_SIZE
from memsvc.train.choices import CURRICULA, MEMORY_KINDS, PRESETS, MemoryKind
from memsvc.train.tasks import (
    Stage,
    facts_curriculum,
    long_128k_curriculum,
    long_context_curriculum,
    long_mixed_curriculum,
    recall_curriculum,
    reference_curriculum,
)

# Parameters that train at `fast_lr_mult` x the learning rate (docs/TRAINING.md,
# item 4): the memory's gates and convolutions and the attention's q/k convolutions.
FAST_PARAMETERS = ("to_gates", "conv_weight", "query_conv", "key_conv")

TOKENS_PER_STEP = 8192  # the reference curriculum's tokens per optimizer step


# ---- the model ---------------------------------------------------------------------------


def memory_config(kind: MemoryKind, dim: int, chunk_size: int = 64) -> MemoryConfig:
    """The two memories a run can train.

    delta: one matrix per head with the exact chunkwise delta rule (the memory
    that learned recall fastest). mlp: the deep memory `x + W2 gelu(W1 x)`,
    dim -> 2 dim -> dim, gradients at the chunk-start weights, W1 drawn at std 1
    and a loose update clip (10): the variant that learned as fast in the notes'
    third experiment.
    """
    if kind == "delta":
        return replace(default_memory(dim), chunk_size=chunk_size)
    if kind in ("deep2", "deep4"):
        # The seed's Titans memory: a residual MLP per head (depth 2 or the seed's default
        # 4), momentum on the surprise, gradients at the chunk-start weights; W1 at std 1
        # and a loose update clip, as the MLP variant that learned (notes above).
        return MemoryConfig(
            dim=dim,
            heads=4,
            depth=2 if kind == "deep2" else 4,
            expansion=2.0,
            chunk_size=chunk_size,
            lookahead=True,
            update_rule="chunk",
            optimizer="momentum",
            conv_size=4,
            max_update_norm=10.0,
            tau=0.0,
        )
    if kind == "mlp":
        return MemoryConfig(
            dim=dim,
            heads=1,
            depth=2,
            expansion=2.0,
            chunk_size=chunk_size,
            lookahead=True,
            update_rule="chunk",
            optimizer="sgd",
            conv_size=4,
            max_update_norm=10.0,
            tau=0.0,
        )
    raise ValueError(f"unknown memory kind {kind!r} ({', '.join(MEMORY_KINDS)})")


def model_config(source: str, memory: MemoryKind | None = None) -> ModelConfig:
    """A preset name (`tiny`, `reference`) or the path of a JSON ModelConfig.

    `memory` picks the memory (presets default to delta; a JSON file keeps its
    own unless `memory` is given, and then keeps its chunk size).
    """
    if source == "reference":
        base = ModelConfig()
        return replace(base, memory=memory_config(memory or "delta", base.d_model))
    if source == "tiny":  # seconds per test; the window still holds a passkey needle + question
        return ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            window=80,
            n_persistent=2,
            ffn_mult=2.0,
            memory=memory_config(memory or "delta", 32, chunk_size=16),
        )
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--config {source!r} is neither a preset {PRESETS} nor a JSON file")
    config = ModelConfig.from_dict(json.loads(path.read_text()))
    if memory is not None:  # the file's chunk size stays
        chunk = config.memory.chunk_size
        config = replace(config, memory=memory_config(memory, config.d_model, chunk))
    return config


# ---- the recipe --------------------------------------------------------------------------


def curriculum(
    window: int, batch_size: int | None = None, name: str = "reference"
) -> tuple[Stage, ...]:
    """A named curriculum. reference: from scratch (8192 tokens per step); long: the
    long-context fine-tuning after it (32768 tokens per step). `batch_size` is the first
    stage's sequences per step; later stages keep the same tokens per step."""
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum {name!r} ({', '.join(CURRICULA)})")
    build = {
        "reference": reference_curriculum,
        "long": long_context_curriculum,
        "recall": recall_curriculum,
        "facts": facts_curriculum,
        "long-mixed": long_mixed_curriculum,
        "long-128k": long_128k_curriculum,
    }[name]
    if batch_size is None:
        return build(window) if name.startswith("long") else build(window, TOKENS_PER_STEP)
    first_length = build(window)[0].length
    return build(window, tokens_per_step=batch_size * first_length)


@dataclass(frozen=True)
class TrainRecipe:
    """What a run learns and how; stored in every checkpoint."""

    stages: tuple[Stage, ...]
    seed: int = 0
    init_from: str | None = None  # a model directory whose weights start the run
    # A model directory whose backbone (every parameter outside the memory modules) starts
    # the run; the memory starts fresh, so memories of any kind compare from one backbone.
    init_backbone_from: str | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 20
    max_steps: int | None = None  # None: the curriculum's steps; the cosine spans these
    weight_decay: float = 0.1  # on matrices of linear layers and the embedding only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    fast_lr_mult: float = 5.0  # FAST_PARAMETERS
    next_byte_weight: float = 0.3  # loss = answer loss + w * next-byte loss
    # + key_loss_weight * the key-alignment loss of keyed facts (memsvc/train/key_loss.py)
    key_loss_weight: float = 0.0
    # "linear" (key_loss.linear_key_loss), "both" (their sum) or "spread" (softmax +
    # key_loss.spread_key_loss: the facts' own write keys kept near-orthogonal)
    key_loss_kind: str = "softmax"
    key_loss_temperature: float = 0.1
    # A stage ends after its steps, or once the mean exact-match of its last
    # `advance_window` batches reaches `advance_at` (None: by steps only).
    advance_at: float | None = 0.95
    advance_window: int = 10
    # Guarding the run: a step with a non-finite loss or gradient, or a loss above
    # explode_factor * EMA + explode_slack, is skipped; `max_bad_steps` in a row roll
    # back to the last checkpoint with the learning rate times `rollback_lr_factor`.
    explode_factor: float = 3.0
    explode_slack: float = 1.0
    # ... and above this floor: a loss under ln(vocab) (guessing every byte uniformly) is
    # never an explosion. Without it, one hard batch (batch size 1 at 8k: an mqar sample
    # after passkey ones) reads as an explosion and the run rolls itself back to death.
    explode_floor: float = math.log(VOCAB_SIZE)
    explode_warmup: int = 10  # good steps of a stage before the explosion test applies
    max_bad_steps: int = 3
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 5
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        _require(len(self.stages) >= 1, "at least one stage")
        _require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr > 0, min_lr_ratio in [0, 1]")
        _require(self.warmup_steps >= 0, "warmup_steps >= 0")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps >= 1")
        _require(self.grad_clip > 0 and self.fast_lr_mult > 0, "grad_clip, fast_lr_mult > 0")
        _require(self.next_byte_weight >= 0, "next_byte_weight >= 0")
        _require(self.key_loss_weight >= 0, "key_loss_weight >= 0")
        _require(self.key_loss_temperature > 0, "key_loss_temperature > 0")
        _require(
            self.key_loss_kind in ("softmax", "linear", "both", "spread"),
            "key_loss_kind softmax/linear/both/spread",
        )
        _require(self.advance_at is None or 0 < self.advance_at <= 1, "advance_at in (0, 1]")
        _require(self.advance_window >= 1 and self.max_bad_steps >= 1, "windows >= 1")
        _require(0 < self.rollback_lr_factor < 1, "rollback_lr_factor in (0, 1)")
        _require(self.checkpoint_every >= 1 and self.keep_checkpoints >= 1, "checkpoints >= 1")
        _require(self.log_every >= 1, "log_every >= 1")

    @property
    def total_steps(self) -> int:
        return self.max_steps or sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        require_known_fields(cls, data)
        data = dict(data)
        data["stages"] = tuple(
            Stage(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
            for s in data["stages"]
        )
        data["betas"] = tuple(data["betas"])
        return cls(**data)


def learning_rate_multiplier(recipe: TrainRecipe, step: int) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then a cosine down to `min_lr_ratio`
    at `total_steps` (and flat after it)."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    span = max(1, recipe.total_steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine


def parameter_groups(model: nn.Module, recipe: TrainRecipe) -> list[dict[str, Any]]:
    """AdamW groups: weight decay only on the weight matrices of linear layers and the
    embedding (not on norms, biases, convolutions, persistent tokens or the memory's
    initial weights); FAST_PARAMETERS at `fast_lr_mult` x the learning rate. Each
    group carries its `lr_mult`; the trainer sets lr = lr_mult * schedule."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        fast = any(marker in name.split(".") for marker in FAST_PARAMETERS)
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        decay = name.endswith(".weight") and isinstance(module, nn.Linear | nn.Embedding)
        groups.setdefault((fast, decay), []).append(param)
    return [
        {
            "params": params,
            "lr_mult": recipe.fast_lr_mult if fast else 1.0,
            "weight_decay": recipe.weight_decay if decay else 0.0,
        }
        for (fast, decay), params in sorted(groups.items())
    ]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"TrainRecipe: {message}")
