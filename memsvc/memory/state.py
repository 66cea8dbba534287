"""The streaming state of a neural memory: fixed size, whatever the stream length."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


class NonFiniteStateError(FloatingPointError):
    """A memory state holds NaN or inf; `fields` names which tensors and streams."""

    def __init__(self, bad: dict[str, list[int]]) -> None:
        self.bad = bad
        detail = ", ".join(f"{name} (streams {streams})" for name, streams in bad.items())
        super().__init__(f"non-finite memory state: {detail}")


@dataclass
class MemoryState:
    """State of B independent streams of one memory layer.

    All streams in one state have the same number of pending tokens (the
    partial chunk not yet written); the engine groups streams accordingly.
    Shapes: B streams, H heads, P pending tokens (< chunk_size).
    """

    weights: tuple[Tensor, ...]  # per layer (B, H, in, out), float32
    momentum: tuple[Tensor, ...]  # per layer like weights; () without momentum
    pending_k: Tensor  # (B, H, P, d) keys of the partial chunk
    pending_v: Tensor  # (B, H, P, d) values
    pending_gates: Tensor  # (B, H, P, 3) theta, eta, alpha
    conv_tail: Tensor  # (B, conv_size - 1, channels) pre-convolution projections
    last_query: Tensor  # (B, H, d) query of the last token (the next lookahead key)
    tokens: Tensor  # (B,) int64 tokens seen
    chunks: Tensor  # (B,) int64 complete chunks
    writes_applied: Tensor  # (B,) int64
    writes_skipped: Tensor  # (B,) int64
    surprise_ema: Tensor  # (B,) float32
    write_rate: Tensor  # (B,) float32 EMA of the write indicator
    # Mitigation knobs (ops guards turn them; they apply to tokens projected afterwards):
    step_scale: Tensor  # (B,) float32 in (0, 1]: theta_t is multiplied by it
    forget_boost: Tensor  # (B,) float32 in [0, 1): alpha_t' = 1 - (1 - alpha_t)(1 - boost)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def pending(self) -> int:
        return self.pending_k.shape[2]

    def to_dict(self) -> dict[str, Tensor]:
        """A flat dict of tensors (safetensors-ready); `from_dict` inverts it exactly."""
        out: dict[str, Tensor] = {}
        for i, w in enumerate(self.weights):
            out[f"weights.{i}"] = w
        for i, s in enumerate(self.momentum):
            out[f"momentum.{i}"] = s
        for f in fields(self):
            if f.name not in ("weights", "momentum"):
                out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Tensor]) -> MemoryState:
        def layers(prefix: str) -> tuple[Tensor, ...]:
            n = sum(1 for key in data if key.startswith(prefix + "."))
            return tuple(data[f"{prefix}.{i}"] for i in range(n))

        data = dict(data)
        if "step_scale" not in data:  # written before mitigation existed: none applied
            data["step_scale"] = torch.ones_like(data["surprise_ema"])
            data["forget_boost"] = torch.zeros_like(data["surprise_ema"])
        rest = {f.name: data[f.name] for f in fields(cls) if f.name not in ("weights", "momentum")}
        return cls(weights=layers("weights"), momentum=layers("momentum"), **rest)

    def nbytes(self) -> int:
        """Bytes of every tensor `to_dict` holds, counted without building it (on every append)."""
        total = sum(t.nbytes for t in self.weights) + sum(t.nbytes for t in self.momentum)
        return total + sum(getattr(self, name).nbytes for name in _SINGLE_TENSORS)

    def map(self, fn) -> MemoryState:
        """Apply fn to every tensor (device moves, clones, detach)."""
        return MemoryState.from_dict({k: fn(v) for k, v in self.to_dict().items()})

    def clone(self) -> MemoryState:
        return self.map(lambda t: t.clone())

    @staticmethod
    def stack(states: list[MemoryState]) -> MemoryState:
        """Concatenate streams along the batch dimension (same pending length)."""
        pend = {s.pending for s in states}
        if len(pend) != 1:
            raise ValueError(f"cannot batch states with different pending lengths {sorted(pend)}")
        dicts = [s.to_dict() for s in states]
        return MemoryState.from_dict({k: torch.cat([d[k] for d in dicts]) for k in dicts[0]})

    def unstack(self) -> list[MemoryState]:
        """Split into B single-stream states."""
        d = self.to_dict()
        return [
            MemoryState.from_dict({k: v[b : b + 1] for k, v in d.items()})
            for b in range(self.batch)
        ]

    def non_finite(self) -> dict[str, list[int]]:
        """Names of float tensors holding NaN/inf, with the offending streams."""
        bad = {}
        for k, v in self.to_dict().items():
            if v.is_floating_point() and v.numel():
                ok = torch.isfinite(v.detach()).reshape(v.shape[0], -1).all(1)
                if not bool(ok.all()):
                    bad[k] = (~ok).nonzero().flatten().tolist()
        return bad

    def with_mitigation(self, step_scale: float, forget_boost: float) -> MemoryState:
        """The same state with every stream's mitigation knobs set (see the fields)."""
        if not 0.0 < step_scale <= 1.0:
            raise ValueError(f"step_scale must be in (0, 1], got {step_scale}")
        if not 0.0 <= forget_boost < 1.0:
            raise ValueError(f"forget_boost must be in [0, 1), got {forget_boost}")
        return replace(
            self,
            step_scale=torch.full_like(self.step_scale, step_scale),
            forget_boost=torch.full_like(self.forget_boost, forget_boost),
        )


_SINGLE_TENSORS = tuple(
    f.name for f in fields(MemoryState) if f.name not in ("weights", "momentum")
)
