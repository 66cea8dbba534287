"""The chunk update of a batch of memories in plain PyTorch: memsvc.memory's own math.

N memories (sessions x heads), each with its own weights, write one chunk:

  * memory n uses its first `n_valid[n]` tokens of the chunk (a partial chunk is
    written as a chunk of that length; 0 tokens leave weights and momentum as
    they are, with surprise 0);
  * all R queries are read at the chunk-start weights.

For a full chunk this is `memsvc.memory.chunk.chunk_write` itself. The math runs
in float32 at least: bfloat16 weights are widened, updated and rounded back once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from memsvc.memory.chunk import ChunkWrite, chunk_write
from memsvc.memory.config import MemoryConfig
from memsvc.memory.mlp import MLPMemory
from memsvc.memory.objective import make_objective
from memsvc.memory.optimizer import make_optimizer


def chunk_update_reference(
    config: MemoryConfig,
    weights: Sequence[Tensor],  # per layer (N, in, out)
    momentum: Sequence[Tensor],  # per layer like weights; () without momentum
    k: Tensor,  # (N, C, d)
    v: Tensor,  # (N, C, d)
    gates: Tensor,  # (N, C, 3) theta, eta, alpha
    q: Tensor | None = None,  # (N, R, d)
    n_valid: Tensor | None = None,  # (N,) tokens of the chunk each memory writes; None: all C
) -> ChunkWrite:
    """New weights and momentum (in the weights' dtype), surprise^2 and reads (float32+)."""
    arch, objective, optimizer = MLPMemory(config), make_objective(config), make_optimizer(config)
    store = weights[0].dtype
    math = torch.promote_types(store, torch.float32)
    w = [x.to(math) for x in weights]
    s = [x.to(math) for x in momentum]
    k, v, gates = k.to(math), v.to(math), gates.to(math)
    q = None if q is None else q.to(math)
    full = k.shape[1]
    counts = [full] * k.shape[0] if n_valid is None else [int(c) for c in n_valid.tolist()]

    if all(c == full for c in counts):
        out = chunk_write(config, arch, objective, optimizer, w, s, k, v, gates, q)
    else:
        out = _ragged(config, arch, objective, optimizer, w, s, k, v, gates, q, counts)
    return ChunkWrite(
        weights=[x.to(store) for x in out.weights],
        momentum=[x.to(store) for x in out.momentum],
        surprise_sq=out.surprise_sq,
        reads=out.reads,
    )


def _ragged(config, arch, objective, optimizer, w, s, k, v, gates, q, counts) -> ChunkWrite:
    """chunk_write once per distinct valid length, on the memories that have it."""
    new_w = [x.clone() for x in w]
    new_s = [x.clone() for x in s]
    surprise_sq = k.new_zeros(k.shape[0])
    for n in sorted(set(counts) - {0}):
        idx = torch.tensor([i for i, c in enumerate(counts) if c == n], device=k.device)
        part = chunk_write(
            config,
            arch,
            objective,
            optimizer,
            [x[idx] for x in w],
            [x[idx] for x in s],
            k[idx, :n],
            v[idx, :n],
            gates[idx, :n],
        )
        for layer, x in enumerate(part.weights):
            new_w[layer][idx] = x
        for layer, x in enumerate(part.momentum):
            new_s[layer][idx] = x
        surprise_sq[idx] = part.surprise_sq
    reads = None if q is None else arch.forward(w, q)
    return ChunkWrite(weights=new_w, momentum=new_s, surprise_sq=surprise_sq, reads=reads)
