"""Per-session guards: notice an update explosion or a saturated memory, and decide the
seed's mitigation for it (lower the step size, raise forgetting), within bounds.

A `SessionGuard` is a pure state machine over one session's successive append
stats; it does no I/O. The session manager applies what it decides (the
memory's per-stream knobs, `MemoryState.with_mitigation`), records the event
in SQL, logs it and counts it.

Measurements, over a sliding window of at least `window_tokens` tokens: with s
the newest sample and s0 the newest one at or before s.position - window_tokens,

    updates_per_1k = 1000 * (s.writes_applied - s0.writes_applied) / (s.position - s0.position)
    norm_growth    = s.memory_norm / max(s0.memory_norm, 1e-12)

and, from `observe_input` (every append's bytes, from the first one),

    input_entropy  = entropy (bits per byte) of the latest appends' bytes, at least
                     input_window_tokens of them

Decisions are taken once the window is full and starts at or after the last
change of the knobs (so a window never mixes the stream before and after a
mitigation: the cool-down is one window). At most one trigger per decision,
in this order:

    update_explosion  norm_growth >= max_norm_growth and updates_per_1k >= min_updates_per_1k
    saturation        s.memory_norm >= saturation_fraction * norm_bound
    recovery          the knobs are off neutral and nothing triggered for recovery_tokens
                      since the last change

and, from `observe_input`, at any append once its window is full:

    anomalous_input   input_entropy > max_input_entropy (noise: random or compressed bytes)
                      or input_entropy < min_input_entropy (one byte, repeated);
                      at the step floor already, at most once per window_tokens

and, from `observe_recall` (the recall canary's session), between samples:

    saturation        recall < best recall seen by this guard - recall_drop

Each trigger moves the knobs one step from where they are:

    update_explosion  step_scale   <- max(min_step_scale, step_scale * step_decay)
    anomalous_input   step_scale   <- min(step_scale, min_step_scale), at once: noise must
                                      not overwrite what the memory holds
    saturation        forget_boost <- min(max_forget_boost,
                                      max(forget_boost_base, 2 * forget_boost))
    recovery          step_scale   <- min(1, step_scale / step_decay)
                      forget_boost <- forget_boost / 2, or 0 once that is below forget_boost_base

except that a trigger never loosens a knob (one restored from a state saved
under wider bounds stays where it is). So repeated triggers tighten stepwise
up to the bounds (a trigger at a bound repeats the bound's values: the event
is still worth recording), and recovery relaxes one step per `recovery_tokens`.

The memory applies the knobs per token: theta_t' = step_scale * theta_t and
alpha_t' = 1 - (1 - alpha_t)(1 - forget_boost), so a boost b halves an
untouched memory in about ln(2) / b tokens.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

MitigationKind = Literal["update_explosion", "anomalous_input", "saturation", "recovery"]

_TINY_NORM = 1e-12
_SNAP = 1e-9  # relaxing by division lands a rounding error away from 1


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds and bounds of the guards (module docstring for how each is used)."""

    # The saturation bound on a session's memory norm; it depends on the model: a few
    # times the norm of a fresh session's memory (`AppendStats.memory_norm` at position 0).
    norm_bound: float
    window_tokens: int = 4096
    max_norm_growth: float = 2.0  # norm ratio over one window that counts as explosive
    min_updates_per_1k: float = 1.0  # without writes, a growing norm is not an update explosion
    saturation_fraction: float = 0.9  # "near its bound"
    recall_drop: float = 0.25  # canary recall this far below its best counts as saturation
    step_decay: float = 0.5
    min_step_scale: float = 1 / 16
    forget_boost_base: float = 1e-4  # the seed's lambda_0: the first raise of forgetting
    max_forget_boost: float = 1e-3  # half-life of about 700 tokens: the strongest forgetting
    recovery_tokens: int = 65_536  # calm tokens before relaxing one step
    # Bits per byte of a window's input that no text reaches (docs/GUARDS.md: held-out real
    # text of every kind spans 4.1-6.6, base64 is 6.0, uniform random bytes 7.95).
    max_input_entropy: float = 7.5
    # Below any text: training sources dip to 1.7 (a table border in a Chinese manual
    # page); one repeated byte reads 0, two alternating bytes 1.0.
    min_input_entropy: float = 0.5
    # The input window is short: 1k tokens of noise already cost the reference model a
    # third of its passkey recall, 4k nearly all of it (docs/GUARDS.md).
    input_window_tokens: int = 512

    def __post_init__(self) -> None:
        _require(self.norm_bound > 0, "norm_bound must be positive")
        _require(self.window_tokens >= 1, "window_tokens must be >= 1")
        _require(self.max_norm_growth > 1, "max_norm_growth must be > 1")
        _require(self.min_updates_per_1k >= 0, "min_updates_per_1k must be >= 0")
        _require(0 < self.saturation_fraction <= 1, "saturation_fraction must be in (0, 1]")
        _require(0 < self.recall_drop <= 1, "recall_drop must be in (0, 1]")
        _require(0 < self.step_decay < 1, "step_decay must be in (0, 1)")
        _require(0 < self.min_step_scale <= 1, "min_step_scale must be in (0, 1]")
        _require(
            0 < self.forget_boost_base <= self.max_forget_boost < 1,
            "need 0 < forget_boost_base <= max_forget_boost < 1",
        )
        _require(self.recovery_tokens >= self.window_tokens, "recovery_tokens must be >= window")
        _require(self.input_window_tokens >= 1, "input_window_tokens must be >= 1")
        _require(
            0 <= self.min_input_entropy < self.max_input_entropy,
            "need 0 <= min_input_entropy < max_input_entropy",
        )


