"""Configuration of the neural long-term memory (one frozen dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from kernels.lmm.rule import Activation, ChunkRule, Objective, Optimizer
from memsvc.configs import require_known_fields

Retention = Literal["l2", "none"]
UpdateRule = Literal["chunk", "delta"]
GateMode = Literal["absolute", "relative"]


@dataclass(frozen=True)
class MemoryConfig:
    """Everything that defines a `NeuralMemory`, its state layout and its update.

    The defaults reproduce the Titans equations (docs/ARCHITECTURE.md, "The memory"): MSE
    objective, L2 retention (learned forgetting), momentum SGD, gradients at the
    chunk-start weights, writes always applied (tau = 0).
    """

    dim: int
    heads: int = 1
    depth: int = 2  # 1 = linear matrix memory, >= 2 = residual MLP x + MLP(x)
    expansion: float = 4.0  # hidden width of the MLP memory = head_dim * expansion
    activation: Activation = "gelu"
    chunk_size: int = 64
    conv_size: int = 4  # depthwise causal convolution on q, k, v (1 = none)
    lookahead: bool = False  # key_t = query of position t-1, value_t from token t
    update_rule: UpdateRule = "chunk"  # "delta": exact within-chunk delta rule (depth 1)
    objective: Objective = "mse"
    huber_delta: float = 1.0
    lp_p: float = 1.5
    retention: Retention = "l2"
    optimizer: Optimizer = "momentum"
    # Data-dependent gates are squashed to (0, max): theta_t = max_step * sigmoid(.)
    max_step: float = 1.0
    max_momentum: float = 0.95
    max_forget: float = 0.5
    # Initial biases of the gate logits. Forgetting starts near zero: long-range
    # recall dies otherwise (docs/TRAINING.md).
    step_bias: float = 1.0
    momentum_bias: float = 0.0
    forget_bias: float = -12.0
    # Numerics: NLMS-style per-token step theta_t / max(1, curvature bound), and a
    # cap on the Frobenius norm of one chunk's weight update (None: no cap).
    normalize_step: bool = True
    max_update_norm: float | None = 10.0
    # The seed's write gate: surprise = ||chunk gradient||_2, EMA with surprise_beta,
    # the chunk is written only when the EMA exceeds tau (tau = 0: always). "relative":
    # only when the chunk's own surprise exceeds tau x the EMA of the chunks before it, a
    # threshold that follows each block's (and each stream's) own surprise level.
    tau: float = 0.0
    surprise_beta: float = 0.8
    gate: GateMode = "absolute"
    # Training only (grad enabled, module in training mode), relative gate: the forward
    # stays the hard gate, the backward sees sigmoid((surprise / EMA - tau) / gate_softness)
    # as the share of the update written (straight through), so a skipped chunk that
    # would have helped teaches the memory to make such chunks stand out.
    gate_softness: float = 0.1
    # The seed's adaptive forgetting: lambda_t = lambda_0 / max(write_rate, min_write_rate),
    # at most lambda_max, applied to the weights on each written chunk.
    adaptive_forgetting: bool = False
    lambda_0: float = 1e-4
    lambda_max: float = 1e-2
    min_write_rate: float = 0.01
    write_rate_beta: float = 0.9
    output_proj: bool | None = None  # None: only when heads > 1

    def __post_init__(self) -> None:
        _require(self.dim > 0, "dim must be positive")
        _require(self.heads > 0 and self.dim % self.heads == 0, "heads must divide dim")
        _require(1 <= self.depth <= 12, "depth must be in 1..12")
        _require(self.expansion > 0, "expansion must be positive")
        _require(self.chunk_size >= 1, "chunk_size must be >= 1")
        _require(self.conv_size >= 1, "conv_size must be >= 1")
        _require(0 < self.max_step <= 10, "max_step must be in (0, 10]")
        _require(0 < self.max_momentum < 1, "max_momentum must be in (0, 1)")
        _require(0 < self.max_forget < 1, "max_forget must be in (0, 1)")
        _require(self.huber_delta > 0, "huber_delta must be positive")
        _require(self.lp_p >= 1, "lp_p must be >= 1")
        _require(self.tau >= 0, "tau must be >= 0")
        _require(self.gate in ("absolute", "relative"), "gate must be absolute or relative")
        _require(self.gate_softness > 0, "gate_softness must be positive")
        _require(0 <= self.surprise_beta < 1, "surprise_beta must be in [0, 1)")
        _require(0 <= self.write_rate_beta < 1, "write_rate_beta must be in [0, 1)")
        _require(0 <= self.lambda_0 <= self.lambda_max < 1, "need 0 <= lambda_0 <= lambda_max < 1")
        _require(0 < self.min_write_rate <= 1, "min_write_rate must be in (0, 1]")
        _require(
            self.max_update_norm is None or self.max_update_norm > 0,
            "max_update_norm must be positive or None",
        )
        if self.update_rule == "delta":
            _require(self.depth == 1, "the exact delta rule needs depth 1 (a matrix memory)")
            _require(self.objective == "mse", "the exact delta rule needs the MSE objective")
            _require(
                self.optimizer == "sgd", "the exact delta rule has no momentum (optimizer=sgd)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden_dim(self) -> int:
        return max(1, round(self.head_dim * self.expansion))

    @property
    def has_output_proj(self) -> bool:
        return self.heads > 1 if self.output_proj is None else self.output_proj

    @property
    def has_momentum(self) -> bool:
        return self.chunk_rule.has_momentum

    @property
    def chunk_rule(self) -> ChunkRule:
        """What kernels.lmm's chunk update needs of this config."""
        return ChunkRule(
            activation=self.activation,
            objective=self.objective,
            huber_delta=self.huber_delta,
            lp_p=self.lp_p,
            optimizer=self.optimizer,
            normalize_step=self.normalize_step,
            max_update_norm=self.max_update_norm,
        )

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each memory weight matrix, first layer first."""
        d, h = self.head_dim, self.hidden_dim
        if self.depth == 1:
            return [(d, d)]
        return [(d, h)] + [(h, h)] * (self.depth - 2) + [(h, d)]

    def to_dict(self) -> dict[str, Any]:
        """The fields, without those added after models shipped while they hold the value
        those models had: a model's hash (and the hash sessions pin) covers this dict, so
        a new knob left at its default changes no shipped model's identity."""
        data = asdict(self)
        for name, value in _ADDED_LATER.items():
            if data[name] == value:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        require_known_fields(cls, data)
        return cls(**data)


# Fields added after models shipped, with the value every earlier model behaves as.
_ADDED_LATER: dict[str, Any] = {"gate": "absolute", "gate_softness": 0.1}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"MemoryConfig: {message}")
