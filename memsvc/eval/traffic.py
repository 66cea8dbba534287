"""What the memory does under real traffic: norm, norm growth, update rate and surprise over
long streams of every haystack kind, and where the session guards would fire.

A stream is appended piece by piece (`piece` tokens, as an agent's appends
arrive); after each piece the engine's stats become one `TrafficSample`, and a
`SessionGuard` sees them exactly as the server's guards do (starting once the
stream is one guard window long). The samples give the distributions the guard
bounds are set from (`memsvc eval traffic`, docs/GUARDS.md), and the guard's
decisions show whether a bound would fire on ordinary text.

Adversarial streams beside the real ones: `adversarial:random` (uniform random
bytes) and `adversarial:repeat` (one byte, repeated).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from memsvc.engine import AppendStats, StreamingEngine
from memsvc.memory import NonFiniteStateError
from memsvc.model.model import ModelState
from memsvc.model.tokenizer import BOS_ID
from memsvc.obs.guard import GuardConfig, GuardSample, SessionGuard, byte_histogram
from memsvc.train.haystack import HAYSTACKS, VOCABULARIES, filler

ADVERSARIAL = ("adversarial:random", "adversarial:repeat")
STREAMS = HAYSTACKS + ADVERSARIAL


@dataclass(frozen=True)
class TrafficSample:
    position: int
    memory_norm: float
    writes_applied: int
    writes_skipped: int
    surprise_ema: float
    input_entropy: float | None = None  # bits per byte over the guard's window, once full


@dataclass(frozen=True)
class TrafficRun:
    stream: str
    tokens: int
    seconds: float
    fresh_norm: float
    samples: tuple[TrafficSample, ...]
    mitigations: tuple[dict, ...]  # what the guard decided: kind, position, evidence

    def to_dict(self) -> dict:
        return asdict(self)


def stream_bytes(stream: str, seed: int, split: str = "heldout") -> Iterator[bytes]:
    """The bytes of a stream, forever: haystack text (the held-out sources and vocabulary,
    or with split "train" the training ones) or an adversarial pattern."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r} (one of {', '.join(STREAMS)})")
    rng = random.Random(f"traffic-{stream}-{seed}")
    if stream == "adversarial:random":
        while True:
            yield rng.randbytes(4096)
    elif stream == "adversarial:repeat":
        byte = bytes([rng.randrange(32, 127)])
        while True:
            yield byte * 4096
    else:
        for unit in filler(rng, stream, VOCABULARIES[split], distractor_rate=0.1, digits=7):
            yield unit.encode()


def run_stream(
    engine: StreamingEngine,
    stream: str,
    tokens: int,
    guard: GuardConfig,
    *,
    piece: int = 1024,
    seed: int = 0,
    split: str = "heldout",
) -> TrafficRun:
    """Append `tokens` tokens of `stream` in pieces of `piece`, sampling after each."""
    state, stats = engine.append(engine.init_state(), [BOS_ID])
    source = stream_bytes(stream, seed, split)
    _, samples, mitigations, seconds = stream_guarded(
        engine, state, source, tokens - 1, guard, piece=piece
    )
    return TrafficRun(
        stream,
        samples[-1].position if samples else 1,
        seconds,
        stats.memory_norm,
        samples,
        mitigations,
    )


