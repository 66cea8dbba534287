"""The exact within-chunk gated delta rule of a matrix memory: the token-by-token
reference (`naive.py`) and the chunk-parallel WY form (`chunk.py`: one chunk, or a
plan of many chunks computed at once), held equal by tests/kernels/test_delta_rule.py."""

from kernels.delta_rule.chunk import DeltaChunk, DeltaPlan, delta_chunk, delta_plan
from kernels.delta_rule.naive import delta_rule_naive

__all__ = ["DeltaChunk", "DeltaPlan", "delta_chunk", "delta_plan", "delta_rule_naive"]
