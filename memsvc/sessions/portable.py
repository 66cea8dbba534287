"""Export files: one session's state as a portable, versioned file, sent in chunks.

An export is a checkpoint file (``checkpoint.py``: safetensors with a header
carrying the format version, the model hash, the config hash, the stream
position and a SHA-256 over all of it) whose WAL offset is 0: it carries no
log. One format for both keeps one reader, one checksum and one version rule.

Import refuses, in this order: more bytes than a state of the served model
can take (InvalidRequestError), a damaged file (InvalidRequestError), another
format version or model (IncompatibleStateError), tensors that do not fit the
model's state (IncompatibleStateError, ``state_check.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from memsvc.model import ModelState
from memsvc.sessions.api import IncompatibleStateError, InvalidRequestError
from memsvc.sessions.checkpoint import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    UnsupportedCheckpointVersionError,
    decode_checkpoint,
    encode_checkpoint,
)
from memsvc.sessions.durability import StateIdentity
from memsvc.sessions.state_check import check_state_layout, max_state_bytes

_SOURCE = Path("<import>")
# An export holds the state plus a header of a few kB; anything much larger is not one.
_HEADER_ALLOWANCE = 1 << 20


def encode_export(state: ModelState, identity: StateIdentity) -> bytes:
    """The export file of ``state``."""
    data, _ = encode_checkpoint(
        state.to_dict(),
        model_hash=identity.model_hash,
        config_hash=identity.config_hash,
        position=int(state.position[0]),
        wal_offset=0,
    )
    return data


def chunked(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """``data`` in pieces of ``chunk_bytes`` (the last may be shorter)."""
    view = memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


def max_export_bytes(template: ModelState, chunk_size: int) -> int:
    """The largest export of a state like ``template``."""
    return max_state_bytes(template, chunk_size) + _HEADER_ALLOWANCE


def decode_export(
    chunks: Iterable[bytes],
    identity: StateIdentity,
    template: ModelState,
    chunk_size: int,
) -> ModelState:
    """The state an export file holds, verified against the served model (module docstring)."""
    limit = max_export_bytes(template, chunk_size)
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise InvalidRequestError(f"an export of this model is at most {limit} bytes")
    try:
        checkpoint = decode_checkpoint(
            bytes(data),
            source=_SOURCE,
            model_hash=identity.model_hash,
            config_hash=identity.config_hash,
        )
    except (UnsupportedCheckpointVersionError, CheckpointMismatchError) as error:
        raise IncompatibleStateError(f"cannot import: {error.reason}") from error
    except CorruptCheckpointError as error:
        raise InvalidRequestError(f"not a valid export: {error.reason}") from error
    return check_state_layout(checkpoint.tensors, template, chunk_size)
