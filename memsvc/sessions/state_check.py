"""Does a state read from a file fit the served model? Names, dtypes, shapes and finite values.

A checksum proves a file was not damaged, not that it was written for this
model by this code: an imported file is whatever the client sent. Before a
state is served, its tensors must be exactly those of a fresh state of the
model (``StreamingEngine.init_state``), except the memory's partial-chunk
buffers, whose length (dimension 2) is whatever the stream left pending: the
same in every layer and less than the memory chunk. Float tensors must be
finite (a non-finite state is never served).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from memsvc.model import ModelState
from memsvc.sessions.api import IncompatibleStateError

PENDING_AXIS = 2  # the token axis of a partial-chunk buffer: (B, H, P, ...)
# Stream positions and counters: a state above this could not take another 2**62 tokens
# without overflowing int64.
MAX_COUNTER = 2**62


def is_pending_buffer(name: str) -> bool:
    """Whether a state tensor is one of the memory's partial-chunk buffers."""
    return ".memory.pending_" in name


def check_state_layout(
    tensors: Mapping[str, torch.Tensor], template: ModelState, chunk_size: int
) -> ModelState:
    """The state of ``tensors`` if they fit ``template``'s layout; else IncompatibleStateError."""
    expected = template.to_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise IncompatibleStateError(f"state tensors differ: missing {missing}, unexpected {extra}")
    pending = set()
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.dtype != want.dtype:
            raise IncompatibleStateError(f"{name}: dtype {tensor.dtype}, expected {want.dtype}")
        shape, want_shape = list(tensor.shape), list(want.shape)
        if is_pending_buffer(name) and len(shape) == len(want_shape) > PENDING_AXIS:
            pending.add(shape[PENDING_AXIS])
            shape[PENDING_AXIS] = want_shape[PENDING_AXIS]
        if shape != want_shape:
            raise IncompatibleStateError(
                f"{name}: shape {tuple(tensor.shape)}, expected {tuple(want.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise IncompatibleStateError(f"{name}: holds NaN or infinity")
    if len(pending) > 1 or any(not 0 <= length < chunk_size for length in pending):
        raise IncompatibleStateError(
            f"partial-chunk lengths {sorted(pending)}: must be one length below {chunk_size}"
        )
    for name, tensor in tensors.items():
        if (
            not tensor.is_floating_point()
            and tensor.numel()
            and not (int(tensor.min()) >= 0 and int(tensor.max()) <= MAX_COUNTER)
        ):
            raise IncompatibleStateError(f"{name}: counters must lie in [0, 2**62]")
    return ModelState.from_dict(dict(tensors))


def is_finite(state: ModelState) -> bool:
    """Whether every float tensor of ``state`` is finite (one reduction per tensor)."""
    return all(
        bool(torch.isfinite(tensor).all())
        for tensor in state.to_dict().values()
        if tensor.is_floating_point()
    )


def max_state_bytes(template: ModelState, chunk_size: int) -> int:
    """The bytes of a state like ``template`` with its partial-chunk buffers full (the largest)."""
    per_pending_token = sum(
        math.prod(shape[:PENDING_AXIS] + shape[PENDING_AXIS + 1 :]) * tensor.element_size()
        for name, tensor in template.to_dict().items()
        if is_pending_buffer(name) and len(shape := tuple(tensor.shape)) > PENDING_AXIS
    )
    return template.nbytes() + (chunk_size - 1) * per_pending_token
