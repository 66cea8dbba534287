"""Does a mitigation keep what was written before it? A passkey is streamed in a short
haystack, then a long stream follows (noise or text) under the guards, and the key is
asked for at the end: once with the guards deciding and applying mitigations as the
server does, once unguarded, on the same bytes.

    recall_through(engine, "adversarial:random", 16384, guard, seeds=range(8))

A guard that damps writes of noise should leave the key recallable where the
unguarded memory lets the noise overwrite it; on text no mitigation fires and both
arms are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memsvc.engine import StreamingEngine
from memsvc.eval.niah import _ask, _stream_contexts
from memsvc.eval.probe import ProbeSpec, make_probe
from memsvc.eval.traffic import stream_bytes, stream_guarded
from memsvc.obs.guard import GuardConfig


@dataclass(frozen=True)
class RecallThrough:
    stream: str
    tokens: int  # streamed after the needle's haystack
    guarded: float  # passkey exact match with the guards on
    unguarded: float
    mitigations: float  # mean mitigations per probe (guarded arm)
    probes: int


def recall_through(
    engine: StreamingEngine,
    stream: str,
    tokens: int,
    guard: GuardConfig,
    seeds: Sequence[int],
    *,
    length: int = 2048,
    piece: int = 1024,
) -> RecallThrough:
    """Passkey recall after `tokens` of `stream`, guarded and unguarded (module docstring)."""
    window = engine.model.config.window
    spec = ProbeSpec("passkey", length, window, haystack="sentences", distractor_rate=0.2)
    scores = {True: 0, False: 0}
    fired = 0
    for seed in seeds:
        probe = make_probe(spec, seed)
        (state,) = _stream_contexts(engine, [probe], None)
        for guarded in (True, False):
            after, _, mitigations, _ = stream_guarded(
                engine,
                state,
                stream_bytes(stream, seed),
                tokens,
                guard if guarded else None,
                piece=piece,
            )
            scores[guarded] += _ask(engine, probe, after).correct
            fired += len(mitigations) if guarded else 0
    n = len(seeds)
    return RecallThrough(stream, tokens, scores[True] / n, scores[False] / n, fired / n, n)