@dataclass(frozen=True)
class GuardSample:
    """A session right after an append (the manager's `AppendResult`): running totals."""

    position: int
    writes_applied: int
    writes_skipped: int
    memory_norm: float


def byte_histogram(tokens: Sequence[int]) -> list[int]:
    """How often each byte value 0-255 occurs among `tokens` (special ids above 255 aside)."""
    counts = [0] * 256
    for token in tokens:
        if 0 <= token < 256:
            counts[token] += 1
    return counts


def entropy_bits(counts: Sequence[int]) -> float | None:
    """Entropy in bits per byte of a histogram, Miller-Madow corrected (None when empty).

    The plain estimate falls short on few bytes (uniform noise reads 7.2 bits over 256
    bytes, 7.95 over 4096); adding (K - 1) / (2 N ln 2) for K distinct values in N
    bytes removes most of that bias, so one band serves short and long windows."""
    total = sum(counts)
    if total == 0:
        return None
    plain = -sum(c / total * math.log2(c / total) for c in counts if c)
    distinct = sum(1 for c in counts if c)
    return max(0.0, plain + (distinct - 1) / (2 * total * math.log(2)))


@dataclass(frozen=True)
class Mitigation:
    """New values of a session's memory knobs, why, and at which position it was decided."""

    kind: MitigationKind
    step_scale: float
    forget_boost: float
    position: int
    evidence: Mapping[str, float] = field(default_factory=dict)  # the measurements that fired


@dataclass(frozen=True)
class GuardCheck:
    """What one append told the guard: the window's rates (None until a full window has
    been seen) and a mitigation to apply, if any."""

    updates_per_1k_tokens: float | None
    norm_growth: float | None
    mitigation: Mitigation | None


@dataclass(frozen=True)
class InputCheck:
    """What one append's bytes told the guard: the entropy of the input window (None until
    it holds input_window_tokens bytes) and a mitigation, if any."""

    input_entropy: float | None
    mitigation: Mitigation | None


