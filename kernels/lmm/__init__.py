"""The memory's chunk update for a batch of memories: a Triton kernel beside its reference.

`chunk_update` is the one dispatch point (`memsvc.memory` calls it on CUDA):
the Triton kernel (`triton_chunk.py`) where it applies, the plain-PyTorch
reference (`reference.py`, memsvc.memory's own chunk_write) everywhere else.
tests/kernels holds the two equal.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from kernels.lmm.reference import chunk_update_reference
from memsvc.memory.chunk import ChunkWrite
from memsvc.memory.config import MemoryConfig

Backend = Literal["auto", "triton", "torch"]

__all__ = ["ChunkWrite", "chunk_update", "chunk_update_reference", "triton_available"]


def triton_available() -> bool:
    """Whether Triton can be imported (the kernel module is loaded only on first use, so the
    interpreter switch TRITON_INTERPRET is read then)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel_module() -> ModuleType:
    return importlib.import_module("kernels.lmm.triton_chunk")


def kernel_applies(config: MemoryConfig, weights: Sequence[Tensor], *inputs: Tensor) -> bool:
    """The kernel serves this call: CUDA tensors, float32 / bfloat16 weights, the chunk rule,
    Triton importable, and no autograd through the update (the kernel has no backward)."""
    if not weights[0].is_cuda or weights[0].dtype not in (torch.float32, torch.bfloat16):
        return False
    if config.update_rule != "chunk" or not triton_available():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *inputs)))


def chunk_update(
    config: MemoryConfig,
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

    weights / momentum: per layer (N, in, out), float32 or bfloat16; k, v (N, C, d);
    gates (N, C, 3) theta, eta, alpha; q (N, R, d); n_valid (N,): memory n writes its
    first n_valid[n] tokens (None: all C). `backend="auto"` runs the Triton kernel when
    `kernel_applies`, the reference otherwise; "triton" forces the kernel (on CPU
    tensors it needs TRITON_INTERPRET=1), "torch" the reference.
    """
    inputs = (k, v, gates, *momentum) + ((q,) if q is not None else ())
    use_kernel = backend == "triton" or (
        backend == "auto" and kernel_applies(config, weights, *inputs)
    )
    if use_kernel:
        return _kernel_module().chunk_update_triton(
            config, weights, momentum, k, v, gates, q, n_valid
        )
    return chunk_update_reference(config, weights, momentum, k, v, gates, q, n_valid)
