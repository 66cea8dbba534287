"""Choosing the next token: `SamplingParams` and `sample_next` (temperature, top-k, top-p).

Only bytes are ever sampled, plus EOS when the params allow it: the other
special ids (PAD, BOS, QUERY) frame what the client sends, never an answer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from memsvc.model.tokenizer import EOS_ID, N_BYTES


@dataclass(frozen=True)
class SamplingParams:
    """How `StreamingEngine.generate` picks tokens and when it stops."""

    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens; None: all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1: all
    max_new_tokens: int = 256
    stop: tuple[bytes, ...] = ()  # stop when the output ends with one; it is not emitted
    allow_eos: bool = True  # EOS may be sampled, and ends the generation
    seed: int | None = None  # None: a fresh random seed per generation

    def __post_init__(self) -> None:
        if isinstance(self.stop, bytes | str):
            kind = type(self.stop).__name__
            _fail(f"stop must be a sequence of byte strings, got a single {kind}")
        object.__setattr__(self, "stop", tuple(self.stop))
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            _fail(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            _fail(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            _fail(f"top_p must be in (0, 1], got {p!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            _fail(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for i, seq in enumerate(self.stop):
            if not isinstance(seq, bytes):
                _fail(f"stop[{i}] must be bytes, got {type(seq).__name__} {seq!r}")
            if not seq:
                _fail(f"stop[{i}] is empty")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            _fail(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """logits (B, V) of the next token -> sampled ids (B,) int64.

    Special ids are masked out (EOS kept when params.allow_eos); then greedy
    argmax, or temperature, top-k and top-p filtering and one multinomial draw
    from `generator`, which must live on the logits' device."""
    logits = _allowed(logits, params)
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(_filtered_probs(logits, params), 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> Tensor:
    """One token per row of logits (B, V) -> ids (B,) int64, row i with params[i] and
    generators[i]: the token `sample_next` draws for that row alone. Rows that share
    their params are masked and filtered as one batch; only the draws are per row (one
    generator each)."""
    first = params[0]
    if any(p != first for p in params):
        return torch.cat(
            [
                sample_next(logits[i : i + 1], p, g)
                for i, (p, g) in enumerate(zip(params, generators, strict=True))
            ]
        )
    allowed = _allowed(logits, first)
    if first.greedy:
        return allowed.argmax(dim=-1)
    probs = _filtered_probs(allowed, first)
    return torch.cat(
        [torch.multinomial(probs[i : i + 1], 1, generator=g)[0] for i, g in enumerate(generators)]
    )


def _allowed(logits: Tensor, params: SamplingParams) -> Tensor:
    """float32 logits with every id that may not be sampled at -inf (adding 0 elsewhere
    leaves the others exactly as they were)."""
    return logits.float() + _ban_mask(logits.shape[-1], params.allow_eos, logits.device)


@functools.cache
def _ban_mask(vocab: int, allow_eos: bool, device: torch.device) -> Tensor:
    mask = torch.full((vocab,), float("-inf"), device=device)
    mask[:N_BYTES] = 0.0
    if allow_eos:
        mask[EOS_ID] = 0.0
    return mask


def _filtered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, top-k and top-p applied to allowed logits (B, V) -> probabilities."""
    # Shifted so the largest is 0 first: dividing by a tiny temperature then gives -inf,
    # never inf (inf - inf is NaN in the softmax).
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the first always stays).
        before = probs.cumsum(dim=-1) - probs  # (B, V) mass strictly ahead of each token
        drop_sorted = before >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)  # (B, V)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(message: str) -> None:
    raise ValueError(f"SamplingParams: {message}")