class SessionGuard:
    """The guard of one session. Start it with the session's current knobs (a restored
    session keeps the ones its state was saved with, even from a config with other bounds)."""

    def __init__(
        self, config: GuardConfig, step_scale: float = 1.0, forget_boost: float = 0.0
    ) -> None:
        # The ranges `MemoryState.with_mitigation` accepts.
        _require(0 < step_scale <= 1, "step_scale must be in (0, 1]")
        _require(0 <= forget_boost < 1, "forget_boost must be in [0, 1)")
        self.config = config
        self.step_scale = step_scale
        self.forget_boost = forget_boost
        self._samples: deque[GuardSample] = deque()
        self._since: int | None = None  # position of the last change (or of the first sample)
        self._best_recall: float | None = None
        self._input = _ByteWindow(config.input_window_tokens)

    def observe(self, sample: GuardSample) -> GuardCheck:
        """Take one append's sample; returns the window's rates and any mitigation."""
        samples = self._samples
        if samples and sample.position < samples[-1].position:
            samples.clear()  # rolled back: the old history no longer leads here
            self._since = None
        since = sample.position if self._since is None else self._since
        self._since = since
        samples.append(sample)
        horizon = sample.position - self.config.window_tokens
        while len(samples) > 1 and samples[1].position <= horizon:
            samples.popleft()
        start = samples[0]
        if start.position > horizon:
            return GuardCheck(None, None, None)
        span = sample.position - start.position
        rate = 1000.0 * (sample.writes_applied - start.writes_applied) / span
        growth = sample.memory_norm / max(start.memory_norm, _TINY_NORM)
        mitigation = self._decide(sample, rate, growth, since) if start.position >= since else None
        return GuardCheck(rate, growth, mitigation)

    def observe_input(self, position: int, histogram: Sequence[int]) -> InputCheck:
        """Take the byte histogram of one append ending at `position` (every append, from
        the first: input needs no warm-up); returns the entropy of the last
        input_window_tokens bytes or more (None until there are that many) and any
        mitigation."""
        window = self._input
        window.add(histogram)
        entropy = window.entropy()
        if entropy is None:
            return InputCheck(None, None)
        cfg = self.config
        if cfg.min_input_entropy <= entropy <= cfg.max_input_entropy:
            return InputCheck(entropy, None)
        since = position if self._since is None else self._since
        if self.step_scale <= cfg.min_step_scale and position - since < cfg.window_tokens:
            return InputCheck(entropy, None)  # at the floor: one event per window
        step = min(self.step_scale, cfg.min_step_scale)
        evidence = {"input_entropy": entropy}
        return InputCheck(
            entropy, self._change("anomalous_input", position, evidence, step_scale=step)
        )

    def observe_recall(self, position: int, recall: float) -> Mitigation | None:
        """Take a recall@k measured on this session (the recall canary's); a fall of more
        than recall_drop below the best seen is saturation."""
        best = self._best_recall
        self._best_recall = recall if best is None else max(best, recall)
        if best is None or recall >= best - self.config.recall_drop:
            return None
        evidence = {"recall": recall, "best_recall": best}
        return self._change("saturation", position, evidence, forget_boost=self._raised_boost())

    @property
    def mitigated(self) -> bool:
        return self.step_scale < 1.0 or self.forget_boost > 0.0

    def _decide(
        self, sample: GuardSample, rate: float, growth: float, since: int
    ) -> Mitigation | None:
        cfg = self.config
        evidence = {
            "updates_per_1k_tokens": rate,
            "norm_growth": growth,
            "memory_norm": sample.memory_norm,
        }
        at = sample.position
        if growth >= cfg.max_norm_growth and rate >= cfg.min_updates_per_1k:
            step = min(self.step_scale, max(cfg.min_step_scale, self.step_scale * cfg.step_decay))
            return self._change("update_explosion", at, evidence, step_scale=step)
        if sample.memory_norm >= cfg.saturation_fraction * cfg.norm_bound:
            return self._change("saturation", at, evidence, forget_boost=self._raised_boost())
        if self.mitigated and at - since >= cfg.recovery_tokens:
            step = self.step_scale / cfg.step_decay
            boost = self.forget_boost / 2
            return self._change(
                "recovery",
                at,
                evidence,
                step_scale=1.0 if step >= 1.0 - _SNAP else step,
                forget_boost=0.0 if boost < cfg.forget_boost_base else boost,
            )
        return None

    def _raised_boost(self) -> float:
        cfg = self.config
        raised = min(cfg.max_forget_boost, max(cfg.forget_boost_base, 2 * self.forget_boost))
        return max(self.forget_boost, raised)

    def _change(
        self,
        kind: MitigationKind,
        position: int,
        evidence: dict[str, float],
        *,
        step_scale: float | None = None,
        forget_boost: float | None = None,
    ) -> Mitigation:
        if step_scale is not None:
            self.step_scale = step_scale
        if forget_boost is not None:
            self.forget_boost = forget_boost
        self._since = position
        return Mitigation(kind, self.step_scale, self.forget_boost, position, evidence)


class _ByteWindow:
    """The summed byte histograms of the latest appends that hold at least `tokens`
    bytes (the oldest dropped while the rest still do)."""

    def __init__(self, tokens: int) -> None:
        self._tokens = tokens
        self._appends: deque[tuple[int, Sequence[int]]] = deque()
        self._counts = [0] * 256
        self._total = 0

    def add(self, histogram: Sequence[int]) -> None:
        size = sum(histogram)
        self._appends.append((size, histogram))
        self._shift(histogram, 1)
        self._total += size
        while self._total - self._appends[0][0] >= self._tokens:
            old_size, old = self._appends.popleft()
            self._shift(old, -1)
            self._total -= old_size

    def _shift(self, histogram: Sequence[int], sign: int) -> None:
        counts = self._counts
        for value, count in enumerate(histogram):
            if count:
                counts[value] += sign * count

    def entropy(self) -> float | None:
        return entropy_bits(self._counts) if self._total >= self._tokens else None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"guard: {message}")