def stream_guarded(
    engine: StreamingEngine,
    state: ModelState,
    source: Iterator[bytes],
    tokens: int,
    guard: GuardConfig | None,
    *,
    piece: int = 1024,
) -> tuple[ModelState, tuple[TrafficSample, ...], tuple[dict, ...], float]:
    """Append `tokens` bytes of `source` to `state` in pieces, a `SessionGuard` watching as
    the server's does (from one window into the stream) and its mitigations applied;
    `guard` None: unguarded. An append that leaves the memory non-finite (the server
    rolls the session back and refuses it) ends the stream with a "non_finite" entry.
    Returns the state, the samples, the mitigations and the seconds spent appending."""
    watcher = None if guard is None else SessionGuard(guard)
    samples: list[TrafficSample] = []
    mitigations: list[dict] = []
    pending = bytearray()
    position = int(state.position.reshape(-1)[0])
    seconds, end = 0.0, position + tokens
    while position < end:
        while len(pending) < piece:
            pending += next(source)
        n = min(piece, end - position)
        ids = torch.tensor(list(pending[:n]), dtype=torch.int64)
        del pending[:n]
        began = time.perf_counter()
        try:
            state, stats = engine.append(state, ids)
        except NonFiniteStateError:  # what the server rolls back and refuses; the stream ends
            mitigations.append({"kind": "non_finite", "position": position + n})
            break
        seconds += time.perf_counter() - began
        position = stats.position
        if watcher is None:
            samples.append(_sample(position, stats, None))
            continue
        check = watcher.observe_input(position, byte_histogram(ids.tolist()))
        mitigation = check.mitigation
        if position >= watcher.config.window_tokens:  # as the server's guards: after a window
            sample = GuardSample(
                position, stats.writes_applied, stats.writes_skipped, stats.memory_norm
            )
            mitigation = mitigation or watcher.observe(sample).mitigation
        samples.append(_sample(position, stats, check.input_entropy))
        if mitigation is not None:
            m = mitigation
            mitigations.append({"kind": m.kind, "position": m.position, **dict(m.evidence)})
            state = state.with_mitigation(m.step_scale, m.forget_boost)
    return state, tuple(samples), tuple(mitigations), seconds


def _sample(position: int, stats: AppendStats, entropy: float | None) -> TrafficSample:
    return TrafficSample(
        position,
        stats.memory_norm,
        stats.writes_applied,
        stats.writes_skipped,
        stats.surprise_ema,
        entropy,
    )


def window_growths(run: TrafficRun, window: int) -> list[float]:
    """Norm growth over every `window` tokens (sample to sample), after the first window."""
    out = []
    samples = run.samples
    j = 0
    for s in samples:
        if s.position < 2 * window:
            continue
        while samples[j + 1].position <= s.position - window:
            j += 1
        out.append(s.memory_norm / max(samples[j].memory_norm, 1e-12))
    return out


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 90, 99, 100)) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        f"p{q:g}": ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] for q in qs
    }


def summarize_run(run: TrafficRun, window: int) -> dict:
    """The distributions of one stream, as the guard bounds are set from them."""
    after = [s for s in run.samples if s.position >= window]  # past the warm-up
    ratios = [s.memory_norm / max(run.fresh_norm, 1e-12) for s in after]
    if not run.samples:  # the first append already went non-finite
        return {"stream": run.stream, "tokens": run.tokens, "tokens_per_s": 0,
                "fresh_norm": run.fresh_norm, "norm_ratio": {}, "norm_growth_per_window": {},
                "surprise_ema": {}, "input_entropy": {}, "updates_per_1k": 0.0,
                "write_share": 0.0, "mitigations": list(run.mitigations),
                "first_mitigation_at": run.mitigations[0]["position"]}  # fmt: skip
    first, last = run.samples[0], run.samples[-1]
    applied = last.writes_applied - first.writes_applied
    skipped = last.writes_skipped - first.writes_skipped
    return {
        "stream": run.stream,
        "tokens": run.tokens,
        "tokens_per_s": round(run.tokens / max(run.seconds, 1e-9)),
        "fresh_norm": run.fresh_norm,
        "norm_ratio": percentiles(ratios),
        "norm_growth_per_window": percentiles(window_growths(run, window)),
        "surprise_ema": percentiles([s.surprise_ema for s in after]),
        "input_entropy": percentiles(
            [s.input_entropy for s in after if s.input_entropy is not None], (0, 1, 50, 99, 100)
        ),
        "updates_per_1k": 1000 * applied / max(1, last.position - first.position),
        "write_share": applied / max(1, applied + skipped),
        "mitigations": list(run.mitigations),
        "first_mitigation_at": run.mitigations[0]["position"] if run.mitigations else None,
    }
