"""Needle-in-a-haystack recall through the real streaming engine.

Each probe's context is streamed into a fresh session state piece by piece
(the engine's constant-size state: window ring buffer + memory), then the
question is asked and the answer generated greedily, exactly as long as the
expected one, and compared byte for byte. `batch` > 1 streams that many
probes of one length side by side with `StreamingEngine.step_batch` (the same
results, more tokens/s on a CPU); batch 1 is the single-stream speed.

Peak RSS is the process's high-water mark while a length runs, reset before
each length where Linux allows it (`/proc/self/clear_refs`), so a growing
number means the stream's memory grows with its length.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path

import torch

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.eval.probe import PIECE_TOKENS, Probe, ProbeSpec, make_probe
from memsvc.model import ModelState

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class ProbeResult:
    seed: int
    depth: float
    answer: str
    output: str
    correct: bool
    chars_correct: float  # fraction of answer characters right, position by position


@dataclass(frozen=True)
class LengthResult:
    length: int
    samples: int
    accuracy: float  # exact match
    char_accuracy: float
    tokens_per_s: float  # context tokens streamed per second (all probes of the batch)
    peak_rss_mb: float
    results: tuple[ProbeResult, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_length(
    engine: StreamingEngine,
    spec: ProbeSpec,
    seeds: Sequence[int],
    *,
    batch: int = 1,
    on_tokens: Callable[[int], None] | None = None,
) -> LengthResult:
    """Stream every probe of `spec` (one per seed) and score the answers."""
    reset_peak_rss()
    probes = [make_probe(spec, seed) for seed in seeds]
    results: list[ProbeResult] = []
    streamed, seconds = 0, 0.0
    for start in range(0, len(probes), batch):
        group = probes[start : start + batch]
        began = time.perf_counter()
        states = _stream_contexts(engine, group, on_tokens)
        seconds += time.perf_counter() - began
        streamed += sum(p.context_length for p in group)
        results += [_ask(engine, probe, state) for probe, state in zip(group, states, strict=True)]
    n = len(results)
    return LengthResult(
        length=spec.length,
        samples=n,
        accuracy=sum(r.correct for r in results) / n,
        char_accuracy=sum(r.chars_correct for r in results) / n,
        tokens_per_s=streamed / seconds,
        peak_rss_mb=peak_rss_mb(),
        results=tuple(results),
    )


def _stream_contexts(
    engine: StreamingEngine, probes: Sequence[Probe], on_tokens: Callable[[int], None] | None
) -> list[ModelState]:
    states = [engine.init_state() for _ in probes]
    contexts = (p.context(PIECE_TOKENS) for p in probes)
    pieces: Iterator[tuple[torch.Tensor | None, ...]] = zip_longest(*contexts)
    for round_pieces in pieces:
        live = [i for i, piece in enumerate(round_pieces) if piece is not None]
        if len(live) == 1:
            states[live[0]], _ = engine.append(states[live[0]], round_pieces[live[0]])
        else:
            stepped = engine.step_batch([states[i] for i in live], [round_pieces[i] for i in live])
            for i, (state, _) in zip(live, stepped, strict=True):
                states[i] = state
        if on_tokens is not None:
            on_tokens(sum(len(round_pieces[i]) for i in live))
    return states


def _ask(engine: StreamingEngine, probe: Probe, state: ModelState) -> ProbeResult:
    answer = probe.answer.encode()
    params = SamplingParams(temperature=0.0, max_new_tokens=len(answer), seed=0)
    output = bytes(engine.generate(state, probe.question, params))  # bytes only, EOS ends it
    matches = sum(a == b for a, b in zip(answer, output, strict=False))
    return ProbeResult(
        seed=probe.seed,
        depth=round(probe.depth, 4),
        answer=probe.answer,
        output=output.decode("utf-8", errors="replace"),
        correct=output == answer,
        chars_correct=matches / len(answer),
    )


def reset_peak_rss() -> None:
    """Start a new high-water mark of resident memory (Linux >= 4.0; else a no-op)."""
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else since the process began."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
