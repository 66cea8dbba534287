"""titans-pytorch's NeuralMemory, set up to do the same work as ours (`memsvc bench lmm`).

Needs the optional `bench` extra (`MEMSVC_EXTRAS=dev,bench scripts/setup`),
which pins titans-pytorch==0.5.5, the release the goals of docs/ARCHITECTURE.md
("Goals") are set against.

How 0.5.5 streams: `NeuralMemory.forward(seq, state=...)` returns
`(retrieved, NeuralMemState)`; passing that state to the next call carries
`seq_index`, the weights gradients are taken at (`weights`), the partial-chunk
buffer (`cache_store_segment`) and `states = (last_update, last_momentum)`.
The fifth field, `updates`, is the per-chunk weight history of the last call,
used only by that call's reads; the next call discards it. With segments that
are a multiple of `chunk_size`, or of 1 token, the outputs equal one whole
call to float tolerance; other segment lengths do not (0.5.5 misaligns the
reads of a call that starts mid-chunk), so the benchmark uses only those two.

0.5.5 defaults kept as they are, which differ from our memory: q/k/v are plain
linear maps (no conv, no SiLU, no l2norm; `qk_rmsnorm=False`) after an input
RMSNorm (`pre_rmsnorm=True`); the step size is per token, `sigmoid(.) * 1.0`;
momentum and forgetting are per chunk, from the chunk's mean-pooled input;
no gradient clipping (`max_grad_norm=None`), so with weights moved every
chunk a random stream can diverge (dim 256 gives NaN after ~1.5k tokens).
The norm's gain inside the memory model is a memory weight too, and the last
token of a chunk reads the weights its own chunk wrote.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from titans_pytorch import MemoryMLP, NeuralMemory
    from titans_pytorch.neural_memory import NeuralMemState
except ImportError as err:  # the bench extra is optional
    raise ImportError(
        "the titans-pytorch peer needs the bench extra: MEMSVC_EXTRAS=dev,bench scripts/setup"
    ) from err


def build_titans_memory(
    dim: int,
    depth: int = 2,
    expansion: float = 4.0,
    chunk_size: int = 64,
    heads: int = 1,
    *,
    weights_per_chunk: bool = True,
) -> NeuralMemory:
    """titans-pytorch's NeuralMemory with our memory's shape and update schedule.

    The memory model is its `MemoryMLP(dim // heads, depth, expansion)` (no
    biases, GELU), which NeuralMemory wraps as `x + LayerNorm(MLP(x))`. Reads
    and writes both use `chunk_size`. `weights_per_chunk` sets
    `batch_size=chunk_size`: gradients are taken at the chunk-start weights, as
    ours are (docs/ARCHITECTURE.md, "The memory"). False keeps 0.5.5's default
    (`batch_size=None`): every gradient of a stream is taken at its initial
    weights. The work per call, and so the speed, is the same either way.
    """
    head_dim = dim // heads
    return NeuralMemory(
        dim=dim,
        dim_head=head_dim,
        heads=heads,
        chunk_size=chunk_size,
        batch_size=chunk_size if weights_per_chunk else None,
        model=MemoryMLP(head_dim, depth=depth, expansion_factor=expansion),
    )


def stream_titans(
    memory: NeuralMemory, x: Tensor, segment: int, state: NeuralMemState | None = None
) -> tuple[Tensor, NeuralMemState]:
    """Feed `x` (B, T, dim) in calls of `segment` tokens, carrying the state between calls.

    Returns the outputs (B, T, dim), concatenated, and the state after the last
    token. `segment` should be 1 or a multiple of the chunk size (see the module
    docstring).
    """
    if x.shape[1] == 0 or segment < 1:
        raise ValueError("need at least one token and segment >= 1")
    outputs = []
    for start in range(0, x.shape[1], segment):
        y, state = memory(x[:, start : start + segment], state=state)  # (B, segment, dim)
        outputs.append(y)
    assert state is not None  # at least one call was made
    return torch.cat(outputs, dim=1), state


def titans_state_nbytes(state: NeuralMemState) -> int:
    """Bytes of the tensors a NeuralMemState carries into the next call.

    Counts `weights`, the partial-chunk buffer and `(last_update,
    last_momentum)`, each tensor once (with `batch_size` set, `weights` is
    `last_update`), as numel * element size: what a checkpoint would hold, as
    our `MemoryState.nbytes()` counts. `updates` is left out: the next call
    discards it. In memory a 0.5.5 state can pin more than this, because
    `last_update` is a view into the last call's `updates` tensor.
    """
    last_update, last_momentum = state.states
    tensors = [
        *state.weights.values(),
        state.cache_store_segment,
        *last_update.values(),
        *last_momentum.values(),
    ]
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    total = 0
    for t in tensors:
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
