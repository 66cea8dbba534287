"""The memory's chunk update for a batch of memories: one operation, three paths.

`naive.py` is the slow, obviously right reference (autograd per token), `chunk.py`
the PyTorch path (matrix-product form), `triton_chunk.py` one Triton launch for
all memories. `chunk_update` is the one dispatch point; tests/kernels holds every
fast path equal to the reference.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from kernels.lmm.chunk import chunk_update_torch
from kernels.lmm.naive import chunk_update_naive
from kernels.lmm.rule import ChunkRule, ChunkWrite

Backend = Literal["auto", "naive", "torch", "triton"]

__all__ = [
    "Backend",
    "ChunkRule",
    "ChunkWrite",
    "chunk_update",
    "chunk_update_naive",
    "chunk_update_torch",
    "kernel_applies",
    "triton_available",
]


def triton_available() -> bool:
    """Whether Triton can be imported (the kernel module is loaded only on first use, so the
    interpreter switch TRITON_INTERPRET is read then)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel_module() -> ModuleType:
    return importlib.import_module("kernels.lmm.triton_chunk")


def kernel_applies(*tensors: Tensor) -> bool:
    """The kernel serves a call on these tensors (weights first): CUDA, bfloat16 weights,
    Triton importable, and no autograd through the update (the kernel has no backward).
    `chunk_update(backend="auto")` decides by it. Float32 weights go to the PyTorch path:
    on an H200 the kernel took 1.5-7x its time at dims 256 / 512 and 1-256 sessions; with
    bfloat16 it was 1.2-1.8x faster at dim 256 and 2.0x at dim 512 with 256 sessions, but
    slower at dim 512 below that (docs/BENCHMARKS.md)."""
    if not tensors[0].is_cuda or tensors[0].dtype != torch.bfloat16:
        return False
    if not triton_available():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def chunk_update(
    rule: ChunkRule,
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    q: Tensor | None = None,
    n_valid: Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> ChunkWrite:
    """One chunk's write (and reads at the chunk-start weights) for N memories at once.

    weights / momentum: per layer (N, in, out), float32 or bfloat16 for the kernel;
    k, v (N, C, d); gates (N, C, 3) theta, eta, alpha; q (N, R, d); n_valid (N,):
    memory n writes its first n_valid[n] tokens (None: all C). `backend="auto"` runs
    the Triton kernel where it applies (CUDA, bfloat16, no autograd through the update) and
    the PyTorch path elsewhere; "triton" forces the kernel (CPU tensors need
    TRITON_INTERPRET=1), "torch" the PyTorch path, "naive" the reference.
    """
    if backend == "auto":
        tensors = (*weights, *momentum, k, v, gates) + ((q,) if q is not None else ())
        backend = "triton" if kernel_applies(*tensors) else "torch"
    if backend == "triton":
        update = _kernel_module().chunk_update_triton
    elif backend == "torch":
        update = chunk_update_torch
    elif backend == "naive":
        update = chunk_update_naive
    else:
        raise ValueError(f"unknown backend {backend!r}: auto, naive, torch or triton")
    return update(rule, weights, momentum, k, v, gates, q, n_valid)
