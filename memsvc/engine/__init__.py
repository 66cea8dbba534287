"""The engine: streams tokens through a frozen MAG model (append, generate, batched steps).

No I/O and no sessions: it maps (state, tokens) to (state, outputs)."""

from memsvc.engine.decode import DecodeBatch
from memsvc.engine.pool import DecodePool, NoTokenYet, PooledGeneration
from memsvc.engine.sampling import SamplingParams, sample_next
from memsvc.engine.stream import AppendStats, Generation, StreamingEngine

__all__ = [
    "AppendStats",
    "DecodeBatch",
    "DecodePool",
    "Generation",
    "NoTokenYet",
    "PooledGeneration",
    "SamplingParams",
    "StreamingEngine",
    "sample_next",
]
